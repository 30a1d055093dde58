"""Karpathy splits of COCO (Karpathy & Fei-Fei, 2015): ``dataset_coco.json`` -> ``captioning`` records.

Format (cs.stanford.edu/people/karpathy/deepimagesent/, ``dataset_coco.json``)::

    {"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
                 "split": "train" | "val" | "test" | "restval", "cocoid": 391895, "imgid": 0,
                 "sentences": [{"raw": "A man ...", "tokens": [...], ...}], ...}]}

Splits: ``restval`` joins ``train`` — the standard "Karpathy train" of 113,287 images that VL-T5,
OFA and BLIP train on (5,000 val, 5,000 test). ``dataset_flickr8k.json`` and
``dataset_flickr30k.json`` have the same layout without ``filepath``/``cocoid`` and convert too. The
image sizes are read from the image files (the JSON has none). Captions are the ``raw`` sentences.
COCO's ``cocoid`` is kept as the record's ``image_id`` (COCO caption results key on it); Flickr's
files have none (their ``imgid`` is a position in the file, not a source id).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from data_tools.converters._common import (
    Pair,
    Report,
    find_image,
    images_per_input,
    load_json,
    missing_keys,
    require_keys,
    source_id,
)

DESCRIPTION = "Karpathy-split dataset_coco.json -> captioning (restval joins train)"
INPUTS = "--input dataset_coco.json  --images COCO_ROOT (holding train2014/ and val2014/)"

SPLIT_NAMES = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def records(inputs: Sequence[Path], images: Sequence[Path], *, report: Report, split: str | None) -> Iterator[Pair]:
    """Captioning records of every input file (see the module docstring)."""
    for path, roots in zip(inputs, images_per_input(images, len(inputs), "coco_karpathy"), strict=True):
        data = load_json(path)
        require_keys(data, ("images",), file=path, what="the file")
        for k, image in enumerate(data["images"]):
            ident = image.get("cocoid", image.get("imgid")) if isinstance(image, dict) else None
            name = f"images[{k}]" + (f" (id={ident})" if ident is not None else "")
            lacking = missing_keys(image, ("filename", "split", "sentences"))
            if ident is None:
                lacking.append("cocoid or imgid")
            if lacking:
                report.bad(path, name, f"missing key(s) {lacking}")
                continue
            if image["split"] not in SPLIT_NAMES:
                report.bad(path, name, f"unknown split {image['split']!r}; expected one of {sorted(SPLIT_NAMES)}")
                continue
            captions = []
            for j, sentence in enumerate(image["sentences"]):
                raw = sentence.get("raw") if isinstance(sentence, dict) else None
                if not isinstance(raw, str) or not raw.strip():
                    report.bad(path, f"{name} sentences[{j}]", f"empty or missing 'raw' caption: {sentence!r}")
                    continue
                captions.append(" ".join(raw.split()))
            if not captions:
                report.note("images without captions")
                continue
            file = find_image(roots, Path(image.get("filepath", "")) / image["filename"])
            size = report.image(file, file=path, record=name)
            if size is None:
                continue
            yield (
                ("captioning", split or SPLIT_NAMES[image["split"]]),
                {
                    "id": str(ident),
                    "image": str(file),
                    "width": size[0],
                    "height": size[1],
                    "captions": captions,
                    "image_id": source_id(image.get("cocoid")),
                },
            )
