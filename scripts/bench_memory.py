"""Peak memory per process of ZeRO stages 0-3 (and optimizer/parameter offload) with 2 processes.

    python scripts/bench_memory.py                              # uvl-medium, 2 processes, a few steps each
    python scripts/bench_memory.py --preset uvl-tiny --steps 2  # a quick look

For each setting it starts 2 processes with ``torch.distributed.run`` that build the model, join
DeepSpeed through ``unified_vl.engine.trainer.initialize`` (the engine `unified-vl pretrain` uses)
and train --steps optimizer steps on random images. Each process reports its resident memory
after the imports and the process group (the floor every setting shares) and its peak resident
memory (``getrusage``); the table shows the larger rank's figures and the ratios to ZeRO 0. The
part a setting controls is the peak minus the floor: weights, gradients, optimizer state and
activations. Target: ZeRO 3 <= 0.6x ZeRO 0 for uvl-medium.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {
    "ZeRO 0": ["train.zero_stage=0"],
    "ZeRO 1": ["train.zero_stage=1"],
    "ZeRO 2": ["train.zero_stage=2"],
    "ZeRO 2 + optimizer offload": ["train.zero_stage=2", "train.offload_optimizer=true"],
    "ZeRO 3": ["train.zero_stage=3"],
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
            f"train.global_batch_size={2 * args.micro_batch}",
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
    for _ in range(args.steps):
        out = engine(**inputs, decoder_input_ids=decoder_input_ids)
        ce, count = token_losses(out.logits, labels)
        engine.backward(ce.sum() / count.sum())
        engine.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    Path(args.result).with_suffix(f".rank{dist.rank}.json").write_text(json.dumps({"floor": floor, "peak": peak}))


def run_setting(name: str, overrides: list[str], args, folder: Path) -> dict:
    result = folder / name.replace(" ", "_").replace("+", "")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        __file__,
        "--worker",
        "--preset",
        args.preset,
        "--steps",
        str(args.steps),
        "--micro-batch",
        str(args.micro_batch),
        "--overrides",
        json.dumps(overrides),
        "--result",
        str(result),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    ranks = [json.loads(result.with_suffix(f".rank{r}.json").read_text()) for r in (0, 1)]
    return max(ranks, key=lambda r: r["peak"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="uvl-medium")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=2)
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
                f"{ratio:.2f}x",
                target,
            ]
        )
    head = (
        f"{machine_line()}\n{args.preset}, 2 processes, micro batch {args.micro_batch}, {args.steps} steps; "
        "the larger rank's figures\n"
    )
    headers = ["setting", "peak RSS MiB", "/ ZeRO 0", "peak - floor MiB", "/ ZeRO 0", "target (ZeRO 3 <= 0.6x)"]
    report(args.out, head + "\n" + markdown_table(headers, rows), {"machine": machine_line(), "settings": figures})


if __name__ == "__main__":
    main()
