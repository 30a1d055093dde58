"""The application layer: what users run — the `unified-vl` command, the training jobs, the
`Predictor` and the HTTP server.

It composes the other layers (tests/test_layout.py states the rule): the library (`unified_vl`:
model, processor, generation, the DeepSpeed engine), the tasks (`tasks`: templates, parsing,
metrics, and the box convention `tasks.boxes`) and the data (`data_tools`: stored records,
converters, the synthetic world). Nothing below this layer imports it.
"""
