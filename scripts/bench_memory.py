"""Peak memory per process of ZeRO stages 0-3 (and optimizer/parameter offload) with 2 processes.

    python scripts/bench_memory.py                              # uvl-medium, 2 processes, a few steps each
    python scripts/bench_memory.py --preset uvl-tiny --steps 2  # a quick look
    python scripts/bench_memory.py --processes 4 --settings "ZeRO 0" "ZeRO 3"  # how ZeRO 3 scales

For each setting it starts 2 processes with ``torch.distributed.run`` that build the model, join
DeepSpeed through ``unified_vl.engine.trainer.initialize`` (the engine `unified-vl pretrain` uses)
and train --steps optimizer steps on random images. Each process reports its resident memory
after the imports and the process group (the floor every setting shares) and its peak resident
memory (``getrusage``); the table shows the larger rank's figures and the ratios to ZeRO 0. The
part a setting controls is the peak minus the floor: weights, gradients, optimizer state and
activations. Target: ZeRO 3 <= 0.6x ZeRO 0 for uvl-medium.

Every setting runs with glibc's mmap threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``,
mallopt(3)), so that a freed tensor's pages go back to the system: with glibc's default, the
threshold rises with each large free up to 32 MiB and freed tensors stay resident in the heap, so
the figures would measure the allocator's fragmentation (worst under ZeRO 3's many gather buffers)
more than the states each setting keeps. ``--glibc-default`` measures without it.

Below the table: the ideal ZeRO 3 ratio at this process count, from the model's states (16 bytes
per parameter: fp32 weight, gradient and AdamW's two moments) split N ways and the activations
measured under ZeRO 0 kept whole: (S/N + A) / (S + A). No ZeRO 3 implementation does better.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "ZeRO 0": ["train.zero_stage=0"],
    "ZeRO 1": ["train.zero_stage=1"],
    "ZeRO 2": ["train.zero_stage=2"],
    "ZeRO 2 + optimizer offload": ["train.zero_stage=2", "train.offload_optimizer=true"],
    "ZeRO 3": ["train.zero_stage=3"],
    # DeepSpeed's own defaults for the buffers the engine sizes to the model (stage3_memory_options)
    "ZeRO 3, DeepSpeed's default buffers": [
        "train.zero_stage=3",
        "train.zero_options={reduce_bucket_size: 500000000, allgather_bucket_size: 500000000, "
        "stage3_prefetch_bucket_size: 50000000, stage3_param_persistence_threshold: 100000, "
        "stage3_max_live_parameters: 1000000000, stage3_max_reuse_distance: 1000000000, sub_group_size: 1000000000}",
    ],
    "ZeRO 3 + optimizer and parameter offload": [
        "train.zero_stage=3",
        "train.offload_optimizer=true",
        "train.offload_params=true",
    ],
}


def rss_mb() -> float:
    """Resident memory now (Linux /proc), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def worker(args) -> None:
    """One rank of one setting: floor, model, engine, steps, peak; writes its figures as JSON."""
    import numpy as np
    import torch

    from unified_vl.engine import distributed
    from unified_vl.engine.config import derive, load_config
    from unified_vl.engine.trainer import LRSchedule, build_model_and_processor, initialize, token_losses

    torch.set_num_threads(1)
    overrides = json.loads(args.overrides)
    config = load_config(
        None,
        [
            "data.tasks={bench: 1}",
            f"model.preset={args.preset}",
            f"train.global_batch_size={args.processes * args.micro_batch}",
            f"train.micro_batch_size={args.micro_batch}",
            *overrides,
        ],
    )
    dist = distributed.init_distributed()
    floor = rss_mb()
    torch.manual_seed(0)
    model, processor = build_model_and_processor(config)
    schedule = LRSchedule(warmup_steps=1, horizon=100, kind="cosine", min_ratio=0.1)
    engine = initialize(model, config, derive(config, dist.world_size), schedule)
    rng = np.random.default_rng(dist.rank)
    size = processor.image_size
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(args.micro_batch)]
    batch = processor(images, ["what does the image describe?"] * args.micro_batch, ["a red circle"] * args.micro_batch)
    labels = batch.pop("labels").to(engine.device)
    inputs = {k: v.to(engine.device) for k, v in batch.items()}
    decoder_input_ids = engine.module.language_model.prepare_decoder_input_ids_from_labels(labels=labels)
    before_forward = rss_mb()
    activations = 0.0
    started = time.perf_counter()
    for step in range(args.steps):
        if step == 1:
            started = time.perf_counter()  # the first step also builds DeepSpeed's stage-3 trace
        out = engine(**inputs, decoder_input_ids=decoder_input_ids)
        if step == 0:
            activations = rss_mb() - before_forward  # what the first forward pass left alive
        ce, count = token_losses(out.logits, labels)
        engine.backward(ce.sum() / count.sum())
        engine.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    figures = {
        "floor": floor,
        "peak": peak,
        "between_steps": rss_mb(),
        "seconds_per_step": (time.perf_counter() - started) / max(1, args.steps - 1),
        "activations": activations,
        "parameters": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters()),
    }
    Path(args.result).with_suffix(f".rank{dist.rank}.json").write_text(json.dumps(figures))


def run_setting(name: str, overrides: list[str], args, folder: Path) -> dict:
    result = folder / name.replace(" ", "_").replace("+", "")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.processes}",
        __file__,
        "--worker",
        "--preset",
        args.preset,
        "--steps",
        str(args.steps),
        "--micro-batch",
        str(args.micro_batch),
        "--processes",
        str(args.processes),
        "--overrides",
        json.dumps(overrides),
        "--result",
        str(result),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not args.glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    ranks = [json.loads(result.with_suffix(f".rank{r}.json").read_text()) for r in range(args.processes)]
    return max(ranks, key=lambda r: r["peak"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="uvl-medium")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--glibc-default", action="store_true", help="leave glibc's dynamic mmap threshold on")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), help="a subset of: " + "; ".join(SETTINGS))
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from benchlib import machine_line, markdown_table, report, verdict

    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings:
            figures[name] = run_setting(name, SETTINGS[name], args, Path(tmp))
            print(f"{name}: peak {figures[name]['peak']:.0f} MiB", file=sys.stderr, flush=True)
    base = figures.get("ZeRO 0")
    rows = []
    for name, f in figures.items():
        model_state = f["peak"] - f["floor"]
        ratio = model_state / (base["peak"] - base["floor"]) if base else float("nan")
        target = verdict(ratio, 0.6, at_least=False) if name == "ZeRO 3" else ""
        rows.append(
            [
                name,
                f"{f['peak']:.0f}",
                f"{f['peak'] / base['peak']:.2f}x" if base else "-",
                f"{model_state:.0f}",
                f"{ratio:.2f}x" if base else "-",
                f"{f['between_steps'] - f['floor']:.0f}",
                f"{f['seconds_per_step']:.1f}",
                target,
            ]
        )
    allocator = "glibc's default malloc" if args.glibc_default else "glibc mmap threshold 128 KiB"
    head = (
        f"{machine_line()}\n{args.preset}, {args.processes} processes, micro batch {args.micro_batch}, "
        f"{args.steps} steps, {allocator}; the larger rank's figures\n"
    )
    headers = [
        "setting",
        "peak RSS MiB",
        "/ ZeRO 0",
        "peak - floor MiB",
        "/ ZeRO 0",
        "between steps - floor MiB",
        "s / step",
        "target (ZeRO 3 <= 0.6x)",
    ]
    table = markdown_table(headers, rows)
    extra = {}
    if base:
        states = 16 * base["parameters"] / 2**20  # fp32 weight + gradient + AdamW's two moments
        act = base["activations"]
        ideal = (states / args.processes + act) / (states + act)
        extra = {"model_states_mib": states, "activations_mib": act, "ideal_zero3_ratio": ideal}
        table += (
            f"\n\nmodel states {states:.0f} MiB ({base['parameters'] / 1e6:.1f}M parameters x 16 bytes); activations "
            f"of one forward pass {act:.0f} MiB (ZeRO 0). An ideal ZeRO 3 at {args.processes} processes: "
            f"({states:.0f}/{args.processes} + {act:.0f}) / ({states:.0f} + {act:.0f}) = {ideal:.2f}x"
        )
    report(args.out, head + "\n" + table, {"machine": machine_line(), "settings": figures, **extra})


if __name__ == "__main__":
    main()
