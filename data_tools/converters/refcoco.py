"""RefCOCO, RefCOCO+ and RefCOCOg (Yu et al., 2016; Mao et al., 2016) -> ``rec`` and ``grounding``.

Official files (github.com/lichengunc/refer, ``data/<dataset>/``):

* ``refs(unc).p`` (RefCOCO, RefCOCO+), ``refs(umd).p`` or ``refs(google).p`` (RefCOCOg): a pickled
  list of refs ``{"ref_id", "ann_id", "image_id", "split", "category_id", "file_name",
  "sentences": [{"sent", "raw", "tokens", "sent_id"}], ...}``;
* ``instances.json``: COCO instances of the images concerned: ``images`` (``id``, ``file_name``,
  ``width``, ``height``) and ``annotations`` (``id``, ``image_id``, ``bbox`` as ``[x, y, w, h]``).

Per sentence of a ref: one ``rec`` record (``expression`` = the normalised ``sent`` that the refer
API and OFA use, ``box`` = the referred annotation's box as ``[x1, y1, x2, y2]``, ``candidate_boxes``
= the boxes of all annotations of the image, and the source ids ``ref_id`` and ``sent_id`` that a
RefCOCO results file keys on) and one ``grounding`` region->description record with the same id. The benchmark splits are kept as they are (``train``, ``val``, ``testA``, ``testB``,
``test``). A ref's ``file_name`` carries an annotation suffix; the image file name comes from
``instances.json``.

Security: ``.p`` files are Python pickles, the official annotation format, and unpickling can run
code. We only read files the user names, and with an unpickler that refuses every class or function
(refs are plain lists, dicts, strings and numbers), so a malicious file fails instead of executing.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path

from data_tools.converters._common import (
    ConversionError,
    Pair,
    Report,
    find_image,
    load_json,
    missing_keys,
    require_keys,
    source_id,
    xywh_to_xyxy,
)

DESCRIPTION = "RefCOCO/RefCOCO+/RefCOCOg refs(*).p + instances.json -> rec, grounding (region -> description)"
INPUTS = "--input 'refs(unc).p' instances.json  --images COCO_train2014_FOLDER"


class _PlainDataUnpickler(pickle.Unpickler):
    """Loads lists, dicts, strings and numbers only: any class or callable is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: refs files hold plain data only")


def load_refs(path: Path) -> list:
    """The refs list of an official ``refs(*).p`` file (Python 2 pickles included)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConversionError(f"{path}: file not found") from None
    try:
        # The official files are Python 2 pickles; their byte strings are UTF-8 text.
        refs = _PlainDataUnpickler(io.BytesIO(data), encoding="utf-8").load()
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise ConversionError(f"{path}: not a refs pickle ({exc})") from None
    if not isinstance(refs, list):
        raise ConversionError(f"{path}: expected a pickled list of refs, got {type(refs).__name__}")
    return refs


def _inputs(inputs: Sequence[Path]) -> tuple[Path, Path]:
    refs = [p for p in inputs if p.suffix == ".p"]
    instances = [p for p in inputs if p.suffix == ".json"]
    if len(refs) != 1 or len(instances) != 1:
        raise ConversionError(
            f"refcoco: --input takes one refs(*).p file and one instances.json, got {[str(p) for p in inputs]}"
        )
    return refs[0], instances[0]


def records(inputs: Sequence[Path], images: Sequence[Path], *, report: Report, split: str | None) -> Iterator[Pair]:
    """rec and grounding records, ref by ref, sentence by sentence (see the module docstring)."""
    if not images:
        raise ConversionError("refcoco: --images is required (the COCO train2014 image folder)")
    refs_path, instances_path = _inputs(inputs)
    refs = load_refs(refs_path)
    instances = load_json(instances_path)
    require_keys(instances, ("images", "annotations"), file=instances_path, what="the file")
    image_info = {
        im["id"]: im for im in instances["images"] if not missing_keys(im, ("id", "file_name", "width", "height"))
    }
    annotations = {}
    boxes_of_image: dict[object, list] = {}
    for k, ann in enumerate(instances["annotations"]):
        lacking = missing_keys(ann, ("id", "image_id", "bbox"))
        if lacking:
            report.bad(instances_path, f"annotations[{k}]", f"missing key(s) {lacking}")
            continue
        annotations[ann["id"]] = ann
        boxes_of_image.setdefault(ann["image_id"], []).append(ann)
    for k, ref in enumerate(refs):
        name = f"refs[{k}]" + (f" (ref_id={ref['ref_id']})" if isinstance(ref, dict) and "ref_id" in ref else "")
        lacking = missing_keys(ref, ("ref_id", "ann_id", "image_id", "split", "sentences"))
        if lacking:
            report.bad(refs_path, name, f"missing key(s) {lacking}")
            continue
        ann = annotations.get(ref["ann_id"])
        info = image_info.get(ref["image_id"])
        if ann is None or info is None:
            what = f"ann_id {ref['ann_id']}" if ann is None else f"image_id {ref['image_id']}"
            report.bad(refs_path, name, f"{what} is not in {instances_path.name}")
            continue
        file = find_image(images, info["file_name"], "train2014")
        size = report.image(
            file,
            file=instances_path,
            record=f"image id={info['id']} of {name}",
            expected=(info["width"], info["height"]),
        )
        if size is None:
            continue
        width, height = size
        box = report.box(
            xywh_to_xyxy(ann["bbox"]), width, height, file=instances_path, record=f"annotation id={ann['id']} ({name})"
        )
        if box is None:
            continue
        candidates = []
        for other in boxes_of_image[ref["image_id"]]:
            if other["id"] == ann["id"]:
                candidates.append(box)
                continue
            checked = report.box(
                xywh_to_xyxy(other["bbox"]),
                width,
                height,
                file=instances_path,
                record=f"annotation id={other['id']} (candidate of {name})",
            )
            if checked is None:
                candidates = None
                break
            candidates.append(checked)
        if candidates is None:
            continue
        for j, sentence in enumerate(ref["sentences"]):
            text = (sentence.get("sent") or sentence.get("raw")) if isinstance(sentence, dict) else None
            sent_name = f"{name} sentences[{j}]"
            if not isinstance(text, str) or not text.strip():
                report.bad(refs_path, sent_name, f"empty expression: {sentence!r}")
                continue
            text = " ".join(text.split())
            rid = f"{ref['ref_id']}-{sentence.get('sent_id', j)}"
            common = {"id": rid, "image": str(file), "width": width, "height": height}
            split_name = split or ref["split"]
            rec = {**common, "expression": text, "box": box, "candidate_boxes": candidates}
            rec |= {"ref_id": source_id(ref["ref_id"]), "sent_id": source_id(sentence.get("sent_id"))}
            grounding = {**common, "region": box, "description": text}
            if report.valid("rec", rec, file=refs_path, name=sent_name) and report.valid(
                "grounding", grounding, file=refs_path, name=sent_name
            ):
                yield ("rec", split_name), rec
                yield ("grounding", split_name), grounding
