"""The application layer's jobs: pretrain, finetune, evaluate (each ``main(argv) -> int``).

OpenMP's passive wait policy, which they need on a shared CPU, is set by ``unified_vl`` itself
(its ``__init__``), before torch loads.
"""
