"""Forward+backward time per sample of a preset on this machine (figures for the foundation issue).

    python scripts/bench_model.py --preset uvl-tiny --batch 32 --steps 10

Expect (2 CPU cores): a few ms per sample for uvl-tiny. Prints ms/sample and samples/s, and the
ratio to a text-only T5 of the same size (the cost of the image tokens).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from unified_vl.config import UnifiedVLConfig
from unified_vl.modeling import build_model
from unified_vl.processor import UnifiedVLProcessor
from unified_vl.tokenizer import load_tokenizer, model_vocab_size


def _time(fn, steps: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="uvl-tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    config = UnifiedVLConfig.from_preset(args.preset, text_config={"vocab_size": model_vocab_size(tokenizer)})
    model = build_model(config, tokenizer).train()
    processor = UnifiedVLProcessor.from_config(config, tokenizer, vision_backbone=model.visual.backbone)
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (config.image_size, config.image_size, 3), dtype=np.uint8) for _ in range(args.batch)
    ]
    prompts = ['which region does the text " the small red circle left of the blue square " describe?'] * args.batch
    targets = ["<loc_112><loc_340><loc_298><loc_501>"] * args.batch
    batch = processor(images=images, text=prompts, targets=targets)

    def fused_step():
        model(**batch).loss.backward()

    text_only = {k: v for k, v in batch.items() if k != "pixel_values"}

    def text_step():
        model.language_model(**text_only).loss.backward()

    fused = _time(fused_step, args.steps)
    text = _time(text_step, args.steps)
    print(
        f"{args.preset}: {model.num_parameters() / 1e6:.1f}M parameters, {model.visual.num_patches} image tokens, "
        f"batch {args.batch}, threads {torch.get_num_threads()}"
    )
    print(f"forward+backward: {1000 * fused / args.batch:.2f} ms/sample ({args.batch / fused:.0f} samples/s)")
    print(f"text-only T5 baseline: {1000 * text / args.batch:.2f} ms/sample; fused/text ratio {fused / text:.2f}x")


if __name__ == "__main__":
    main()
