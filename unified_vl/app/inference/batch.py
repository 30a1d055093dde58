"""Batch prediction: many inputs through the `Predictor`, one predictions line each (``unified-vl predict``).

    unified-vl predict --model M --data DIR --task vqa --split val --predictions preds.jsonl [--format vqav2]
    unified-vl predict --model M --images photos/ --task captioning --predictions captions.jsonl
    unified-vl predict --model M --images 'photos/*.jpg' --task vqa --text "what is this?" --predictions p.jsonl
    unified-vl predict --model M --requests requests.jsonl --task rec --predictions boxes.jsonl --resume

Inputs, each with an id that the predictions file keys on:

* a data folder split (``--data --split``): the stored records; id = the record id; the task's input
  fields and source ids come from the record; a ``"candidates"`` task is constrained to the labels
  of the data's train split, as evaluation does, so a served answer equals an evaluated one;
* a folder (recursively, symbolic links not followed) or a glob of image files with one
  instruction (``--images``, ``--text``): id = the file's path relative to the folder (or as the glob
  matched it); COCO file names (``COCO_val2014_000000391895.jpg``, ``000000397133.jpg``) give the
  record's ``image_id``, which the COCO results formats key on;
* a JSON Lines file of requests (``--requests``): one object per line with ``image`` (a path,
  relative to the file's folder or absolute), the task's input fields, optionally ``id`` (default:
  the line number) and the task's source ids (``question_id``, ...). Every line is checked before
  the first prediction; a bad one is an error naming its line.

The inputs run ``batch_size`` at a time through :meth:`Predictor.query` and :meth:`Predictor.run`,
the same calls as ``Predictor.predict`` and the server, while a thread loads the next batch's
images. Each batch's lines are appended and synced (`data_tools.predictions`), so an interrupted
run keeps every finished batch; ``--resume`` skips the ids already in the file and appends the
rest, in input order, without duplicates or gaps. Ctrl-C or SIGTERM stops after the batch in flight.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# COCO image file names: "COCO_val2014_000000391895.jpg" (2014) or "000000397133.jpg" (2017).
COCO_FILE_NAME = re.compile(r"^(?:COCO_[A-Za-z-]+\d{4}_)?(\d{12})$")


class BatchInputError(ValueError):
    """An input that cannot be predicted; the message names its line, file or record."""


@dataclass(frozen=True)
class Item:
    """One input: its id, how to get its image and task fields, and what its line carries besides.

    Attributes:
        id: what the predictions line is keyed by (unique among the inputs).
        where: the input in words, for error messages ("requests.jsonl line 3").
        load: ``load() -> (image, task input fields)``; called in the loading thread.
        extra: keys added to the predictions line (``split``, ``image``, source ids).
    """

    id: str
    where: str
    load: Callable[[], tuple[Any, dict[str, Any]]]
    extra: dict[str, Any] = field(default_factory=dict)


# -- inputs --------------------------------------------------------------------------------------
def data_items(data_dir: str, task_name: str, split: str) -> list[Item]:
    """The records of ``task_name``/``split`` in a data folder, images decoded when loaded."""
    from data_tools import storage
    from data_tools.predictions import source_ids
    from unified_vl.app.inference.predictor import input_fields
    from unified_vl.app.jobs.common import record_images

    dataset = storage.load_split(data_dir, task_name, split)
    names = input_fields(task_name)
    meta = storage.load_split(data_dir, task_name, split, decode_images=False).remove_columns("image")

    def loader(index: int):
        def load():
            record = dataset[index]
            image = record_images(record)  # a text-only record comes with no image, as in evaluation
            return image, {n: record[n] for n in names if record.get(n) is not None}

        return load

    return [
        Item(
            id=record["id"],
            where=f"record {record['id']!r} of {data_dir} {task_name}/{split}",
            load=loader(i),
            extra={"split": split, **source_ids(task_name, record)},
        )
        for i, record in enumerate(meta)
    ]


def _image_files(spec: str) -> list[tuple[str, Path]]:
    """``(id, path)`` of the image files of a folder (recursively) or a glob, sorted."""
    from data_tools.converters.imagefolder import IMG_EXTENSIONS

    root = Path(spec)
    if root.is_dir():
        found = []
        for folder, dirs, files in os.walk(root):  # followlinks=False: a link loop cannot recurse
            dirs.sort()
            found += [Path(folder) / f for f in sorted(files) if Path(f).suffix.lower() in IMG_EXTENSIONS]
        pairs = [(p.relative_to(root).as_posix(), p) for p in found]
    else:
        matches = sorted(glob.glob(spec, recursive=True))
        pairs = [(m, Path(m)) for m in matches if Path(m).is_file() and Path(m).suffix.lower() in IMG_EXTENSIONS]
    if not pairs:
        raise BatchInputError(f"--images {spec}: no image files found (looked for {', '.join(IMG_EXTENSIONS)})")
    return pairs


def image_items(spec: str, task_name: str, inputs: Mapping[str, Any]) -> list[Item]:
    """One item per image file of a folder or glob, all with the same task inputs."""
    import tasks
    from unified_vl.app.inference.predictor import GENERATE

    has_image_id = task_name != GENERATE and "image_id" in tasks.get_task(task_name).fields
    items = []
    for rid, path in _image_files(spec):
        coco = COCO_FILE_NAME.match(path.stem)
        extra: dict[str, Any] = {"image": str(path)}
        if has_image_id and coco is not None:
            extra["image_id"] = int(coco.group(1))
        items.append(Item(id=rid, where=str(path), load=lambda p=path: (p, dict(inputs)), extra=extra))
    return items


def _request_item(line: Any, *, number: int, path: Path, task_name: str, allowed: set[str], sources: set[str]) -> Item:
    where = f"{path} line {number}"
    if not isinstance(line, dict):
        raise BatchInputError(f"{where}: expected a JSON object, got {type(line).__name__}")
    unknown = sorted(set(line) - allowed)
    if unknown:
        raise BatchInputError(f"{where}: unknown field(s) {unknown}; a {task_name} request has {sorted(allowed)}")
    image = line.get("image")
    if not isinstance(image, str) or not image:
        raise BatchInputError(f"{where}: 'image' must be the path of the image file, got {image!r}")
    file = (path.parent / image).resolve()
    if not file.is_file():
        raise BatchInputError(f"{where}: image file {str(file)!r} does not exist")
    rid = line.get("id", str(number))
    if not isinstance(rid, str) or not rid:
        raise BatchInputError(f"{where}: 'id' must be a non-empty string, got {rid!r}")
    inputs = {k: v for k, v in line.items() if k not in sources and k not in ("id", "image")}
    extra: dict[str, Any] = {"image": str(file)}
    for name in sorted(sources & set(line)):
        value = line[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BatchInputError(f"{where}: {name!r} must be an integer >= 0 (the source dataset's id), got {value!r}")
        extra[name] = value
    return Item(id=rid, where=f"{where} (id {rid!r})", load=lambda: (file, inputs), extra=extra)


def request_items(path: str | os.PathLike, task_name: str) -> list[Item]:
    """The requests of a JSON Lines file, all checked (see the module docstring)."""
    import tasks
    from unified_vl.app.inference.predictor import GENERATE, input_fields

    path = Path(path)
    task = None if task_name == GENERATE else tasks.get_task(task_name)
    sources = {name for name, spec in task.fields.items() if spec.role == "source"} if task else set()
    required = set(task.required_fields(inputs_only=True)) if task else {"prompt"}
    allowed = {"id", "image", *input_fields(task_name), *sources}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BatchInputError(f"--requests {path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise BatchInputError(f"--requests {path}: not UTF-8 text ({exc})") from None
    items, first_line = [], {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise BatchInputError(f"{path} line {number}: not valid JSON ({exc})") from None
        item = _request_item(line, number=number, path=path, task_name=task_name, allowed=allowed, sources=sources)
        lacking = sorted(n for n in required - {"width", "height"} if line.get(n) is None)
        if lacking:
            raise BatchInputError(f"{path} line {number}: missing field(s) {lacking} that a {task_name} request needs")
        if item.id in first_line:
            raise BatchInputError(f"{path} line {number}: id {item.id!r} repeats line {first_line[item.id]}")
        first_line[item.id] = number
        items.append(item)
    if not items:
        raise BatchInputError(f"--requests {path}: no requests in the file")
    return items


# -- running -------------------------------------------------------------------------------------
class _StopRequest:
    """Ctrl-C and SIGTERM ask to stop after the batch in flight (a second Ctrl-C stops at once)."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after the batch in flight (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> _StopRequest:
        import threading

        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def check_resumable(done: Sequence[Mapping[str, Any]], items: Sequence[Item], *, task: str, path: Path) -> set[str]:
    """The ids already predicted, after checking that the file's lines belong to these inputs.

    Raises:
        BatchInputError: a line of another task or of an id that is not among the inputs.
    """
    ids = {item.id for item in items}
    for line in done:
        if line["task"] != task or line["id"] not in ids:
            raise BatchInputError(
                f"{path} holds a {line['task']} prediction for id {line['id']!r}, which is not among these inputs: "
                "is it the output of another run? Give another --predictions file, or --overwrite to replace it"
            )
    return {line["id"] for line in done}


def _batches(items: Sequence[Item], size: int) -> Iterator[Sequence[Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _queries(predictor, task: str, batch: Sequence[Item], options: Mapping[str, Any]) -> list:
    """The batch's queries (images loaded, resized, inputs checked); runs in the loading thread."""
    from unified_vl.app.inference.predictor import InputError
    from unified_vl.processor import ImageLoadError

    queries = []
    for item in batch:
        try:
            image, inputs = item.load()
            queries.append(predictor.query(task, image, inputs, **options))
        except (InputError, ImageLoadError, OSError) as exc:
            raise BatchInputError(f"{item.where}: {exc}") from None
    return queries


def _line(task: str, item: Item, result) -> dict[str, Any]:
    return {
        "id": item.id,
        "task": task,
        **{k: v for k, v in item.extra.items() if k in ("split", "image")},
        "text": result.text,
        "prediction": result.prediction,
        "score": result.score,
        **{k: v for k, v in item.extra.items() if k not in ("split", "image")},
    }


@dataclass
class BatchReport:
    """What a batch run did: predictions written now, already there, and the time they took."""

    written: int = 0
    skipped: int = 0
    seconds: float = 0.0
    stopped: bool = False

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def predict_batch(predictor, task: str, items: Sequence[Item], writer, *, options: Mapping[str, Any]) -> BatchReport:
    """Predicts every item whose id is not in the writer's file yet, appending a line per item.

    Args:
        predictor: a :class:`~unified_vl.app.inference.predictor.Predictor` (its ``batch_size``
            sets the batch).
        task: the task (or ``"generate"``).
        items: the inputs, ids unique.
        writer: a `data_tools.predictions.PredictionsWriter`; its ``done`` lines are skipped.
        options: keyword options of :meth:`Predictor.query` (candidates, labels, generation).

    Raises:
        BatchInputError: an input that cannot be read or predicted (the lines before it are kept).
    """
    from tqdm.auto import tqdm

    from unified_vl.engine.monitor import progress_interval

    done = check_resumable(writer.done, items, task=task, path=writer.path)
    todo = [item for item in items if item.id not in done]
    report = BatchReport(skipped=len(items) - len(todo))
    bar = tqdm(total=len(todo), unit="img", desc="predict", mininterval=progress_interval(sys.stderr), file=sys.stderr)
    start = time.perf_counter()
    with _StopRequest() as stop, ThreadPoolExecutor(max_workers=1) as loader, bar:
        batches = list(_batches(todo, predictor.batch_size))
        pending = loader.submit(_queries, predictor, task, batches[0], options) if batches else None
        for k, batch in enumerate(batches):
            try:
                queries = pending.result()
            except BatchInputError as exc:
                raise BatchInputError(
                    f"{exc}\nthe {report.written} predictions before it are in {writer.path}; "
                    "fix the input and run the same command with --resume"
                ) from None
            if k + 1 < len(batches):  # load the next batch's images while this one runs
                pending = loader.submit(_queries, predictor, task, batches[k + 1], options)
            results = predictor.run(queries)
            failed = next((r for r in results if isinstance(r, Exception)), None)
            if failed is not None:
                raise RuntimeError(f"prediction failed for {batch[0].where} and its batch: {failed}") from failed
            writer.write([_line(task, item, result) for item, result in zip(batch, results, strict=True)])
            report.written += len(batch)
            bar.update(len(batch))
            if stop.requested:
                report.stopped = True
                break
    report.seconds = time.perf_counter() - start
    return report


# -- the command ---------------------------------------------------------------------------------
def _items(args, inputs: Mapping[str, Any]) -> list[Item]:
    if args.data is not None:
        return data_items(args.data, args.task, args.split)
    if args.images is not None:
        return image_items(args.images, args.task, inputs)
    return request_items(args.requests, args.task)


def _data_candidates(args, options: dict[str, Any]) -> None:
    """A ``"candidates"`` task on a data folder reads its candidates as evaluation does (the train split's labels)."""
    import tasks
    from unified_vl.app.inference.predictor import GENERATE

    if args.data is None or args.task == GENERATE or options.get("candidates") or options.get("labels"):
        return
    task = tasks.get_task(args.task)
    if task.decoding == "candidates":
        from unified_vl.app.jobs.evaluate import TaskEvaluator

        options["candidates"] = TaskEvaluator(args.data, [args.task]).candidates(task, args.split)


def _source(args) -> str:
    return (
        f"--data {args.data}"
        if args.data
        else f"--images {args.images}"
        if args.images
        else f"--requests {args.requests}"
    )


def _results_path(args) -> Path | None:
    if args.format is None:
        return None
    return Path(args.results) if args.results else Path(args.predictions).with_suffix(f".{args.format}.json")


def _check_args(args) -> None:
    if args.predictions is None:
        raise BatchInputError("--data, --images and --requests write their predictions to --predictions FILE.jsonl")
    if args.text is not None and args.images is None:
        raise BatchInputError("--text applies to --images (records and requests carry their own fields)")
    if args.top_k != 1:
        raise BatchInputError("--top-k applies to one --image; a predictions line holds the best label")
    if args.out is not None:
        raise BatchInputError("--out draws one --image; `unified-vl data show --predictions` draws many")
    if args.format is None and (args.results or args.categories):
        raise BatchInputError("--results and --categories go with --format")


def write_official_results(args, predictions: Path, results: Path) -> None:
    """``--format``: the official results file from the (complete) predictions file."""
    from data_tools.formats import build_results, load_categories, write_results
    from data_tools.predictions import read_predictions

    categories = load_categories(args.categories) if args.categories else None
    entries, dropped = build_results(
        read_predictions(predictions), args.format, categories=categories, source=str(predictions)
    )
    write_results(results, entries, overwrite=True)  # refused earlier unless new or --overwrite
    print(f"wrote {len(entries)} {args.format} results to {results}", file=sys.stderr)
    if dropped:
        listed = ", ".join(f"{label!r} x{n}" for label, n in dropped.most_common(10))
        print(f"left out {sum(dropped.values())} boxes whose label is no COCO category: {listed}", file=sys.stderr)


def batch_main(args, inputs: Mapping[str, Any], options: dict[str, Any]) -> int:
    """``unified-vl predict`` with --data, --images or --requests; returns the exit status."""
    from data_tools.formats import check_inputs, load_categories
    from data_tools.predictions import PredictionsError, PredictionsWriter, check_new_output
    from data_tools.storage import StorageError
    from unified_vl.app.inference.cli import parse_adapters
    from unified_vl.app.inference.predictor import Predictor
    from unified_vl.checkpoint import CheckpointError

    try:
        _check_args(args)
        items = _items(args, inputs)  # every input checked before the model loads
        _data_candidates(args, options)
        results = _results_path(args)
        if results is not None:
            check_new_output(results, overwrite=args.overwrite or args.resume)
            categories = load_categories(args.categories) if args.categories else None
            stubs = [{"id": item.id, "task": args.task, **item.extra} for item in items]
            check_inputs(args.format, stubs, categories=categories, source=_source(args))
        with PredictionsWriter.open(args.predictions, resume=args.resume, overwrite=args.overwrite) as writer:
            check_resumable(writer.done, items, task=args.task, path=writer.path)
            adapters = parse_adapters([args.adapter] if args.adapter else None)
            predictor = Predictor.from_pretrained(
                args.model, device=args.device, dtype=args.dtype, adapters=adapters, batch_size=args.batch_size
            )
            options = {**options, "adapter": next(iter(adapters), None)}  # the adapter answers every input
            report = predict_batch(predictor, args.task, items, writer, options=options)
        print(
            f"{report.written} predictions in {report.seconds:.2f} s ({report.images_per_s:.1f} images/s), "
            f"{report.skipped} already there -> {args.predictions}",
            file=sys.stderr,
        )
        if report.stopped:
            print("stopped early; the same command with --resume continues", file=sys.stderr)
            return 130
        if results is not None:
            write_official_results(args, Path(args.predictions), results)
    except (BatchInputError, PredictionsError, StorageError, CheckpointError, FileNotFoundError) as exc:
        print(f"unified-vl predict: error: {exc}", file=sys.stderr)
        return 2
    return 0
