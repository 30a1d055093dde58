"""`unified-vl presets`: each model preset with its parameter count (built on the meta device).

    unified-vl presets

Expect: one line per preset, e.g. ``uvl-tiny  ...M parameters  (vision ..., text ...)``.
"""

from __future__ import annotations

import argparse

import torch

from unified_vl.config import PRESETS, UnifiedVLConfig
from unified_vl.modeling import UnifiedVLForConditionalGeneration
from unified_vl.tokenizer import load_tokenizer


def count_parameters(name: str, *, vocab_size: int | None = None) -> dict[str, int]:
    """Parameter counts of a preset, split into vision / text / glue, without allocating weights."""
    overrides = {"text_config": {"vocab_size": vocab_size}} if vocab_size else {}
    config = UnifiedVLConfig.from_preset(name, **overrides)
    with torch.device("meta"):
        model = UnifiedVLForConditionalGeneration(config)
    vision = sum(p.numel() for p in model.visual.backbone.parameters())
    # Tied input/output embeddings are counted once (parameters() deduplicates them).
    text = sum(p.numel() for p in model.language_model.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "vision": vision, "text": text, "glue": total - vision - text}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unified-vl presets", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    default_vocab = len(load_tokenizer())
    for name in PRESETS:
        vocab = default_vocab if name == "uvl-tiny" else None
        c = count_parameters(name, vocab_size=vocab)
        print(
            f"{name:<11} {c['total'] / 1e6:8.1f}M parameters  "
            f"(vision {c['vision'] / 1e6:.1f}M, text {c['text'] / 1e6:.1f}M, glue {c['glue'] / 1e6:.2f}M)"
        )
    return 0
