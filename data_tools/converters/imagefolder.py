"""Image classification from class folders (torchvision ``ImageFolder`` layout) -> ``classification``.

Layout: ``ROOT/<class>/**/<image>`` (one split, named by ``--split``, default ``train``), or
``ROOT/<split>/<class>/**/<image>`` when ROOT's folders are split names (``train``, ``val``,
``test``). The label is the class folder's name. Image files are recognised by extension, with
torchvision's ``IMG_EXTENSIONS`` (``torchvision/datasets/folder.py``); other files are counted in the
notes and skipped. Record ids are paths relative to the split folder (``cat/001.jpg``).

Symlinks are followed to their real files: a folder is entered once (a link back to a parent is a
loop, skipped and noted), and a real image reached twice is listed once, with the class of the
folder that really holds it (noted); one linked under two classes from outside is a bad record.
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


def _walk(class_dir: Path, report: Report) -> Iterator[Path]:
    """The files under ``class_dir``, following symlinks but entering each real folder once.

    ``os.walk(followlinks=True)`` alone loops through a link to a parent folder until the path
    length runs out (one image listed dozens of times); a folder whose real path was entered
    already is a loop or a second way into the same images, and is skipped and noted.
    """
    entered: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in entered:
            report.note("folders reached twice through symlinks (loops) skipped")
            dirnames.clear()
            continue
        entered.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _images(folder: Path, report: Report, split_name: str) -> Iterator[tuple[Path, Path, str]]:
    """``(path, real path, class)`` of each image file of a split folder, each real file once.

    A real file reached twice (a symlink beside it, or in another class folder) keeps the class of
    the folder that really holds it; one reached from outside the split folder under two classes has
    no single label and is a bad record.
    """
    by_real: dict[Path, list[tuple[Path, str]]] = {}
    for class_dir in _class_dirs(folder):
        for file in _walk(class_dir, report):
            if file.suffix.lower() not in IMG_EXTENSIONS:
                report.note("files without an image extension skipped")
                continue
            by_real.setdefault(file.resolve(), []).append((file, class_dir.name))
    classes = {c.name: c.resolve() for c in _class_dirs(folder)}
    for real, found in by_real.items():
        home = [(file, label) for file, label in found if real.is_relative_to(classes[label])]
        if len(found) > 1:
            report.note("image files reached twice (symlinks) listed once", len(found) - 1)
        if home:
            yield home[0][0], real, home[0][1]
        elif len({label for _, label in found}) == 1:
            yield found[0][0], real, found[0][1]
        else:
            rel = found[0][0].relative_to(folder).as_posix()
            labels = sorted({label for _, label in found})
            report.bad(found[0][0], f"{split_name} {rel}", f"the image {real} is linked under several classes {labels}")


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
        if not _class_dirs(folder):
            raise ConversionError(f"{folder}: no class folders (expected {folder}/<class>/<image>)")
        counts = dict.fromkeys((c.name for c in _class_dirs(folder)), 0)
        for file, real, label in _images(folder, report, split_name):
            rel = file.relative_to(folder).as_posix()
            size = report.image(real, file=file, record=f"{split_name} {rel}")
            if size is None:
                continue
            counts[label] += 1
            record = {"id": rel, "image": str(real), "width": size[0], "height": size[1], "label": label}
            yield ("classification", split_name), record
        for _ in (label for label, n in counts.items() if n == 0):
            report.note("class folders without usable images")
