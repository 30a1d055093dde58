"""unified-vl: one sequence-to-sequence model for captioning, VQA, grounding and classification.

Importing the package registers its classes with ``transformers``' auto classes, so that a saved
model folder loads the Hugging Face way::

    import unified_vl
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained("runs/main/model")
    processor = AutoProcessor.from_pretrained("runs/main/model")

This is the package's facade (tests/test_layout.py): it imports the library's model classes (so
torch and transformers load with it) and names the public entry points of every layer; the
pure-Python layers below it (``tasks``, ``tasks.boxes``, ``data_tools``) never import it.
"""

from __future__ import annotations

import importlib
import os

# OpenMP threads that spin-wait for each other collapse when another process shares the cores:
# on a 2-core machine with one busy neighbour, uvl-tiny trained at 10 samples/s with the default
# (active) policy and at 142 with the passive one. OpenMP reads the variable when torch loads it,
# which the imports below do, so it is set here, before them; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

from unified_vl.config import UnifiedVLConfig
from unified_vl.modeling import UnifiedVLForConditionalGeneration
from unified_vl.processor import UnifiedVLImageProcessor, UnifiedVLProcessor

__version__ = "0.1.0"

AutoConfig.register(UnifiedVLConfig.model_type, UnifiedVLConfig, exist_ok=True)
AutoModelForImageTextToText.register(UnifiedVLConfig, UnifiedVLForConditionalGeneration, exist_ok=True)
# One pipeline for both of transformers' image backends: ours is plain PIL and torch.
AutoImageProcessor.register(
    UnifiedVLConfig,
    image_processor_classes={"pil": UnifiedVLImageProcessor, "torchvision": UnifiedVLImageProcessor},
    exist_ok=True,
)
AutoProcessor.register(UnifiedVLConfig, UnifiedVLProcessor, exist_ok=True)

_LAZY = {
    "load_tokenizer": "unified_vl.tokenizer",
    "Predictor": "unified_vl.app.inference.predictor",
}

__all__ = [
    "__version__",
    "UnifiedVLConfig",
    "UnifiedVLForConditionalGeneration",
    "UnifiedVLImageProcessor",
    "UnifiedVLProcessor",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unified_vl' has no attribute {name!r}")
