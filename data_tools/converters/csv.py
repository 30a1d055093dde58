"""Image classification from a CSV of ``path,label`` rows -> ``classification``.

Format: UTF-8 CSV (RFC 4180 quoting, read with Python's ``csv`` module). With a header row naming
``path`` and ``label`` (and optionally ``split``) the columns are found by name; without a header the
columns are ``path,label[,split]``. Paths are resolved against ``--images`` (default: the CSV's
folder) and must stay inside it (no ``..`` or absolute path out of it, no symlink out of it) unless
``--allow-outside-images``. The split is the ``split`` column, else ``--split``, else ``train``. Record ids are the
paths as written; a path listed twice is a bad record.
"""

from __future__ import annotations

import csv as csv_module
from collections.abc import Iterator, Sequence
from pathlib import Path

from data_tools.converters._common import ConversionError, Pair, Report

DESCRIPTION = "CSV of path,label[,split] -> classification"
INPUTS = "--input labels.csv [more.csv]  [--images FOLDER the paths are relative to]"


def records(inputs: Sequence[Path], images: Sequence[Path], *, report: Report, split: str | None) -> Iterator[Pair]:
    """One classification record per row (see the module docstring)."""
    if len(images) > 1:
        raise ConversionError("csv: --images takes one folder (the base of relative paths)")
    seen: set[tuple[str, str]] = set()
    for path in inputs:
        base = images[0] if images else path.parent
        try:
            text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate the BOM spreadsheet programs write
        except FileNotFoundError:
            raise ConversionError(f"{path}: file not found") from None
        except UnicodeDecodeError as exc:
            raise ConversionError(f"{path}: not UTF-8 text ({exc})") from None
        rows = list(csv_module.reader(text.splitlines()))
        columns = {"path": 0, "label": 1, "split": 2}
        start = 0
        if rows and {"path", "label"} <= {c.strip().lower() for c in rows[0]}:
            header = [c.strip().lower() for c in rows[0]]
            columns = {name: header.index(name) for name in ("path", "label", "split") if name in header}
            start = 1
        for line_no, row in enumerate(rows[start:], start=start + 1):
            if not row or all(not c.strip() for c in row):
                continue
            name = f"line {line_no}"
            if len(row) <= max(columns["path"], columns["label"]):
                report.bad(path, name, f"expected columns path,label; got {row!r}")
                continue
            image_path, label = row[columns["path"]].strip(), row[columns["label"]].strip()
            row_split = row[columns["split"]].strip() if "split" in columns and len(row) > columns["split"] else ""
            split_name = split or row_split or "train"
            if not image_path or not label:
                report.bad(path, name, f"empty path or label: {row!r}")
                continue
            if (split_name, image_path) in seen:
                report.bad(path, name, f"{image_path!r} is listed twice in split {split_name!r}")
                continue
            seen.add((split_name, image_path))
            file = report.confined(base, image_path, file=path, record=name)
            if file is None:
                continue
            size = report.image(file, file=path, record=name)
            if size is None:
                continue
            yield (
                ("classification", split_name),
                {"id": image_path, "image": str(file), "width": size[0], "height": size[1], "label": label},
            )
