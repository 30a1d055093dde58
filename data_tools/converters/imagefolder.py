"""Image classification from class folders (torchvision ``ImageFolder`` layout) -> ``classification``.

Layout: ``ROOT/<class>/**/<image>`` (one split, named by ``--split``, default ``train``), or
``ROOT/<split>/<class>/**/<image>`` when ROOT's folders are split names (``train``, ``val``,
``test``). The label is the class folder's name. Image files are recognised by extension, with
torchvision's ``IMG_EXTENSIONS`` (``torchvision/datasets/folder.py``); other files are counted in the
notes and skipped. Record ids are paths relative to the split folder (``cat/001.jpg``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from data_tools.converters._common import ConversionError, Pair, Report

DESCRIPTION = "class folders (ImageFolder layout) -> classification"
INPUTS = "--input ROOT (ROOT/<class>/<image> or ROOT/<split>/<class>/<image>)"

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's list
SPLIT_FOLDERS = ("train", "val", "test")


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def records(inputs: Sequence[Path], images: Sequence[Path], *, report: Report, split: str | None) -> Iterator[Pair]:
    """One classification record per image file (see the module docstring)."""
    if len(inputs) != 1 or not inputs[0].is_dir():
        raise ConversionError(f"imagefolder: --input takes one root folder, got {[str(p) for p in inputs]}")
    if images:
        raise ConversionError("imagefolder: the images are the --input folder; --images is not used")
    root = inputs[0]
    top = _class_dirs(root)
    if top and all(p.name in SPLIT_FOLDERS for p in top):
        if split:
            raise ConversionError(f"{root}: holds split folders {[p.name for p in top]}; --split would merge them")
        splits = [(p.name, p) for p in top]
    else:
        splits = [(split or "train", root)]
    for split_name, folder in splits:
        classes = _class_dirs(folder)
        if not classes:
            raise ConversionError(f"{folder}: no class folders (expected {folder}/<class>/<image>)")
        for class_dir in classes:
            files = sorted(
                Path(dirpath) / f for dirpath, _, names in os.walk(class_dir, followlinks=True) for f in names
            )
            n_images = 0
            for file in files:
                if file.suffix.lower() not in IMG_EXTENSIONS:
                    report.note("files without an image extension skipped")
                    continue
                rel = file.relative_to(folder).as_posix()
                size = report.image(file, file=file, record=f"{split_name} {rel}")
                if size is None:
                    continue
                n_images += 1
                yield (
                    ("classification", split_name),
                    {
                        "id": rel,
                        "image": str(file.resolve()),
                        "width": size[0],
                        "height": size[1],
                        "label": class_dir.name,
                    },
                )
            if n_images == 0:
                report.note("class folders without usable images")
