"""Where one training step of a run config goes: the whole step against its image side, eager or compiled.

    python scripts/profile_train_step.py scripts/configs/learn_recipe.yaml [KEY=VALUE ...] [--compile]

Builds the model a run config describes (as ``unified-vl pretrain`` does; ``data.tasks``, which only
the config's validation reads here, is classification unless an override names it), then times,
alternately and on one thread as each of the benchmark's two training processes runs: a full step
(forward, backward and AdamW over a micro batch of random images and token ids of the given lengths)
and the image side alone (backbone and projection, forward and backward). Prints a table of the
medians (and ranges) and the image side's share of a step; ``--compile`` then times the step
through ``torch.compile``: the first compiled step (the compilation) and the steps after it, as
fractions of an eager step. Synthetic inputs: the figures are compute, not data loading.

Expect (2-core AMD EPYC, docs/learning.md "The classification rows: time and capacity"): the recipe
at micro batch 16 ~0.15-0.18 s a step, about half of it the convolutional stem; compiled, a first
step of 17-94 s (warm or cold inductor cache) and the steps after it ~0.9 of eager.
"""

from __future__ import annotations

import argparse
import time

import torch
from benchlib import alternate, machine_line, markdown_table, paired_ratio, report, timed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a run config (YAML), e.g. scripts/configs/learn_recipe.yaml")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides, as unified-vl pretrain takes them")
    parser.add_argument("--micro-batch", type=int, default=16, help="examples per step (the recipe's micro batch)")
    parser.add_argument("--text-length", type=int, default=10, help="prompt tokens per example")
    parser.add_argument("--target-length", type=int, default=3, help="target tokens per example")
    parser.add_argument("--steps", type=int, default=30, help="timed repetitions of each")
    parser.add_argument("--compile", action="store_true", help="also time the step through torch.compile")
    parser.add_argument("--out", default=None, help="also write the lines here (Markdown) and a .json beside it")
    args = parser.parse_args(argv)

    from unified_vl.engine.config import load_config
    from unified_vl.engine.trainer import build_model_and_processor

    torch.set_num_threads(1)
    torch.manual_seed(0)
    overrides = list(args.overrides)
    if not any(o.startswith("data.tasks=") for o in overrides):
        overrides.append("data.tasks={classification: 1}")  # only the config's validation needs it
    model, _ = build_model_and_processor(load_config(args.config, overrides))
    model.train()
    b, side, vocab = args.micro_batch, model.config.image_size, model.config.text_config.vocab_size
    pixels = torch.randn(b, 3, side, side)
    ids = torch.randint(2, vocab, (b, args.text_length))
    labels = torch.randint(2, vocab, (b, args.target_length))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(forward) -> None:
        forward(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def image_side() -> None:
        model.visual(pixels).square().mean().backward()
        model.zero_grad(set_to_none=True)

    total, visual = alternate([lambda: step(model), image_side], repeats=args.steps, warmup=2)
    share = paired_ratio(visual, total)
    rows = [
        ["step (forward, backward, AdamW)", total.spread(".4f"), "1.00"],
        ["image side (forward + backward)", visual.spread(".4f"), f"{share.median:.2f}"],
    ]
    data = {
        "config": [args.config, *args.overrides],
        "micro_batch": b,
        "step_s": total.median,
        "image_side_s": visual.median,
        "image_side_share": share.median,
    }
    if args.compile:
        compiled = torch.compile(model)
        start = time.perf_counter()
        step(compiled)
        first = time.perf_counter() - start
        fast = timed(lambda: step(compiled), repeats=args.steps, warmup=1)
        rows.append(["compiled step (after the first)", fast.spread(".4f"), f"{fast.median / total.median:.2f}"])
        rows.append(["first compiled step (the compilation)", f"{first:.1f}", f"{first / total.median:.0f}"])
        data.update(
            compile_first_step_s=first, compiled_step_s=fast.median, compiled_speedup=total.median / fast.median
        )
    lines = [
        machine_line(),
        f"config: {' '.join([args.config, *args.overrides])}",
        f"{model.num_parameters() / 1e6:.2f}M parameters, micro batch {b}, {side} px, "
        f"{model.visual.num_tokens} image tokens, one thread; median (min..max) of {args.steps}",
        "",
        markdown_table(["what", "seconds", "of a step"], rows),
    ]
    report(args.out, "\n".join(lines), data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
