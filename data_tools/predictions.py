"""Predictions files: one JSON object per line per input, written so that a kill leaves a usable file.

    {"id": "420", "task": "vqa", "split": "val", "text": "red", "prediction": "red", "score": -0.01, "question_id": 420}

Every line has ``id`` (the record id, the image's path in its folder, or the request's id), ``task``,
``text`` (what the model wrote, location tokens kept), ``prediction`` (the task's parse of it; null
when it parses to nothing) and ``score`` (the mean log-probability per token of ``text``; null when
it was not computed). Lines may add ``split``, ``image``, ``gold`` (evaluation: what a perfect model
predicts) and the record's source ids (``question_id``, ``image_id``, ...; docs/records.md), which
the official results formats (`data_tools.formats`) read. ``unified-vl predict`` and
``unified-vl eval --predictions`` write them; ``unified-vl data show --predictions`` draws them.

Writing (:class:`PredictionsWriter`): lines are appended a batch at a time, one ``write`` of whole
lines, then ``fsync``, so an interrupted run leaves every finished batch on disk. Only a kill
during a write (SIGKILL, a power cut) can leave an incomplete last line: readers refuse it with a
message that says so, and ``open(..., resume=True)`` cuts it off before continuing. Whole files
(evaluation) are written atomically with :func:`write_predictions`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

REQUIRED_KEYS = ("id", "task", "text", "prediction", "score")


class PredictionsError(ValueError):
    """A predictions file that cannot be read or written as asked; the message names the file and line."""


def _plain(value: Any) -> Any:
    """JSON-ready data: tuples as lists, NaN and infinities as null (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def encode_line(line: Mapping[str, Any]) -> str:
    """One predictions line as strict JSON with its newline.

    Raises:
        PredictionsError: a required key is missing or ``id``/``task`` is not a string.
    """
    missing = [key for key in REQUIRED_KEYS if key not in line]
    if missing:
        raise PredictionsError(
            f"a predictions line needs {list(REQUIRED_KEYS)}; {missing} missing in {dict(line)!r:.200}"
        )
    for key in ("id", "task"):
        if not isinstance(line[key], str):
            raise PredictionsError(f"a predictions line's {key!r} must be a string, got {line[key]!r}")
    return json.dumps(_plain(line), ensure_ascii=False, allow_nan=False) + "\n"


def source_ids(task_name: str, record: Mapping[str, Any]) -> dict[str, int]:
    """The record's source ids (its task's fields of role ``"source"``) that are set, for a predictions line."""
    import tasks

    fields = tasks.get_task(task_name).fields
    return {
        name: record[name] for name, spec in fields.items() if spec.role == "source" and record.get(name) is not None
    }


def _parse_line(text: str, *, path: Path, number: int) -> dict:
    try:
        line = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PredictionsError(f"{path}: line {number} is not valid JSON ({exc})") from None
    if not isinstance(line, dict):
        raise PredictionsError(f"{path}: line {number} must be a JSON object, got {type(line).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in line]
    if missing:
        raise PredictionsError(f"{path}: line {number} lacks {missing} (a predictions line has {list(REQUIRED_KEYS)})")
    if not isinstance(line["id"], str) or not isinstance(line["task"], str):
        raise PredictionsError(f"{path}: line {number}: 'id' and 'task' must be strings")
    return line


def _split_complete(data: bytes) -> tuple[list[bytes], bytes]:
    """The complete lines of a file's bytes and the incomplete tail after the last newline."""
    cut = data.rfind(b"\n") + 1
    return data[:cut].splitlines(), data[cut:]


def _parse_all(path: Path, lines: Iterable[bytes]) -> list[dict]:
    out, seen = [], {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PredictionsError(f"{path}: line {number} is not UTF-8 text ({exc})") from None
        line = _parse_line(text, path=path, number=number)
        key = (line["task"], line.get("split"), line["id"])
        if key in seen:
            raise PredictionsError(
                f"{path}: line {number} repeats id {line['id']!r} of task {line['task']!r} (first on line {seen[key]})"
            )
        seen[key] = number
        out.append(line)
    return out


def read_predictions(path: str | os.PathLike) -> list[dict]:
    """Every line of a predictions file, checked.

    Raises:
        PredictionsError: no such file, a line that is not a predictions line, a repeated
            (task, split, id), or an incomplete last line (a run killed while writing).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PredictionsError(f"{path}: file not found") from None
    complete, tail = _split_complete(data)
    if tail.strip():
        raise PredictionsError(
            f"{path}: line {len(complete) + 1} is incomplete: the run writing it was killed; "
            "run the same `unified-vl predict` command with --resume to finish the file"
        )
    return _parse_all(path, complete)


def check_new_output(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """``path``, after refusing an existing file unless ``overwrite``.

    Raises:
        PredictionsError: the file exists (the message says how to continue or replace it).
    """
    path = Path(path)
    if path.is_dir():
        raise PredictionsError(f"{path} is a folder; give a file name for the output")
    if path.exists() and not overwrite:
        raise PredictionsError(f"{path} exists; pass --overwrite to replace it (or --resume to continue it)")
    return path


class PredictionsWriter:
    """Appends predictions lines to a file, a batch at a time (see the module docstring).

    Use :meth:`open`; ``done`` holds the lines already in the file when resuming.
    """

    def __init__(self, path: Path, fd: int, done: list[dict]):
        self.path, self._fd, self.done = path, fd, done

    @classmethod
    def open(cls, path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> PredictionsWriter:
        """Opens ``path`` for appending.

        Args:
            path: the predictions file.
            resume: continue an existing file: its lines are read into ``done`` and an
                incomplete last line (a kill during a write) is cut off.
            overwrite: replace an existing file. Without ``resume`` or ``overwrite`` an existing
                file is refused.

        Raises:
            PredictionsError: the file exists (neither flag), or a complete line in it is bad.
        """
        path = Path(path)
        if resume and overwrite:
            raise PredictionsError("give --resume or --overwrite, not both")
        if not (resume and path.exists()):
            check_new_output(path, overwrite=overwrite)
            path.parent.mkdir(parents=True, exist_ok=True)
            return cls(path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644), [])
        data = path.read_bytes()
        complete, tail = _split_complete(data)
        done = _parse_all(path, complete)  # a bad complete line is an error, never cut off
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        if tail:
            os.ftruncate(fd, len(data) - len(tail))
            os.fsync(fd)
        return cls(path, fd, done)

    def write(self, lines: Iterable[Mapping[str, Any]]) -> None:
        """Appends ``lines`` (one ``write`` call for all of them) and syncs them to disk."""
        data = "".join(encode_line(line) for line in lines).encode("utf-8")
        view = memoryview(data)
        while view:  # a regular file takes it in one call unless the disk fills up
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> PredictionsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_predictions(path: str | os.PathLike, lines: Iterable[Mapping[str, Any]], *, overwrite: bool = False) -> Path:
    """Writes a whole predictions file atomically (a temporary file renamed into place).

    Raises:
        PredictionsError: ``path`` exists and ``overwrite`` is False, or a line lacks a required key.
    """

    def write(f) -> None:
        for line in lines:
            f.write(encode_line(line))

    return write_atomically(check_new_output(path, overwrite=overwrite), write)


def write_atomically(path: Path, write: Callable[[Any], None]) -> Path:
    """``write(f)`` fills a temporary sibling text file (UTF-8), synced, then renamed onto ``path``.

    A crash leaves the old file or the new one, never a half-written one. (``data_tools`` sits above
    ``unified_vl`` in the layers, so it keeps this file-level twin of ``unified_vl.checkpoint``'s.)
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; predictions and results files are for sharing
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
