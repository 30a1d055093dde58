"""Data tools of unified-vl: stored records, the synthetic scene world, converters, tokenizer corpus.

* `data_tools.storage`: records as Hugging Face ``datasets`` folders, one per (task, split), plus an
  atomically written manifest (docs/records.md, "Stored data").
* `data_tools.synth`: the synthetic scene world, the built-in default data of every task.
* `data_tools.converters`: one module per source dataset (COCO Captions, Karpathy splits, VQAv2,
  RefCOCO/+/g, Flickr30k Entities, image folders, CSV) -> records.
* `data_tools.cli`: ``unified-vl data synth|convert|show`` and ``unified-vl tokenizer train``.

Submodules are imported on use: ``import data_tools`` stays cheap.
"""
