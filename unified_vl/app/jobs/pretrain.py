"""``unified-vl pretrain [CONFIG.yaml] [KEY=VALUE ...] [--resume]``: multi-task pretraining on DeepSpeed.

With no arguments this is the built-in main job (the README's first command): generate the
synthetic world (cached), train a tokenizer on it, pretrain ``uvl-tiny`` on the five-task mixture
for a bounded time (~15 minutes on 2 CPU cores), evaluate every task on ``test`` and on the
held-out compositions, export the model and print the metrics next to the trivial baselines.

    unified-vl pretrain                                     # the main job
    unified-vl pretrain scripts/configs/pretrain_tiny.yaml train.max_minutes=5
    deepspeed --num_gpus 8 -m unified_vl.app.cli pretrain my.yaml train.zero_stage=2    # several processes

Layers: the main job's settings (`MAIN_JOB`) <- CONFIG.yaml <- KEY=VALUE.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from unified_vl.app.jobs.common import (
    EPILOG,
    add_config_args,
    check_before_start,
    check_tasks_and_data,
    config_from,
    preflight,
    prepare_data,
    relaunch_locally,
    run_main,
    split_config_args,
    training_data,
)

# The built-in main job; scripts/configs/pretrain_tiny.yaml holds the same settings (a test checks).
MAIN_JOB: dict = {
    "model": {"preset": "uvl-tiny", "tokenizer_vocab_size": 1000},
    "data": {
        # VQA, rec and grounding share most of it. Grounding, the task closest to its target, has
        # the largest share: with 4 of 12.75 it reached 0.69-0.78 while VQA, at 4.5, reached 0.95.
        "tasks": {"captioning": 0.5, "vqa": 3.5, "rec": 3.0, "grounding": 5.0, "classification": 0.75},
        "weighting": "explicit",
    },
    # 5e-4: from-scratch runs at 1e-3 and above learnt more slowly or stalled.
    "optim": {"lr": 5e-4, "warmup_steps": 200, "schedule": "cosine", "min_lr_ratio": 0.05},
    "train": {
        "global_batch_size": 32,
        "micro_batch_size": 16,
        "local_processes": 2,  # two one-thread processes use 2 cores better than one two-thread one
        "num_threads": 1,
        "max_steps": 100000,
        "max_minutes": 15.0,
        "log_every": 20,
        "loss_reduction": "sample",  # a 1-word answer counts as much as a 12-word caption
        "loc_sigma": 2.0,  # neighbouring location bins share the target (SimCC)
    },
    "eval": {"every": 0, "splits": ["val"], "final_splits": ["test", "heldout"]},
    "checkpoint": {"every": 1000, "keep_last": 2},
}
# What the main job must reach on test (the acceptance thresholds); captioning must beat
# its most-common-caption baseline by a wide margin instead.
TARGETS = {"vqa": 0.90, "rec": 0.80, "classification": 0.95, "grounding": 0.70}


def results_table(
    metrics: dict[str, float],
    baselines: Sequence[dict],
    task_names: Sequence[str],
    splits: Sequence[str] = ("test", "heldout"),
    *,
    targets: bool = True,
) -> str:
    """Primary metric per task on each evaluated split, the best trivial baseline (on test) and the target.

    Args:
        metrics: ``{task}/{split}/{metric}`` values.
        baselines: the data's trivial baselines (the synthetic world's manifest); none: no column.
        task_names: the rows.
        splits: the columns: the splits that were evaluated.
        targets: show the main job's targets (they are about the synthetic world).
    """
    import tasks

    widths = [max(7, len(s)) for s in splits]
    head = f"  {'task':15s} {'metric':15s} " + " ".join(f"{s:>{w}s}" for s, w in zip(splits, widths, strict=True))
    head += f" {'baseline':>9s}" if baselines else ""
    head += f" {'target':>7s}" if targets else ""
    lines = [head, "  " + "-" * (len(head) - 2)]
    for name in task_names:
        metric = tasks.get_task(name).primary_metric
        base = [b["value"] for b in baselines if b["task"] == name and b["metric"] == metric]
        cells = []
        for split, width in zip(splits, widths, strict=True):
            value = metrics.get(f"{name}/{split}/{metric}")
            cells.append(f"{value:{width}.3f}" if value is not None else " " * (width - 1) + "-")
        line = f"  {name:15s} {metric:15s} " + " ".join(cells)
        if baselines:
            line += f" {max(base):9.3f}" if base else " " * 9 + "-"
        if targets:
            line += f" {TARGETS[name]:7.2f}" if name in TARGETS else ("   >base" if base else "       -")
        lines.append(line)
    return "\n".join(lines)


def try_command(model_dir, data_dir, run_dir, task_names: Sequence[str] = ("vqa",), splits: Sequence[str] = ("test",)):
    """A ``unified-vl predict`` command on one image of the data (saved next to the run), or None.

    The example is the first record of a split that exists (the evaluated ones first) of a trained
    task with an image (VQA first: its question makes the best demonstration).
    """
    import tasks
    from data_tools import storage

    available = storage.available(data_dir)
    order = sorted(task_names, key=lambda t: t != "vqa")
    for name in order:
        have = available.get(name, {})
        split = next((s for s in (*splits, "val", "test", "train") if have.get(s)), None)
        if split is None:
            continue
        record = storage.load_split(data_dir, name, split)[0]
        if record.get("image") is None:
            continue
        image_path = run_dir / "example.png"
        record["image"].convert("RGB").save(image_path)
        command = f"unified-vl predict --model {model_dir} --task {name} --image {image_path}"
        spec = tasks.get_task(name).fields
        field = next((f for f, fs in spec.items() if fs.role == "input" and fs.type == "str" and record.get(f)), None)
        return command + (f" --text {shlex.quote(record[field])}" if field else "")
    return None


def _body(argv: Sequence[str]) -> int:
    from data_tools import storage
    from unified_vl.app.jobs.evaluate import TaskEvaluator, format_metrics
    from unified_vl.engine.trainer import train

    parser = argparse.ArgumentParser(
        prog="unified-vl pretrain",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [KEY=VALUE ...]")
    add_config_args(parser)
    args = parser.parse_args(argv)
    path, overrides = split_config_args(args.items)
    config = config_from(path, overrides, defaults=MAIN_JOB, resume=args.resume)
    check_before_start(config)  # before any process starts: tasks, data, splits
    if (status := relaunch_locally(config, "pretrain", argv)) is not None:
        return status
    dist = preflight(config)
    config = prepare_data(config, dist)
    check_tasks_and_data(config)
    evaluator = TaskEvaluator(
        config.data.path,
        list(config.data.tasks),
        batch_size=config.eval.batch_size,
        num_beams=config.eval.num_beams,
        method=config.method.name,
        method_options=config.method.options,
    )
    result = train(config, training_data(config), evaluator=evaluator, job="pretrain")
    if dist.is_main:
        print(
            f"\n{result.steps} steps in {result.train_seconds / 60:.1f} min, {result.samples_per_s:.0f} samples/s; run folder {result.run_dir}"
        )
        splits = config.eval.final_splits
        if result.metrics:
            print(format_metrics(result.metrics))
            baselines = storage.read_manifest(config.data.path).get("synth", {}).get("baselines", [])
            table = results_table(result.metrics, baselines, list(config.data.tasks), splits, targets=bool(baselines))
            print("\n" + table)
        if result.model_dir is not None:
            print(f"\nmodel: {result.model_dir}")
            command = try_command(result.model_dir, config.data.path, result.run_dir, list(config.data.tasks), splits)
            if command is not None:
                print("try a prediction:\n  " + command)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``unified-vl pretrain ...``; returns the exit status."""
    return run_main(_body, list(sys.argv[1:] if argv is None else argv))
