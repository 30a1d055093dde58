"""Referring expression comprehension: the box of the object an expression refers to.

Instruction from OFA (data/mm_data/refcoco_dataset.py:
``' which region does the text " {} " describe?'``), without OFA's leading space. The target is
the box as four location tokens (``tasks.boxes``); decoding is "loc4" (exactly four location
tokens, then end). Metrics as in the RefCOCO literature (OFA, MDETR): accuracy at IoU >= 0.5,
plus mean IoU.
"""

from __future__ import annotations

from collections.abc import Sequence

from tasks import boxes
from tasks._common import (
    FieldSpec,
    Record,
    Task,
    _describe,
    box_field,
    box_list_field,
    decode_box,
    safe_mean,
    size_field,
    source_id_field,
    string_field,
)

PROMPTS = (
    'which region does the text " {expression} " describe?',
    "locate: {expression}",
    'where is " {expression} " in the image?',
)
IOU_THRESHOLD = 0.5  # RefCOCO protocol: a box is correct when IoU >= 0.5 (Mao et al., 2016)


def _target(record: Record, rng) -> str:
    return boxes.box_to_tokens(record["box"], record["width"], record["height"])


def _parse(text: str, record: Record) -> list[float] | None:
    # Exactly four <loc_*> tokens, else no prediction.
    return decode_box(text, record["width"], record["height"])


def _check_masks(value, record: Record) -> None:
    """One entry per candidate box: its COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` in pixels, [] for none."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"must be a list with one list of polygons per candidate box, got {_describe(value)}")
    candidates = record.get("candidate_boxes")
    if candidates is not None and len(value) != len(candidates):
        raise ValueError(f"must have one entry per candidate box ({len(candidates)}), got {len(value)}")
    for i, polygons in enumerate(value):
        if not isinstance(polygons, (list, tuple)):
            raise ValueError(f"item {i} must be a list of polygons ([] for none), got {_describe(polygons)}")
        for polygon in polygons:
            numbers = isinstance(polygon, (list, tuple)) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon
            )
            if not numbers or len(polygon) < 6 or len(polygon) % 2:
                raise ValueError(
                    f"item {i}: a polygon is [x1, y1, x2, y2, ...] with three points or more, got {polygon!r:.80}"
                )


def _is_box(prediction) -> bool:
    return isinstance(prediction, (list, tuple)) and len(prediction) == 4


def _metric(predictions: Sequence[list[float] | None], records: Sequence[Record]) -> dict[str, float]:
    ious = [boxes.iou(p, r["box"]) if _is_box(p) else 0.0 for p, r in zip(predictions, records, strict=True)]
    return {
        "acc@0.5": safe_mean([1.0 if iou >= IOU_THRESHOLD else 0.0 for iou in ious]),
        "miou": safe_mean(ious),
    }


EXAMPLES = [
    {
        "id": "rec-0", "image": None, "width": 640, "height": 480, "ref_id": 1, "sent_id": 7,
        "expression": "the red circle", "box": [32.0, 40.0, 200.0, 210.0],
    },
    {
        "id": "rec-1", "image": None, "width": 640, "height": 480,
        "expression": "the blue square on the right", "box": [400.0, 250.0, 600.0, 470.0],
        "candidate_boxes": [[32.0, 40.0, 200.0, 210.0], [400.0, 250.0, 600.0, 470.0]],
        "candidate_masks": [[[32.0, 40.0, 200.0, 40.0, 116.0, 210.0]], []],
    },
    {
        "id": "rec-2", "image": None, "width": 300, "height": 300,
        "expression": "small green triangle", "box": [120.5, 10.0, 170.25, 60.0],
    },
]  # fmt: skip

TASK = Task(
    name="rec",
    fields={
        "width": size_field("width"),
        "height": size_field("height"),
        "expression": string_field("expression", role="input"),
        "box": box_field("box"),
        # For CPT colour prompts (unified_vl.prompting.cpt); includes the gold box. Not read here.
        "candidate_boxes": box_list_field("candidate_boxes", role="input", required=False),
        # RefCOCO's ids of the referred object and the sentence (data_tools.converters.refcoco).
        "ref_id": source_id_field("ref_id"),
        "sent_id": source_id_field("sent_id"),
        # CPT-Seg: candidates painted on their segmentation (COCO polygons) instead of their box.
        "candidate_masks": FieldSpec(
            "candidate_masks",
            "list[list[list[float]]] (per candidate box: COCO polygons in pixels, [] for none)",
            _check_masks,
            role="input",
            required=False,
            storage=[[["float64"]]],
        ),
    },
    prompts=PROMPTS,
    primary_metric="acc@0.5",
    decoding="loc4",
    format_target=_target,
    parse_output=_parse,
    gold_prediction=lambda record: [float(v) for v in record["box"]],
    metric=_metric,
    examples=EXAMPLES,
    prompt_values=lambda record, rng: {"expression": " ".join(record["expression"].split())},
    metric_keys=("acc@0.5", "miou"),
    present=lambda box, score: {"box": [float(v) for v in box] if box is not None else None},
    description="Referring expression comprehension; Acc@0.5 and mean IoU.",
)
