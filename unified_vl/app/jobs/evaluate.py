"""``unified-vl eval``: a model folder on stored data, by generation, with the tasks' official metrics.

    unified-vl eval --model runs/pretrain-tiny/model --data ~/.cache/unified-vl/synth-... --split test
    # prints {task}/{split}/{metric} for every task of the data folder and writes them as JSON
    unified-vl eval --model M --data DIR --task vqa --split val --predictions preds.jsonl [--format vqav2]
    unified-vl eval --model runs/pretrain-tiny/model --adapter runs/finetune-vqa-.../adapter --data ... --task vqa
    # also keeps every record's prediction, its score and the gold (data_tools.predictions)

The same `TaskEvaluator` runs the periodic and final evaluation during training; the final one
writes its predictions into the run folder (``predictions/{split}.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unified_vl.app.cli import exit_2_on_bad_model_files
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

    def generate(
        self,
        model,
        processor,
        *,
        split: str,
        max_examples: int | None,
        rank: int = 0,
        world_size: int = 1,
        with_scores: bool = False,
    ):
        """``{task: [(record index, generated text)]}`` for rows ``rank::world_size`` of each task's split.

        With ``with_scores`` each row is ``(record index, text, score)``: the text's mean token
        log-probability (``unified_vl.generation.score_texts``, as the `Predictor` reports it), or
        NaN when the method reads answers its own way (its input is not the task's).
        """
        import tasks

        out: dict[str, list[tuple]] = {}
        for name in self.available(split):
            task = tasks.get_task(name)
            dataset = self.records(name, split, max_examples)
            indices = list(range(rank, len(dataset), world_size))
            rows = [dataset[i] for i in indices]
            texts = self._texts(model, processor, task, rows, split)
            if with_scores:
                scores = self._scores(model, processor, task, rows, texts)
                out[name] = list(zip(indices, texts, scores, strict=True))
            else:
                out[name] = list(zip(indices, texts, strict=True))
        return out

    def _scores(self, model, processor, task, rows, texts: list[str]) -> list[float]:
        from unified_vl.app.jobs.common import record_images
        from unified_vl.generation import score_texts

        if self.method.generate is not None:
            return [math.nan] * len(texts)
        images = [record_images(r) for r in rows]
        prompts = [task.prompt(r) for r in rows]
        return score_texts(model, processor, images, prompts, texts, batch_size=self.batch_size)

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
            sources=[task.source(r) for r in rows] if task.decoding == "phrases" else None,
            num_beams=self.num_beams,
            batch_size=self.batch_size,
        )

    def score(
        self,
        texts: dict[str, list[tuple]],
        *,
        split: str,
        max_examples: int | None,
        predictions_file: str | os.PathLike | None = None,
    ) -> dict[str, float]:
        """``{task}/{split}/{metric}`` for each task, and ``mean/{split}/primary`` over the tasks.

        With ``predictions_file`` the split's per-record predictions (:meth:`score_records`) are
        also written there, atomically.
        """
        metrics, lines = self.score_records(texts, split=split, max_examples=max_examples)
        if predictions_file is not None:
            from data_tools.predictions import write_predictions

            write_predictions(predictions_file, lines, overwrite=True)
        return metrics

    def score_records(
        self, texts: dict[str, list[tuple]], *, split: str, max_examples: int | None
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """The metrics (see :meth:`score`) and a predictions line per record (`data_tools.predictions`):
        its id, the text, the parsed prediction, the score (null without one), the gold prediction
        and the record's source ids."""
        import tasks
        from data_tools.predictions import source_ids

        metrics: dict[str, float] = {}
        lines: list[dict[str, Any]] = []
        primaries = []
        for name, rows in texts.items():
            task = tasks.get_task(name)
            dataset = self.records(name, split, max_examples, decode_images=False)  # metrics need no pixels
            rows = sorted(rows, key=lambda row: row[0])
            if [row[0] for row in rows] != list(range(len(dataset))):
                raise RuntimeError(f"{name}/{split}: got texts for {len(rows)} of {len(dataset)} records")
            records = [dataset[i] for i in range(len(dataset))]
            predictions = [task.parse(row[1], record) for row, record in zip(rows, records, strict=True)]
            result = task.evaluate(predictions, records)
            metrics.update({f"{name}/{split}/{k}": v for k, v in result.items()})
            primaries.append(result[task.primary_metric])
            for row, record, prediction in zip(rows, records, predictions, strict=True):
                line = {"id": record["id"], "task": name, "split": split, "text": row[1], "prediction": prediction}
                line |= {"score": row[2] if len(row) > 2 else math.nan, "gold": task.gold(record)}
                lines.append(line | source_ids(name, record))
        if primaries:
            metrics[f"mean/{split}/primary"] = sum(primaries) / len(primaries)
        return metrics, lines

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


def _parser() -> argparse.ArgumentParser:
    from data_tools.formats import FORMATS

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
    parser.add_argument(
        "--adapter", default=None, help="an adapter folder trained on --model: evaluate the model with it"
    )
    parser.add_argument(
        "--method",
        default=None,
        help="how answers are read (unified_vl.prompting; default: the adapter's method, else full)",
    )
    parser.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option (repeatable; the value is YAML, e.g. alpha=0.5)",
    )
    parser.add_argument(
        "--out", default=None, help="JSON file to write (default: eval_results.json in the adapter or model folder)"
    )
    parser.add_argument(
        "--predictions", default=None, help="also write every record's prediction, score and gold (JSON Lines)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --predictions or --results")
    parser.add_argument("--format", default=None, choices=list(FORMATS), help="also write this official results file")
    parser.add_argument("--results", default=None, help="the --format file (default: PREDICTIONS.<format>.json)")
    parser.add_argument("--categories", default=None, help="coco_detection: a COCO annotation file with 'categories'")
    return parser


def _output_paths(args) -> Path | None:
    """Checks --predictions and --results before any work; the --format file's path."""
    from data_tools.formats import load_categories
    from data_tools.predictions import check_new_output
    from unified_vl.engine.config import ConfigError

    if args.predictions is not None:
        check_new_output(args.predictions, overwrite=args.overwrite)
    if args.format is None:
        if args.results or args.categories:
            raise ConfigError("--results and --categories go with --format")
        return None
    if args.results is None and args.predictions is None:
        raise ConfigError(f"--format {args.format} needs --results FILE (or --predictions FILE to name it after)")
    results = Path(args.results) if args.results else Path(args.predictions).with_suffix(f".{args.format}.json")
    check_new_output(results, overwrite=args.overwrite)
    if args.categories:
        load_categories(args.categories)
    return results


def _check_format_inputs(args, names: Sequence[str]) -> None:
    """--format fails before the model runs when the records lack the source ids it keys on."""
    from data_tools import storage
    from data_tools.formats import FORMATS, check_inputs, load_categories
    from data_tools.predictions import PredictionsError, source_ids
    from unified_vl.engine.config import ConfigError

    task = FORMATS[args.format].task
    stubs = []
    for split in args.split if task in names else []:
        dataset = storage.load_split(args.data, task, split, decode_images=False).remove_columns("image")
        if args.max_examples is not None and len(dataset) > args.max_examples:
            dataset = dataset.select(range(args.max_examples))
        stubs += [{"id": r["id"], "task": task, "split": split, **source_ids(task, r)} for r in dataset]
    categories = load_categories(args.categories) if args.categories else None
    try:
        check_inputs(args.format, stubs, categories=categories, source=f"--data {args.data}")
    except PredictionsError as exc:
        raise ConfigError(str(exc)) from None


def _evaluate_splits(evaluator: TaskEvaluator, model, processor, args) -> tuple[dict[str, float], list[dict]]:
    """Metrics of every split, and the predictions lines when --predictions or --format asks for them."""
    keep = args.predictions is not None or args.format is not None
    metrics: dict[str, float] = {}
    lines: list[dict] = []
    for split in args.split:
        if not keep:
            metrics.update(evaluator.evaluate(model, processor, split=split, max_examples=args.max_examples))
            continue
        model.eval()
        texts = evaluator.generate(
            model, processor, split=split, max_examples=args.max_examples, with_scores=args.predictions is not None
        )
        split_metrics, split_lines = evaluator.score_records(texts, split=split, max_examples=args.max_examples)
        metrics.update(split_metrics)
        lines += split_lines
    return metrics, lines


def _keep_predictions(args, lines: list[dict], results: Path | None) -> None:
    from data_tools.formats import build_results, load_categories, write_results
    from data_tools.predictions import write_predictions

    if args.predictions is not None:
        print(
            f"wrote {len(lines)} predictions to {write_predictions(args.predictions, lines, overwrite=args.overwrite)}"
        )
    if results is not None:
        categories = load_categories(args.categories) if args.categories else None
        entries, dropped = build_results(lines, args.format, categories=categories, source="the evaluated records")
        write_results(results, entries, overwrite=args.overwrite)
        print(f"wrote {len(entries)} {args.format} results to {results}")
        if dropped:
            print(f"left out {sum(dropped.values())} boxes whose label is no COCO category: {dict(dropped)}")


def _body(argv: Sequence[str]) -> int:
    from data_tools import storage
    from data_tools.predictions import PredictionsError
    from unified_vl.adapters import apply_adapter, base_identity, check_base, read_adapter
    from unified_vl.checkpoint import load_pretrained
    from unified_vl.engine.config import ConfigError

    args = _parser().parse_args(argv)
    adapter = read_adapter(args.adapter) if args.adapter else None
    method = args.method or (adapter.method if adapter else "full")
    if adapter is not None and method == adapter.method and not args.method_option:
        method_options = adapter.options  # read answers as the adapter was trained to
    else:
        method_options = _method_options(method, args.method_option)
    try:
        results = _output_paths(args)
    except PredictionsError as exc:
        raise ConfigError(str(exc)) from None

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
    if args.format is not None:
        _check_format_inputs(args, names)
    model, processor = load_pretrained(args.model)
    if adapter is not None:
        check_base(adapter, base_identity(args.model, model.config))
        apply_adapter(model, adapter)
    evaluator = TaskEvaluator(
        args.data,
        names,
        batch_size=args.batch_size,
        num_beams=args.num_beams,
        method=method,
        method_options=method_options,
    )
    metrics, lines = _evaluate_splits(evaluator, model, processor, args)
    print(format_metrics(metrics))
    out = Path(args.out) if args.out else Path(args.adapter or args.model) / "eval_results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"model": str(args.model), "adapter": args.adapter, "data": str(args.data), "metrics": metrics}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    try:
        _keep_predictions(args, lines, results)
    except PredictionsError as exc:  # a record without the source ids --format needs
        raise ConfigError(str(exc)) from None
    return 0


@exit_2_on_bad_model_files
def main(argv: Sequence[str] | None = None) -> int:
    """``unified-vl eval ...``; returns the exit status."""
    return run_main(_body, list(sys.argv[1:] if argv is None else argv))
