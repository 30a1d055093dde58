"""Object detection as text (pretraining): every object as ``label<loc>x4``, items joined by " ; ".

Instruction from OFA's pretraining (data/pretrain_data/unify_dataset.py:
``' what are the objects in the image?'``), without OFA's leading space. OFA writes the box before
the label; we write the label first, the same "name<loc>x4" item format as grounding.

Object order: the canonical target (``rng=None``) lists objects in raster order of their top-left
corner, top to bottom then left to right (sorted by y1, x1, y2, x2, label), a deterministic order
like Pix2Seq's deterministic baselines (area, distance to origin; Chen et al., 2022, §2.1 and its
ordering ablation); with an ``rng`` (training) the order is shuffled each time, Pix2Seq's random
ordering, which it found to work best.

Metric: AP at IoU 0.5 (``map@0.5``), COCO-style, by pycocotools' COCOeval on COCO objects built in
memory. Text generation gives no per-box confidence, so every predicted box has score 1.0;
COCOeval sorts detections with a stable mergesort, so ties keep (image id, generation) order. The
image ids are the records' COCO ``image_id`` when every record has a distinct one, else their
positions: COCOeval on the official results file (``data_tools.formats``, scores 1.0 as well) then
breaks ties in the same order and gives the same number.
Predicted labels absent from the gold labels are dropped: COCOeval only scores categories with
ground truth, where such boxes could never be true positives.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

from tasks import boxes
from tasks._common import (
    FieldSpec,
    Record,
    Task,
    as_random,
    format_labelled_boxes,
    parse_labelled_boxes,
    size_field,
    source_id_field,
    squash,
    string_field,
)

PROMPTS = (
    "what are the objects in the image?",
    "detect the objects in the image.",
    "list every object with its box.",
)
IOU_THRESHOLD = 0.5


def _check_objects(value: Any, record: Record) -> None:
    label_check = string_field("label", forbid=("<loc_", ";")).check
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f'must be a non-empty list of {{"label": str, "box": [x1, y1, x2, y2]}}, got {value!r:.60}')
    for i, obj in enumerate(value):
        if not isinstance(obj, dict) or "label" not in obj or "box" not in obj:
            raise ValueError(f'item {i} must be {{"label": str, "box": [x1, y1, x2, y2]}}, got {obj!r:.60}')
        try:
            label_check(obj["label"], record)
            boxes.validate_box(obj["box"], record["width"], record["height"], what=f"object {i} box")
        except (ValueError, boxes.BoxError) as exc:
            raise ValueError(f"item {i}: {exc}") from None


def _raster_order(objects: Sequence[dict]) -> list[dict]:
    return sorted(objects, key=lambda o: (o["box"][1], o["box"][0], o["box"][3], o["box"][2], o["label"]))


def _target(record: Record, rng) -> str:
    objects = _raster_order(record["objects"])
    if rng is not None:
        as_random(rng).shuffle(objects)
    return format_labelled_boxes([(o["label"], o["box"]) for o in objects], record["width"], record["height"])


def _parse(text: str, record: Record):
    return parse_labelled_boxes(text, record["width"], record["height"])


def _gold(record: Record) -> list[tuple[str, list[float]]]:
    return [(squash(o["label"]), [float(v) for v in o["box"]]) for o in _raster_order(record["objects"])]


def _xywh(box: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]  # COCO boxes are [x, y, width, height]


def _image_ids(records: Sequence[Record]) -> list[int]:
    """The records' COCO image ids when all have distinct ones, else 1..N (see the module docstring)."""
    ids = [record.get("image_id") for record in records]
    if all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids):
        return ids
    return list(range(1, len(records) + 1))


def mean_ap50(predictions: Sequence[Any], records: Sequence[Record]) -> float:
    """COCO AP at IoU 0.5 (area "all", 100 detections per image), averaged over categories.

    Args:
        predictions: per record, a list of ``(label, [x1, y1, x2, y2])`` or None.
        records: detection records.

    Returns:
        AP@0.5 in [0, 1]; 0.0 when nothing was predicted.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    labels = sorted({squash(o["label"]) for r in records for o in r["objects"]})
    category = {label: i + 1 for i, label in enumerate(labels)}
    images, annotations, detections = [], [], []
    for image_id, prediction, record in zip(_image_ids(records), predictions, records, strict=True):
        images.append({"id": image_id, "width": record["width"], "height": record["height"]})
        for obj in record["objects"]:
            x, y, w, h = _xywh(obj["box"])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category[squash(obj["label"])],
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for item in prediction if isinstance(prediction, (list, tuple)) else ():
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
                continue
            label, box = squash(item[0]), item[1]
            if label in category and len(box) == 4:
                detections.append(
                    {"image_id": image_id, "category_id": category[label], "bbox": _xywh(box), "score": 1.0}
                )
    if not detections:  # COCO.loadRes cannot load an empty result list
        return 0.0
    quiet = io.StringIO()  # pycocotools prints progress
    with contextlib.redirect_stdout(quiet):
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c, "name": n} for n, c in category.items()],
        }
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(detections), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    # eval["precision"]: (T iou thresholds, R=101 recall points, K categories, A areas, M maxDets).
    # COCOeval.summarize's AP@0.5 row: iou index 0 (0.5), area "all" (0), maxDets 100 (last);
    # -1 marks categories without ground truth and is excluded.
    assert evaluator.params.iouThrs[0] == IOU_THRESHOLD
    precision = evaluator.eval["precision"][0, :, :, 0, -1]
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else 0.0


def _metric(predictions, records: Sequence[Record]) -> dict[str, float]:
    return {"map@0.5": mean_ap50(predictions, records)}


EXAMPLES = [
    {
        "id": "det-0", "image": None, "width": 640, "height": 480, "image_id": 139,
        "objects": [
            {"label": "square", "box": [400.0, 250.0, 600.0, 470.0]},
            {"label": "circle", "box": [32.0, 40.0, 200.0, 210.0]},
        ],
    },
    {
        "id": "det-1", "image": None, "width": 300, "height": 200,
        "objects": [{"label": "triangle", "box": [10.0, 20.0, 110.0, 120.0]}],
    },
    {
        "id": "det-2", "image": None, "width": 640, "height": 480,
        "objects": [
            {"label": "circle", "box": [300.0, 300.0, 380.0, 380.0]},
            {"label": "star", "box": [20.0, 300.0, 120.0, 400.0]},
            {"label": "circle", "box": [500.0, 20.0, 560.0, 80.0]},
        ],
    },
]  # fmt: skip

TASK = Task(
    name="detection",
    fields={
        "width": size_field("width"),
        "height": size_field("height"),
        "objects": FieldSpec(
            "objects",
            'list[{"label": str, "box": list[float]}]',
            _check_objects,
            storage=[{"label": "string", "box": "box"}],
        ),
        "image_id": source_id_field("image_id"),  # COCO's image id: COCO detection results key on it
    },
    prompts=PROMPTS,
    primary_metric="map@0.5",
    decoding="open",
    format_target=_target,
    parse_output=_parse,
    gold_prediction=_gold,
    metric=_metric,
    examples=EXAMPLES,
    metric_keys=("map@0.5",),
    present=lambda objects, score: {"objects": [{"label": label, "box": box} for label, box in objects or []]},
    description="Object detection as text (pretraining); COCO AP@0.5 via pycocotools.",
)
