"""Each task's test metric against the CPU-minutes of the built-in main job, next to the trivial baselines.

    python scripts/bench_learning.py --out docs/bench/learning.md          # runs the main job (~16 min), then evaluates
    python scripts/bench_learning.py --run RUN_DIR --out docs/bench/learning.md   # a finished run with kept checkpoints

Runs `unified-vl pretrain` (the main job, its own settings) keeping a checkpoint every --every
steps, exports each one and evaluates it on the first --max-examples records of each task's test
split. CPU-minutes are the run's training wall-clock minutes at that step times its processes
(the main job: two one-thread processes). Writes a PNG with one panel per task (the metric over
CPU-minutes, the best trivial baseline as a dashed line, the main job's target as a dotted one)
and a Markdown table of the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import machine_line, markdown_table, report

PROCESSES = 2  # the main job's train.local_processes, one thread each


def run_main_job(run_dir: Path, every: int) -> None:
    command = [sys.executable, "-m", "unified_vl.app.cli", "pretrain", f"output_dir={run_dir}"]
    command += [f"checkpoint.every={every}", "checkpoint.keep_last=1000"]
    subprocess.run(command, check=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})


def seconds_at(run_dir: Path) -> dict[int, float]:
    """Training seconds at each logged step (from metrics.jsonl: step x global batch / samples per second)."""
    import yaml

    batch = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["global_batch_size"]
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "train":
            out[row["step"]] = row["step"] * batch / row["train/samples_per_s"]
    return out


def evaluate_checkpoints(run_dir: Path, max_examples: int) -> list[dict]:
    import yaml

    import tasks
    from unified_vl.app.jobs.evaluate import TaskEvaluator
    from unified_vl.checkpoint import load_pretrained
    from unified_vl.engine.export import export_checkpoint

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    names = list(config["data"]["tasks"])
    evaluator = TaskEvaluator(config["data"]["path"], names, batch_size=64)
    index = json.loads((run_dir / "checkpoints" / "index.json").read_text())["checkpoints"]
    seconds = seconds_at(run_dir)
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        for entry in index:
            model, processor = load_pretrained(export_checkpoint(run_dir, Path(tmp) / entry["tag"], tag=entry["tag"]))
            metrics = evaluator.evaluate(model, processor, split="test", max_examples=max_examples)
            step = entry["step"]
            logged = max((s for s in seconds if s <= step), default=None)
            cpu_minutes = PROCESSES * (seconds[logged] * step / logged if logged else 0.0) / 60
            primary = {n: metrics[f"{n}/test/{tasks.get_task(n).primary_metric}"] for n in names}
            points.append({"step": step, "cpu_minutes": cpu_minutes, "metrics": primary})
            print(f"step {step}: {cpu_minutes:.1f} CPU-min {primary}", file=sys.stderr, flush=True)
    return points


def plot(points: list[dict], baselines: dict[str, float], targets: dict[str, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(points[0]["metrics"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2))
    for ax, name in zip(axes, names, strict=True):
        ax.plot([p["cpu_minutes"] for p in points], [p["metrics"][name] for p in points], marker="o", ms=3)
        if name in baselines:
            ax.axhline(baselines[name], ls="--", c="grey", label="trivial baseline")
        if name in targets:
            ax.axhline(targets[name], ls=":", c="green", label="target")
        ax.set(title=name, xlabel="CPU-minutes", ylim=(0, None))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a finished main-job run with kept checkpoints (skips training)")
    parser.add_argument("--every", type=int, default=500, help="steps between kept checkpoints")
    parser.add_argument("--max-examples", type=int, default=200, help="test records per task per point")
    parser.add_argument("--out", default="docs/bench/learning.md", help="the table; the PNG goes beside it")
    args = parser.parse_args()

    from data_tools import storage
    from unified_vl.app.jobs.pretrain import TARGETS

    run_dir = Path(args.run) if args.run else Path(tempfile.mkdtemp()) / "run"
    if args.run is None:
        run_main_job(run_dir, args.every)
    points = evaluate_checkpoints(run_dir, args.max_examples)
    import yaml

    data_dir = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["path"]
    import tasks

    baselines: dict[str, float] = {}  # the best trivial baseline of each task's primary metric on test
    for b in storage.read_manifest(data_dir).get("synth", {}).get("baselines", []):
        if b.get("split") == "test" and b["metric"] == tasks.get_task(b["task"]).primary_metric:
            baselines[b["task"]] = max(baselines.get(b["task"], 0.0), b["value"])
    png = Path(args.out).with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(points, baselines, TARGETS, png)
    names = list(points[0]["metrics"])
    rows = [[p["step"], f"{p['cpu_minutes']:.1f}", *(f"{p['metrics'][n]:.3f}" for n in names)] for p in points]
    rows.append(["trivial baseline", "", *(f"{baselines[n]:.3f}" if n in baselines else "-" for n in names)])
    text = f"{machine_line()}\nmain job, test metrics on the first {args.max_examples} records per task; curve: {png.name}\n\n"
    text += markdown_table(["step", "CPU-minutes", *names], rows)
    report(args.out, text, {"machine": machine_line(), "points": points, "baselines": baselines})


if __name__ == "__main__":
    main()
