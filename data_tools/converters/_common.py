"""What every converter shares: bad-input reporting, image checks, box conversion, the run loop.

A converter module (``data_tools/converters/<source>.py``, named after the source dataset) defines

* ``DESCRIPTION``: one line for ``--help``;
* ``INPUTS``: what ``--input`` and ``--images`` mean for it;
* ``records(inputs, images, *, report, split) -> iterator of ((task, split), record)``.

:func:`convert` runs one: it streams the records into `data_tools.storage.write_dataset` (nothing is
complete until the manifest is written last), prints per-task, per-split counts and records/s, and
lists skipped records.

Bad input policy: a problem with one record (missing or unreadable image, box outside the image,
empty caption or question, an annotation without a required key) stops the conversion with a
:class:`ConversionError` naming the file and the record, unless ``skip_bad`` is set; then the record
is skipped, counted and listed in the summary and the manifest. A problem with a whole file (not
JSON, missing top-level keys) always stops. Legitimate drops that the source's protocol asks for
(e.g. Flickr30k Entities phrases without a box) are counted in ``notes``. Nothing is dropped silently.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from tasks.boxes import BoxError, validate_box

# COCO boxes come from polygon coordinates and can overshoot the image border by a fraction of a
# pixel; an overshoot below this many pixels is clamped to the border, anything more is a bad box.
BORDER_TOLERANCE = 1.0
SUMMARY_LIST_LIMIT = 20  # skipped records listed on screen (the manifest lists them all)

Pair = tuple[tuple[str, str], dict]


class ConversionError(ValueError):
    """Bad input; the message names the file and the record."""


def _where(file: str | os.PathLike, record: str | None) -> str:
    return f"{file}: {record}" if record else f"{file}"


class ImageChecker:
    """Opens each image once (results cached by path) and returns its size or why it is bad.

    By default only the header is read (fast: size and format), which catches missing files, files
    that are not images and zero-byte files. ``decode=True`` decodes every image fully, which also
    catches truncated files, at the cost of a full decode per image.
    """

    def __init__(self, *, decode: bool = False):
        self.decode = decode
        self._cache: dict[str, tuple[int, int] | str] = {}

    def check(self, path: str | os.PathLike) -> tuple[int, int] | str:
        """``(width, height)``, or a reason string when the image cannot be used."""
        key = os.fspath(path)
        if key not in self._cache:
            self._cache[key] = self._check(key)
        return self._cache[key]

    def _check(self, path: str) -> tuple[int, int] | str:
        if not os.path.isfile(path):
            return f"image file not found: {path}"
        try:
            with Image.open(path) as image:
                size = image.size
                if self.decode:
                    image.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            return f"unreadable or corrupt image {path}: {exc}"
        return size


class Report:
    """Collects skipped records and notes of one conversion; raises instead when not skipping."""

    def __init__(self, *, skip_bad: bool = False, verify_images: bool = False, confine_images: bool = True):
        self.skip_bad = skip_bad
        self.confine_images = confine_images
        self.skipped: list[dict[str, str]] = []
        self.notes: Counter[str] = Counter()
        self.images = ImageChecker(decode=verify_images)

    def bad(self, file: str | os.PathLike, record: str | None, reason: str) -> None:
        """A bad record: raise :class:`ConversionError`, or (``skip_bad``) count and list it.

        The caller skips the record after this returns.
        """
        if not self.skip_bad:
            raise ConversionError(
                f"{_where(file, record)}: {reason} (rerun with --skip-bad to skip such records and list them)"
            )
        self.skipped.append({"file": os.fspath(file), "record": record or "", "reason": reason})

    def note(self, what: str, count: int = 1) -> None:
        """Counts a legitimate, protocol-defined drop (shown in the summary and the manifest)."""
        self.notes[what] += count

    def valid(self, task: str, record: dict, *, file: str | os.PathLike, name: str) -> bool:
        """Whether ``record`` meets the task's contract (``tasks.get_task(task).validate``); reports it if not."""
        import tasks

        try:
            tasks.get_task(task).validate(record)
        except tasks.RecordError as exc:
            self.bad(file, name, str(exc))
            return False
        return True

    def confined(self, root: Path, name: str, *, file: str | os.PathLike, record: str) -> Path | None:
        """``root/name`` resolved (symlinks followed), or None after reporting that it leaves ``root``.

        An annotation file names image paths; ``../../x`` or an absolute path would let it reach (and,
        with ``--embed-images``, copy) any file of the machine. Unless the user opts out
        (``--allow-outside-images``), the real path must lie inside the real ``root``.
        """
        try:
            path = (root / name).resolve()
        except (OSError, ValueError) as exc:  # a NUL byte, a name too long, a symlink loop
            self.bad(file, record, f"image path {name!r} is not a usable path ({exc})")
            return None
        if self.confine_images and not path.is_relative_to(root.resolve()):
            self.bad(
                file,
                record,
                f"image path {name!r} leads outside the images folder {root} (to {path}); "
                "pass --allow-outside-images to allow paths outside it",
            )
            return None
        return path

    def image(
        self,
        path: str | os.PathLike,
        *,
        file: str | os.PathLike,
        record: str,
        expected: tuple[int, int] | None = None,
    ) -> tuple[int, int] | None:
        """Size of a record's image, or None after reporting why it is bad.

        Args:
            path: the image file.
            file: the annotation file the record comes from (for the message).
            record: the record's name (for the message).
            expected: ``(width, height)`` the annotation states; a different file size is bad (the
                boxes would be in another coordinate frame).
        """
        result = self.images.check(path)
        if isinstance(result, str):
            self.bad(file, record, result)
            return None
        if expected is not None and tuple(expected) != tuple(result):
            self.bad(
                file,
                record,
                f"annotation says the image is {expected[0]}x{expected[1]} but {path} is {result[0]}x{result[1]}",
            )
            return None
        return result

    def box(
        self, box: Sequence[float], width: int, height: int, *, file: str | os.PathLike, record: str
    ) -> list[float] | None:
        """A ``[x1, y1, x2, y2]`` box checked against the image (sub-pixel overshoot clamped), or None."""
        try:
            values = [float(v) for v in box]
        except (TypeError, ValueError):
            values = None
        if values is None or len(values) != 4:
            self.bad(file, record, f"expected a box of four numbers, got {box!r}")
            return None
        x1, y1, x2, y2 = values
        if (
            -BORDER_TOLERANCE < x1 < 0
            or -BORDER_TOLERANCE < y1 < 0
            or width < x2 < width + BORDER_TOLERANCE
            or height < y2 < height + BORDER_TOLERANCE
        ):
            values = [max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)]
        try:
            return validate_box(values, width, height, what="box")
        except BoxError as exc:
            self.bad(file, record, str(exc))
            return None


def source_id(value: Any) -> int | None:
    """A source dataset's id kept on the record (``tasks.source_id_field``): an int >= 0, else None.

    The record's own ``id`` is always kept as text; a source id that is not a plain integer is
    left out, and the official results formats that need it say so per record.
    """
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _unique_ids(pairs: Iterable[Pair], report: Report) -> Iterator[Pair]:
    """Records whose id is new in their (task, split); a repeated id is a bad record (records.md: ids are unique)."""
    seen: set[tuple[str, str, object]] = set()
    for (task, split), record in pairs:
        rid = record.get("id")
        key = (task, split, rid if isinstance(rid, str) else repr(rid))
        if key in seen:
            report.bad(f"{task}/{split}", f"id {record.get('id')!r}", "the id is used by an earlier record")
            continue
        seen.add(key)
        yield (task, split), record


def xywh_to_xyxy(box: Sequence[float]) -> list[float]:
    """COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]`` (DESIGN.md §3)."""
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]


def load_json(path: str | os.PathLike) -> Any:
    """A JSON file; an unreadable or invalid file is a :class:`ConversionError` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc})") from None


def require_keys(obj: Any, keys: Iterable[str], *, file: str | os.PathLike, what: str) -> None:
    """Whole-file structure check: ``obj`` is a dict holding ``keys`` (else a fatal error)."""
    if not isinstance(obj, dict):
        raise ConversionError(f"{file}: expected {what} to be a JSON object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ConversionError(f"{file}: {what} is missing key(s) {missing}; is this the right file?")


def missing_keys(obj: Any, keys: Iterable[str]) -> list[str]:
    """Keys of ``keys`` that ``obj`` (a dict) lacks; all of them if ``obj`` is not a dict."""
    return [k for k in keys if not isinstance(obj, dict) or k not in obj]


def find_image(roots: Sequence[Path], name: str | os.PathLike, *subdirs: str) -> Path:
    """The first existing ``root/name`` or ``root/subdir/name``; else ``roots[0]/name`` (reported missing later)."""
    for root in roots:
        for sub in ("", *subdirs):
            candidate = root / sub / name if sub else root / name
            if candidate.is_file():
                return candidate.resolve()
    return (roots[0] / name).resolve() if roots else Path(name).resolve()


def images_per_input(images: Sequence[Path], n_inputs: int, source: str) -> list[list[Path]]:
    """``--images``: one folder for all inputs, or one per input in the same order."""
    if not images:
        raise ConversionError(f"{source}: --images is required (the folder(s) holding the image files)")
    if len(images) == 1:
        return [list(images)] * n_inputs
    if len(images) != n_inputs:
        raise ConversionError(
            f"{source}: got {n_inputs} --input file(s) but {len(images)} --images folders; give one folder, or one per input"
        )
    return [[image] for image in images]


def available_sources() -> list[str]:
    """Converter names: the public modules of this package."""
    from data_tools import converters

    return sorted(m.name for m in pkgutil.iter_modules(converters.__path__) if not m.name.startswith("_"))


def get_converter(source: str):
    """The converter module named ``source``."""
    sources = available_sources()
    if source not in sources:
        raise ConversionError(f"unknown source {source!r}; available: {', '.join(sources)}")
    return importlib.import_module(f"data_tools.converters.{source}")


def convert(
    source: str,
    *,
    inputs: Sequence[str | os.PathLike],
    images: Sequence[str | os.PathLike] = (),
    out: str | os.PathLike,
    skip_bad: bool = False,
    split: str | None = None,
    embed_images: bool = False,
    verify_images: bool = False,
    confine_images: bool = True,
    command: str = "",
    log=print,
) -> dict:
    """Converts one source dataset into a data folder.

    Args:
        source: converter name (a module of `data_tools.converters`), e.g. ``"vqav2"``.
        inputs: annotation files or folders (the converter's ``INPUTS`` says which).
        images: image folder(s).
        out: the data folder to write.
        skip_bad: skip bad records (counted and listed) instead of stopping at the first.
        split: put every record in this split instead of the split the source defines.
        embed_images: store image bytes in the dataset instead of paths.
        verify_images: decode every image fully (catches truncated files; slower).
        confine_images: image paths of csv and jsonl annotations must stay inside the images folder.
        command: the command line, for the manifest.
        log: where the summary goes.

    Returns:
        The manifest (with ``inputs``, ``images``, ``skipped``, ``skipped_count`` and ``notes``).

    Raises:
        ConversionError: bad input (see the module docstring).
    """
    module = get_converter(source)
    report = Report(skip_bad=skip_bad, verify_images=verify_images, confine_images=confine_images)
    input_paths = [Path(p).resolve() for p in inputs]
    image_paths = [Path(p).resolve() for p in images]
    start = time.perf_counter()
    from data_tools import storage

    def extra() -> dict:
        return {
            "inputs": [str(p) for p in input_paths],
            "images": [str(p) for p in image_paths],
            "skip_bad": skip_bad,
            "skipped_count": len(report.skipped),
            "skipped": report.skipped,
            "notes": dict(report.notes),
        }

    stream: Iterator[Pair] = _unique_ids(module.records(input_paths, image_paths, report=report, split=split), report)
    manifest = storage.write_dataset(
        out, stream, source=source, command=command, embed_images=embed_images, extra=extra
    )
    seconds = time.perf_counter() - start
    total = sum(n for splits in manifest["tasks"].values() for n in splits.values())
    log(f"{source} -> {out}")
    for task, splits in manifest["tasks"].items():
        log(f"  {task:15s} " + "  ".join(f"{s}={n}" for s, n in splits.items()))
    for what, n in report.notes.items():
        log(f"  note: {what}: {n}")
    if report.skipped:
        log(f"  skipped {len(report.skipped)} bad record(s) (all listed in {Path(out) / 'manifest.json'}):")
        for item in report.skipped[:SUMMARY_LIST_LIMIT]:
            log(f"    {_where(item['file'], item['record'])}: {item['reason']}")
        if len(report.skipped) > SUMMARY_LIST_LIMIT:
            log(f"    ... and {len(report.skipped) - SUMMARY_LIST_LIMIT} more")
    log(f"{total} records in {seconds:.2f} s: {total / max(seconds, 1e-9):.0f} records/s")
    return manifest
