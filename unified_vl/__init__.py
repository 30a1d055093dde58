"""unified-vl: one sequence-to-sequence model for captioning, VQA, grounding and classification.

Heavy submodules (torch, transformers, timm) are imported lazily (PEP 562) so that pure-Python
users such as ``tasks`` can import ``tasks.boxes`` without pulling in torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "UnifiedVLConfig": "unified_vl.config",
    "UnifiedVLForConditionalGeneration": "unified_vl.modeling",
    "UnifiedVLProcessor": "unified_vl.processor",
    "load_tokenizer": "unified_vl.tokenizer",
    "Predictor": "unified_vl.app.inference.predictor",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unified_vl' has no attribute {name!r}")
