"""``unified-vl eval``: a model folder on stored data, by generation, with the tasks' official metrics.

    unified-vl eval --model runs/pretrain-tiny/model --data ~/.cache/unified-vl/synth-... --split test
    # prints {task}/{split}/{metric} for every task of the data folder and writes them as JSON

The same `TaskEvaluator` runs the periodic and final evaluation during training.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unified_vl.app.jobs.common import run_main


class TaskEvaluator:
    """Generation through the task modules (template 0, the task's decoding) and the tasks' metrics.

    Args:
        data_dir: a data folder (``data_tools.storage`` layout).
        task_names: the tasks to evaluate; a task without the asked split is skipped.
        batch_size: inputs per ``generate`` call.
        num_beams: 1 for greedy search.
        candidate_split: where the candidate texts of ``"candidates"`` tasks come from (the label
            set seen in training); falls back to the evaluated split.
        method: the method whose ``generate`` reads the answers (``unified_vl.prompting``); the
            task's own decoding when it has none.
        method_options: the method's options (``Method.resolve_options``).
    """

    def __init__(
        self,
        data_dir: str,
        task_names: Sequence[str],
        *,
        batch_size: int = 64,
        num_beams: int = 1,
        candidate_split: str = "train",
        method: str = "full",
        method_options: Mapping[str, Any] | None = None,
    ):
        from unified_vl.prompting import get_method

        self.data_dir = str(data_dir)
        self.task_names = list(task_names)
        self.batch_size = batch_size
        self.num_beams = num_beams
        self.candidate_split = candidate_split
        self.method = get_method(method)
        self.method_options = self.method.resolve_options(method_options)
        self._candidates: dict[str, list[str] | None] = {}

    def available(self, split: str) -> list[str]:
        from data_tools import storage

        have = storage.available(self.data_dir)
        return [t for t in self.task_names if split in have.get(t, {})]

    def records(self, task: str, split: str, max_examples: int | None, *, decode_images: bool = True):
        from data_tools import storage

        dataset = storage.load_split(self.data_dir, task, split, decode_images=decode_images)
        if max_examples is not None and len(dataset) > max_examples:
            dataset = dataset.select(range(max_examples))  # the first N: the same subset every time
        return dataset

    def candidates(self, task, split: str) -> list[str] | None:
        from data_tools import storage

        if task.name not in self._candidates:
            have = storage.available(self.data_dir).get(task.name, {})
            source = self.candidate_split if self.candidate_split in have else split
            dataset = storage.load_split(self.data_dir, task.name, source, decode_images=False)
            self._candidates[task.name] = task.candidates(dataset.remove_columns("image"))
        return self._candidates[task.name]

    def generate(self, model, processor, *, split: str, max_examples: int | None, rank: int = 0, world_size: int = 1):
        """``{task: [(record index, generated text)]}`` for rows ``rank::world_size`` of each task's split."""
        import tasks

        out: dict[str, list[tuple[int, str]]] = {}
        for name in self.available(split):
            task = tasks.get_task(name)
            dataset = self.records(name, split, max_examples)
            indices = list(range(rank, len(dataset), world_size))
            rows = [dataset[i] for i in indices]
            texts = self._texts(model, processor, task, rows, split)
            out[name] = list(zip(indices, texts, strict=True))
        return out

    def _texts(self, model, processor, task, rows, split: str) -> list[str]:
        """The method's texts for ``rows`` when it reads answers its own way, else the task's decoding."""
        from unified_vl.app.jobs.common import record_images
        from unified_vl.generation import generate_texts

        if self.method.generate is not None:
            return self.method.generate(
                model,
                processor,
                task.name,
                rows,
                self.method_options,
                batch_size=self.batch_size,
                num_beams=self.num_beams,
            )
        return generate_texts(
            model,
            processor,
            [record_images(r) for r in rows],
            [task.prompt(r) for r in rows],
            decoding=task.decoding,
            candidates=self.candidates(task, split) if task.decoding == "candidates" else None,
            num_beams=self.num_beams,
            batch_size=self.batch_size,
        )

    def score(
        self, texts: dict[str, list[tuple[int, str]]], *, split: str, max_examples: int | None
    ) -> dict[str, float]:
        """``{task}/{split}/{metric}`` for each task, and ``mean/{split}/primary`` over the tasks."""
        import tasks

        metrics: dict[str, float] = {}
        primaries = []
        for name, rows in texts.items():
            task = tasks.get_task(name)
            dataset = self.records(name, split, max_examples, decode_images=False)  # metrics need no pixels
            rows = sorted(rows)
            if [i for i, _ in rows] != list(range(len(dataset))):
                raise RuntimeError(f"{name}/{split}: got texts for {len(rows)} of {len(dataset)} records")
            records = [dataset[i] for i in range(len(dataset))]
            predictions = [task.parse(text, record) for (_, text), record in zip(rows, records, strict=True)]
            result = task.evaluate(predictions, records)
            metrics.update({f"{name}/{split}/{k}": v for k, v in result.items()})
            primaries.append(result[task.primary_metric])
        if primaries:
            metrics[f"mean/{split}/primary"] = sum(primaries) / len(primaries)
        return metrics

    def evaluate(self, model, processor, *, split: str, max_examples: int | None = None) -> dict[str, float]:
        """Generation and metrics in one process."""
        model.eval()
        return self.score(
            self.generate(model, processor, split=split, max_examples=max_examples),
            split=split,
            max_examples=max_examples,
        )


def format_metrics(metrics: dict[str, float]) -> str:
    width = max((len(k) for k in metrics), default=0)
    return "\n".join(f"  {k.ljust(width)}  {v:.4f}" for k, v in sorted(metrics.items()))


def _method_options(name: str, items: Sequence[str]) -> dict[str, Any]:
    """``--method-option KEY=VALUE`` items, checked against the method's options (a ConfigError if not)."""
    import yaml

    from unified_vl.engine.config import ConfigError
    from unified_vl.prompting import MethodError, get_method

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--method-option {item!r} is not KEY=VALUE")
        options[key.strip()] = yaml.safe_load(value)
    try:
        return get_method(name).resolve_options(options)
    except MethodError as exc:
        raise ConfigError(f"--method: {exc}") from None


def _body(argv: Sequence[str]) -> int:
    from data_tools import storage
    from unified_vl.checkpoint import load_pretrained
    from unified_vl.engine.config import ConfigError

    parser = argparse.ArgumentParser(prog="unified-vl eval", description="Evaluate a model folder on stored data.")
    parser.add_argument("--model", required=True, help="a model folder (save_pretrained / a run's model/)")
    parser.add_argument("--data", required=True, help="a data folder (unified-vl data synth / convert)")
    parser.add_argument(
        "--task", nargs="*", default=None, help="tasks to evaluate (default: every task of the data with the split)"
    )
    parser.add_argument("--split", nargs="*", default=["test"], help="splits (default: test)")
    parser.add_argument("--max-examples", type=int, default=None, help="first N records per (task, split)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--method", default="full", help="how answers are read (unified_vl.prompting; default: full)")
    parser.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option (repeatable; the value is YAML, e.g. alpha=0.5)",
    )
    parser.add_argument("--out", default=None, help="JSON file to write (default: <model>/eval_results.json)")
    args = parser.parse_args(argv)
    method_options = _method_options(args.method, args.method_option)

    import tasks

    available = storage.available(args.data)
    names = args.task or [t for t in available if t in tasks.TASKS]
    for name in names:
        if name not in tasks.TASKS:
            raise ConfigError(f"--task: unknown task {name!r}; known tasks: {', '.join(sorted(tasks.TASKS))}")
        for split in args.split:
            if split not in available.get(name, {}):
                have = ", ".join(f"{t}/{s}" for t, ss in available.items() for s in ss)
                raise ConfigError(f"{args.data} has no {name}/{split}; it has: {have}")
    model, processor = load_pretrained(args.model)
    evaluator = TaskEvaluator(
        args.data,
        names,
        batch_size=args.batch_size,
        num_beams=args.num_beams,
        method=args.method,
        method_options=method_options,
    )
    metrics: dict[str, float] = {}
    for split in args.split:
        metrics.update(evaluator.evaluate(model, processor, split=split, max_examples=args.max_examples))
    print(format_metrics(metrics))
    out = Path(args.out) if args.out else Path(args.model) / "eval_results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(args.model), "data": str(args.data), "metrics": metrics}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``unified-vl eval ...``; returns the exit status."""
    return run_main(_body, list(sys.argv[1:] if argv is None else argv))
