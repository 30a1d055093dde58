"""COCO Captions (Chen et al., 2015): ``captions_{train,val}2017.json`` -> ``captioning`` records.

Official format (cocodataset.org/#format-data, "Image Captioning")::

    {"images": [{"id", "file_name", "width", "height", ...}],
     "annotations": [{"image_id", "id", "caption"}]}

One record per image with all its captions (about five) as references, in file order, keeping COCO's
``image_id`` (COCO caption results key on it). The split
comes from the file name (``captions_train2017.json`` -> ``train``, ``captions_val2014.json`` ->
``val``) unless ``--split`` is given. Images without captions are counted in the notes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from data_tools.converters._common import (
    ConversionError,
    Pair,
    Report,
    find_image,
    images_per_input,
    load_json,
    missing_keys,
    require_keys,
    source_id,
)

DESCRIPTION = "COCO Captions captions_*.json -> captioning"
INPUTS = "--input captions_train2017.json [captions_val2017.json ...]  --images FOLDER [FOLDER per input]"

_SPLIT_IN_NAME = re.compile(r"(train|val|test)(20\d\d)")


def split_from_name(path: Path, *, override: str | None) -> str:
    """``train``/``val``/``test`` from a COCO file name, or ``override``."""
    if override:
        return override
    match = _SPLIT_IN_NAME.search(path.name)
    if match is None:
        raise ConversionError(f"{path}: cannot tell the split from the file name; pass --split")
    return match.group(1)


def records(inputs: Sequence[Path], images: Sequence[Path], *, report: Report, split: str | None) -> Iterator[Pair]:
    """Captioning records of every input file (see the module docstring)."""
    for path, roots in zip(inputs, images_per_input(images, len(inputs), "coco_captions"), strict=True):
        data = load_json(path)
        require_keys(data, ("images", "annotations"), file=path, what="the file")
        split_name = split_from_name(path, override=split)
        captions: dict[object, list[str]] = {}
        known = set()
        for image in data["images"]:
            if not missing_keys(image, ("id",)):
                known.add(image["id"])
        for k, ann in enumerate(data["annotations"]):
            name = f"annotations[{k}]" + (f" (id={ann['id']})" if isinstance(ann, dict) and "id" in ann else "")
            lacking = missing_keys(ann, ("image_id", "caption"))
            if lacking:
                report.bad(path, name, f"missing key(s) {lacking}")
                continue
            if ann["image_id"] not in known:
                report.bad(path, name, f"image_id {ann['image_id']!r} is not in 'images'")
                continue
            caption = ann["caption"]
            if not isinstance(caption, str) or not caption.strip():
                report.bad(path, name, f"empty caption {caption!r}")
                continue
            captions.setdefault(ann["image_id"], []).append(" ".join(caption.split()))
        for k, image in enumerate(data["images"]):
            lacking = missing_keys(image, ("id", "file_name", "width", "height"))
            name = f"images[{k}]" + (f" (id={image['id']})" if isinstance(image, dict) and "id" in image else "")
            if lacking:
                report.bad(path, name, f"missing key(s) {lacking}")
                continue
            refs = captions.get(image["id"])
            if not refs:
                report.note("images without captions")
                continue
            file = find_image(roots, image["file_name"], f"{split_name}2017", f"{split_name}2014")
            size = report.image(file, file=path, record=name, expected=(image["width"], image["height"]))
            if size is None:
                continue
            yield (
                ("captioning", split_name),
                {
                    "id": str(image["id"]),
                    "image": str(file),
                    "width": size[0],
                    "height": size[1],
                    "captions": refs,
                    "image_id": source_id(image["id"]),
                },
            )
