"""Training speed: our DeepSpeed engine vs a plain PyTorch loop, and the FLOP utilisation of a step.

    python scripts/bench_train.py                                   # uvl-tiny (batch 32) and uvl-medium (batch 8, short)
    python scripts/bench_train.py --presets uvl-base --batches 16 --steps 10 --precision bf16 --out docs/bench/train-gpu.md

For each preset, two loops train the same model (same initial weights, same batch, same precision,
AdamW, gradient clipping, the warm-up/cosine schedule) on the same records, alternately:

* ours: the engine exactly as `unified-vl pretrain` runs it (``deepspeed.initialize`` through
  ``unified_vl.engine.trainer.initialize`` and one ``_train_step`` per optimizer step: collate,
  forward, our token loss, ``engine.backward``, ``engine.step``);
* plain: a hand-written PyTorch loop doing the same work with ``torch.optim.AdamW``.

Prints samples/s of each (median of --repeats, min..max), their ratio (target: ours / plain >= 0.9,
i.e. at most 10% engine overhead), the FLOPs of one step (``torch.utils.flop_counter``), the
achieved FLOP/s, and the machine's own matmul FLOP/s at the step's matmul shapes (each shape timed
alone), whose ratio is the FLOP utilisation.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter

import numpy as np
import torch
from benchlib import Figure, machine_line, markdown_table, paired_ratio, report, verdict
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

PROMPTS = [
    'which region does the text " the small red circle left of the blue square " describe?',
    "what color is the large object?",
    "what does the image describe?",
    "locate the phrases in: a red circle and a blue square",
]
TARGETS = [
    "<loc_112><loc_340><loc_298><loc_501>",
    "red",
    "a small red circle left of a large blue square",
    "a red circle<loc_1><loc_2><loc_3><loc_4> ; a blue square<loc_5><loc_6><loc_7><loc_8>",
]


class MatmulShapes(TorchDispatchMode):
    """Records the operand shapes of every matrix multiplication run inside it."""

    OPS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default"}

    def __init__(self):
        super().__init__()
        self.shapes: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in self.OPS:
            a, b = (args[1], args[2]) if name == "aten.addmm.default" else (args[0], args[1])
            self.shapes[(name, tuple(a.shape), tuple(b.shape), a.dtype)] += 1
        return func(*args, **(kwargs or {}))


def matmul_flops_per_s(shapes: Counter, device: str, repeats: int = 5) -> float:
    """The machine's FLOP/s over the same mix of matmul shapes: total FLOPs / total time, each shape timed alone."""
    total_flops, total_time = 0.0, 0.0
    for (name, a_shape, b_shape, dtype), count in shapes.items():
        a = torch.randn(a_shape, device=device, dtype=dtype)
        b = torch.randn(b_shape, device=device, dtype=dtype)
        mm = torch.bmm if name == "aten.bmm.default" else torch.mm
        flops = 2 * a.numel() * b_shape[-1]  # (.., m, k) @ (.., k, n): 2mkn per batch entry
        mm(a, b)
        start = time.perf_counter()
        for _ in range(repeats):
            mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        total_time += count * (time.perf_counter() - start) / repeats
        total_flops += count * flops
    return total_flops / total_time


def make_records(n: int, size: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "k": i % len(PROMPTS)} for i in range(n)]


def run_config(preset: str, batch: int, precision: str, steps: int):
    from unified_vl.engine.config import load_config

    return load_config(
        None,
        [
            "data.tasks={bench: 1}",
            f"model.preset={preset}",
            f"train.global_batch_size={batch}",
            f"train.micro_batch_size={batch}",
            f"train.precision={precision}",
            f"train.max_steps={10 * steps}",
            "optim.warmup_steps=2",
            "checkpoint.export=false",
        ],
    )


def bench_preset(preset: str, batch: int, steps: int, repeats: int, precision: str, device: str) -> dict:
    from unified_vl.engine import distributed
    from unified_vl.engine.config import derive
    from unified_vl.engine.mixture import MixtureSampler
    from unified_vl.engine.trainer import (
        Example,
        LRSchedule,
        TrainData,
        _Run,
        _train_step,
        build_model_and_processor,
        collate,
        initialize,
        param_groups,
        token_losses,
    )
    from unified_vl.tokenizer import loc_token_ids

    config = run_config(preset, batch, precision, steps)
    dist = distributed.init_distributed()
    derived = derive(config, dist.world_size)
    torch.manual_seed(0)
    model, processor = build_model_and_processor(config)
    torch.manual_seed(0)
    plain_model, _ = build_model_and_processor(config)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    records = make_records(4 * batch, processor.image_size, 0)
    data = TrainData({"bench": records}, lambda task, r, rng: Example(r["image"], PROMPTS[r["k"]], TARGETS[r["k"]]))
    o = config.optim

    def schedule():
        return LRSchedule(warmup_steps=o.warmup_steps, horizon=10 * steps, kind=o.schedule, min_ratio=o.min_lr_ratio)

    engine = initialize(model, config, derived, schedule())
    sampler = MixtureSampler({"bench": len(records)}, {"bench": 1.0}, seed=0, global_batch_size=batch)
    run = _Run(config, dist, derived, None, model, processor, data, sampler, {"bench": 1.0})
    loc_ids = torch.tensor(loc_token_ids(processor.tokenizer, processor.num_bins), device=engine.device)
    plain_model = plain_model.to(device=device, dtype=dtype).train()
    groups = param_groups(plain_model, o.weight_decay, o.lr, o.lr_scale)  # the engine's groups, rates included
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule())
    counter = {"ours": 0, "plain": 0}

    def ours():
        for _ in range(steps):
            _train_step(engine, run, counter["ours"], loc_ids)
            counter["ours"] += 1

    def plain_batch(step: int):
        items = [(i, "bench", index) for i, (_, index) in enumerate(sampler.next_step())]
        batch_, _ = collate(items, data, processor, seed=0, step=step)
        return {k: v.to(device) for k, v in batch_.items()}

    def plain_step(inputs) -> None:
        labels = inputs.pop("labels")
        decoder_input_ids = plain_model.language_model.prepare_decoder_input_ids_from_labels(labels=labels)
        out = plain_model(
            **{**inputs, "pixel_values": inputs["pixel_values"].to(dtype)}, decoder_input_ids=decoder_input_ids
        )
        ce, count = token_losses(out.logits, labels)
        (ce.sum() / count.sum().clamp(min=1)).backward()
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), o.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def plain():
        for _ in range(steps):
            plain_step(plain_batch(counter["plain"]))
            counter["plain"] += 1

    ours()  # warm-up: allocations, DeepSpeed's first step
    plain()
    times_ours, times_plain = [], []
    for _ in range(repeats):
        for fn, bucket in ((ours, times_ours), (plain, times_plain)):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    t_ours, t_plain = Figure(tuple(times_ours)), Figure(tuple(times_plain))

    inputs = plain_batch(0)
    shapes = MatmulShapes()
    with FlopCounterMode(display=False) as flops, shapes:
        plain_step(dict(inputs))
    step_flops = flops.get_total_flops()
    matmul = matmul_flops_per_s(shapes.shapes, device)
    samples = steps * batch
    return {
        "preset": preset,
        "batch": batch,
        "ours": t_ours.rate(samples),
        "plain": t_plain.rate(samples),
        "ratio": paired_ratio(t_plain, t_ours),  # ours / plain in samples/s
        "step_flops": step_flops,
        "achieved": t_ours.rate(steps * step_flops),
        "matmul": matmul,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["uvl-tiny", "uvl-medium"])
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 8], help="global batch per preset")
    parser.add_argument(
        "--steps", nargs="+", type=int, default=[20, 3], help="optimizer steps per repetition, per preset"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, data = [], []
    for i, preset in enumerate(args.presets):
        batch = args.batches[min(i, len(args.batches) - 1)]
        steps = args.steps[min(i, len(args.steps) - 1)]
        r = bench_preset(preset, batch, steps, args.repeats, args.precision, device)
        utilisation = r["achieved"].median / r["matmul"]
        rows.append(
            [
                f"{preset}, batch {batch}",
                r["ours"].spread(".1f"),
                r["plain"].spread(".1f"),
                r["ratio"].spread(".3f") + " " + verdict(r["ratio"].median, 0.9),
                f"{r['step_flops'] / 1e9:.1f}",
                f"{r['achieved'].median / 1e9:.1f}",
                f"{r['matmul'] / 1e9:.1f}",
                f"{100 * utilisation:.0f}%",
            ]
        )
        data.append(
            {
                "preset": preset,
                "batch": batch,
                "ours_samples_per_s": r["ours"].median,
                "plain_samples_per_s": r["plain"].median,
                "ratio": {"median": r["ratio"].median, "min": r["ratio"].low, "max": r["ratio"].high},
                "step_gflop": r["step_flops"] / 1e9,
                "achieved_gflops": r["achieved"].median / 1e9,
                "matmul_gflops": r["matmul"] / 1e9,
                "utilisation": utilisation,
            }
        )
    headers = [
        "preset",
        "ours samples/s",
        "plain loop samples/s",
        "ours / plain (>= 0.9)",
        "GFLOP/step",
        "achieved GFLOP/s",
        "matmul GFLOP/s",
        "utilisation",
    ]
    head = f"{machine_line()}\n{args.precision}, median of {args.repeats} (min..max)\n"
    report(args.out, head + "\n" + markdown_table(headers, rows), {"machine": machine_line(), "rows": data})


if __name__ == "__main__":
    main()
