"""``unified-vl finetune --task T --data DIR --init MODEL [--shots K] [--seed S] [CONFIG.yaml] [KEY=VALUE ...]``

Fine-tunes one task: all parameters, or with parts frozen (``train.freeze=[visual]``); ``--shots K``
trains on K examples drawn reproducibly from the seed (few-shot). The best checkpoint by the
task's primary metric on ``val`` is kept; the final model is evaluated on ``test`` and exported.

    unified-vl finetune --task vqa --data ~/.cache/unified-vl/synth-... --init runs/pretrain-.../model
    unified-vl finetune --task rec --data DIR --init MODEL --shots 32 --seed 1 train.freeze=[visual]
    unified-vl finetune --task rec --data DIR --init MODEL --shots 8 --method cpt     # another method

Layers: `FINETUNE` defaults <- CONFIG.yaml <- the flags <- KEY=VALUE.
"""

from __future__ import annotations

import argparse
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

FINETUNE: dict = {
    "optim": {"lr": 3e-4, "warmup_steps": 50, "schedule": "cosine", "min_lr_ratio": 0.0},
    "train": {"global_batch_size": 32, "micro_batch_size": 32, "max_steps": 500, "log_every": 10},
    "eval": {"every": 100, "splits": ["val"], "final_splits": ["test"], "max_examples": 500},
    "checkpoint": {"every": 100, "keep_last": 1},
}


def _body(argv: Sequence[str]) -> int:
    import tasks
    from unified_vl.app.jobs.evaluate import TaskEvaluator, format_metrics
    from unified_vl.engine.config import ConfigError
    from unified_vl.engine.trainer import train

    parser = argparse.ArgumentParser(
        prog="unified-vl finetune",
        description=__doc__.split("\n\n")[1],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", required=True, help="the task to fine-tune")
    parser.add_argument("--data", required=True, help="a data folder with the task's train (and val/test) split")
    parser.add_argument("--init", default=None, help="the model folder to start from (default: a fresh model.preset)")
    parser.add_argument("--shots", type=int, default=None, help="train on K examples drawn from the seed (few-shot)")
    parser.add_argument("--seed", type=int, default=None, help="the run's seed (sampling, shots, dropout)")
    parser.add_argument(
        "--method",
        default=None,
        help="how to adapt the model (unified_vl.prompting; default: full); method.options.KEY=VALUE sets its options",
    )
    parser.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [KEY=VALUE ...]")
    add_config_args(parser)
    args = parser.parse_args(argv)
    if args.task not in tasks.TASKS:
        raise ConfigError(f"--task: unknown task {args.task!r}; known tasks: {', '.join(sorted(tasks.TASKS))}")
    path, overrides = split_config_args(args.items)
    flags = [f"data.tasks={{{args.task}: 1}}", f"data.path={args.data}"]
    flags += [f"model.init={args.init}"] if args.init else []
    flags += [f"data.shots={args.shots}"] if args.shots is not None else []
    flags += [f"train.seed={args.seed}"] if args.seed is not None else []
    flags += [f"method.name={args.method}"] if args.method is not None else []
    primary = tasks.get_task(args.task).primary_metric
    defaults = {**FINETUNE, "checkpoint": {**FINETUNE["checkpoint"], "best_metric": f"{args.task}/val/{primary}"}}
    config = config_from(path, [*flags, *overrides], defaults=defaults, resume=args.resume)
    check_before_start(config)  # before any process starts: tasks, data, splits
    if (status := relaunch_locally(config, "finetune", argv)) is not None:
        return status
    dist = preflight(config)
    config = prepare_data(config, dist)
    check_tasks_and_data(config)
    evaluator = TaskEvaluator(
        config.data.path,
        [args.task],
        batch_size=config.eval.batch_size,
        num_beams=config.eval.num_beams,
        method=config.method.name,
        method_options=config.method.options,
    )
    result = train(config, training_data(config), evaluator=evaluator, job=f"finetune-{args.task}")
    if dist.is_main:
        print(f"\n{result.steps} steps in {result.train_seconds / 60:.1f} min; run folder {result.run_dir}")
        if result.metrics:
            print(format_metrics(result.metrics))
        if result.model_dir is not None:
            print(f"model: {result.model_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``unified-vl finetune ...``; returns the exit status."""
    return run_main(_body, list(sys.argv[1:] if argv is None else argv))
