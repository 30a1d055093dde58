"""Records of any registered task, one JSON object per line -> that task (your own data, your own task).

Each line is a record as docs/records.md describes it, plus ``task`` (a registered task name; a task
of your own joins with ``UNIFIED_VL_TASKS=pkg.module``) and optionally ``split``::

    {"task": "vqa", "id": "q1", "image": "img/1.png", "question": "what color is it?", "answers": ["red"], "answer_type": "other"}

``image`` is a path relative to ``--images`` (default: the file's folder), or absolute, and must lie
inside that folder unless ``--allow-outside-images``; ``width`` and ``height`` are read from the image
when absent. The split is ``--split``, else the line's
``split``, else ``train``. Every record is checked against its task's field specs; a bad line
stops the conversion naming the file and the line, or with ``--skip-bad`` is skipped and listed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from data_tools.converters._common import ConversionError, Pair, Report

DESCRIPTION = "JSON Lines of records of any registered task (a 'task' key per line) -> those tasks"
INPUTS = "--input records.jsonl [more.jsonl]  [--images FOLDER the image paths are relative to]"


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    yield number, line
    except FileNotFoundError:
        raise ConversionError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise ConversionError(f"{path}: not UTF-8 text ({exc})") from None


def records(inputs: Sequence[Path], images: Sequence[Path], *, report: Report, split: str | None) -> Iterator[Pair]:
    """One record per line (see the module docstring)."""
    import tasks

    if len(images) > 1:
        raise ConversionError("jsonl: --images takes one folder (the base of relative image paths)")
    for path in inputs:
        base = images[0] if images else path.parent
        for number, line in _lines(path):
            name = f"line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                report.bad(path, name, f"not valid JSON ({exc})")
                continue
            if not isinstance(record, dict):
                report.bad(path, name, f"expected a JSON object, got {type(record).__name__}")
                continue
            task = record.pop("task", None)
            if not isinstance(task, str) or task not in tasks.TASKS:
                known = ", ".join(sorted(tasks.TASKS))
                report.bad(
                    path, name, f"'task' must name a registered task ({known}; yours: {tasks.TASKS_ENV}), got {task!r}"
                )
                continue
            line_split = record.pop("split", None)
            if line_split is not None and (not isinstance(line_split, str) or not line_split.strip()):
                report.bad(path, name, f"'split' must be a split name, got {line_split!r}")
                continue
            record_split = split or line_split or "train"
            if not isinstance(record.get("id"), str) or not record["id"]:
                report.bad(path, name, f"'id' must be a non-empty string, got {record.get('id')!r}")
                continue
            image = record.get("image")
            if not isinstance(image, str) or not image:
                report.bad(path, name, f"'image' must be a path to the image file, got {image!r}")
                continue
            file = report.confined(base, image, file=path, record=name)
            if file is None:
                continue
            stated = (record["width"], record["height"]) if "width" in record and "height" in record else None
            size = report.image(file, file=path, record=name, expected=stated)
            if size is None:
                continue
            record = {**record, "image": str(file), "width": size[0], "height": size[1]}
            if report.valid(task, record, file=path, name=name):
                yield (task, record_split), record
