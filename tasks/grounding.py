"""Grounding, two record kinds (docs/records.md):

* **phrase grounding** (Flickr30k Entities style): given a caption, write each of its phrases
  followed by the phrase's box as four location tokens, items joined by " ; "
  (``a red circle<loc_1><loc_2><loc_3><loc_4> ; a blue square<loc_..>...``, DESIGN.md §1);
  metric ``phrase_acc@0.5`` (primary): the fraction of gold phrases whose predicted box has
  IoU >= 0.5 (Flickr30k Entities' merged-box accuracy, Plummer et al., 2015);
* **grounded captioning** (region -> description): the region is written into the instruction as
  location tokens, OFA's ``' what does the region describe? region: <loc>x4'``
  (OFA data/pretrain_data/unify_dataset.py); the target is the description; metric
  ``region_cider`` (CIDEr-D over the region records, see tasks/_caption_metrics.py).

Each metric is reported only when the evaluated records contain its kind, so a split made of
region records only has no ``phrase_acc@0.5``.
"""

from __future__ import annotations

from collections.abc import Sequence

from tasks import boxes
from tasks._caption_metrics import caption_scores
from tasks._common import (
    LABEL_FORBIDDEN,
    FieldSpec,
    Record,
    Task,
    box_field,
    box_list_field,
    format_labelled_boxes,
    normalize_phrase,
    parse_labelled_boxes,
    size_field,
    squash,
    string_field,
    string_list_field,
)

# Phrase grounding has no OFA instruction; template 0 is DESIGN.md §1's, template 1 adapts OFA's
# visual grounding instruction to several phrases.
PROMPTS = (
    "locate the phrases in: {caption}",
    'which regions do the phrases in the text " {caption} " describe?',
    "find the regions of the phrases in: {caption}",
)
# Grounded captioning, same count as PROMPTS (template i of one kind pairs with template i of the other).
REGION_PROMPTS = (
    "what does the region describe? region: {region}",
    "describe the region {region}",
    "what is in the region {region}?",
)
IOU_THRESHOLD = 0.5  # Flickr30k Entities protocol (Plummer et al., 2015): correct when IoU >= 0.5
PHRASE_FIELDS = ("width", "height", "caption", "phrases", "boxes")
REGION_FIELDS = ("width", "height", "region", "description")


def is_region_record(record: Record) -> bool:
    """A grounded-captioning record (``region``/``description``) rather than a phrase-grounding one."""
    return record.get("region") is not None or record.get("description") is not None


def _required_for(record: Record) -> tuple[str, ...]:
    return REGION_FIELDS if is_region_record(record) else PHRASE_FIELDS


def _select_prompts(record: Record) -> tuple[str, ...]:
    return REGION_PROMPTS if is_region_record(record) else PROMPTS


def _prompt_values(record: Record, rng) -> dict[str, str]:
    if is_region_record(record):
        return {"region": boxes.box_to_tokens(record["region"], record["width"], record["height"])}
    return {"caption": squash(record["caption"])}


def _source(record: Record) -> str | None:
    """What the phrases are copied from: a phrase record's caption (records.md: phrases are substrings
    of the caption); a grounded-captioning record writes a free description."""
    return None if is_region_record(record) else squash(record["caption"])


def _target(record: Record, rng) -> str:
    if is_region_record(record):
        return squash(record["description"])
    return format_labelled_boxes(
        list(zip(record["phrases"], record["boxes"], strict=True)), record["width"], record["height"]
    )


def _by_position(record: Record) -> Record:
    """A phrase record with its (phrase, box) pairs in reading order: by box centre, top to bottom, then
    left to right. A grounded-captioning record (one region) comes back as it is.

    The metric matches phrases by their text, so the order of a target is free; the record's own order
    (the caption's) asks the decoder to find the object each next phrase names, where reading order
    lets it take the objects one after another and name each. Sequence models of boxes choose an
    order for the same reason (Chen et al. 2022, Pix2Seq, compares random, area and
    distance-to-origin orders of its object sequences).
    """
    if is_region_record(record):
        return record
    pairs = sorted(
        zip(record["phrases"], record["boxes"], strict=True), key=lambda pair: boxes.reading_order_key(pair[1])
    )
    return {**record, "phrases": [p for p, _ in pairs], "boxes": [b for _, b in pairs]}


def _parse(text: str, record: Record):
    if is_region_record(record):
        return squash(text) or None
    return parse_labelled_boxes(text, record["width"], record["height"])


def _gold(record: Record):
    if is_region_record(record):
        return squash(record["description"])
    return [(squash(p), [float(v) for v in b]) for p, b in zip(record["phrases"], record["boxes"], strict=True)]


def valid_items(prediction) -> list[tuple[str, Sequence[float]]]:
    """The ``(phrase, box)`` items of a parsed prediction that the metric scores (others are dropped)."""
    if not isinstance(prediction, (list, tuple)):
        return []
    return [
        item
        for item in prediction
        if isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) and len(item[1]) == 4
    ]


def match_phrases(gold_phrases: Sequence[str], predicted: Sequence[tuple[str, Sequence[float]]]) -> list[int | None]:
    """For each gold phrase, the index of its predicted item, or None.

    A gold phrase takes the first unused predicted item with the same normalised text; a gold
    phrase left without one takes the unused item at its own position (the model wrote the
    phrase differently but in the caption's order).
    """
    used: set[int] = set()
    matched: list[int | None] = [None] * len(gold_phrases)
    for g, phrase in enumerate(gold_phrases):
        key = normalize_phrase(phrase)
        for p, (name, _) in enumerate(predicted):
            if p not in used and normalize_phrase(name) == key:
                matched[g] = p
                used.add(p)
                break
    for g in range(len(gold_phrases)):
        if matched[g] is None and g < len(predicted) and g not in used:
            matched[g] = g
            used.add(g)
    return matched


def _metric(predictions, records: Sequence[Record]) -> dict[str, float]:
    result: dict[str, float] = {}
    correct = total = 0
    region_predictions, region_references = [], []
    for prediction, record in zip(predictions, records, strict=True):
        if is_region_record(record):
            region_predictions.append(prediction if isinstance(prediction, str) else None)
            region_references.append([record["description"]])
            continue
        items = valid_items(prediction)
        for g, p in enumerate(match_phrases(record["phrases"], items)):
            total += 1
            if p is not None and boxes.iou(items[p][1], record["boxes"][g]) >= IOU_THRESHOLD:
                correct += 1
    if total:
        result["phrase_acc@0.5"] = correct / total
    if region_references:
        result["region_cider"] = caption_scores(region_predictions, region_references)["cider"]
    return result


EXAMPLES = [
    {
        "id": "gr-0", "image": None, "width": 640, "height": 480,
        "caption": "a red circle left of a blue square", "phrases": ["a red circle", "a blue square"],
        "boxes": [[32.0, 40.0, 200.0, 210.0], [400.0, 250.0, 600.0, 470.0]], "region": None, "description": None,
    },
    {
        "id": "gr-1", "image": None, "width": 300, "height": 200,
        "caption": "a green triangle", "phrases": ["a green triangle"], "boxes": [[10.0, 20.0, 110.0, 120.0]],
        "region": None, "description": None,
    },
    {
        "id": "gr-2", "image": None, "width": 640, "height": 480,
        "caption": None, "phrases": None, "boxes": None,
        "region": [32.0, 40.0, 200.0, 210.0], "description": "a red circle",
    },
    {
        "id": "gr-3", "image": None, "width": 640, "height": 480,
        "caption": None, "phrases": None, "boxes": None,
        "region": [400.0, 250.0, 600.0, 470.0], "description": "a blue square with a thick border",
    },
    {
        "id": "gr-4", "image": None, "width": 640, "height": 480,
        "region": [300.0, 10.0, 420.0, 90.0], "description": "a small yellow star",
    },
]  # fmt: skip


def _boxes_field():
    # One box per phrase: a cross-field check, so it wraps the generic box-list check.
    spec = box_list_field("boxes", required=False)

    def check(value, record) -> None:
        spec.check(value, record)
        phrases = record.get("phrases")
        if isinstance(phrases, (list, tuple)) and len(phrases) != len(value):
            raise ValueError(f"holds {len(value)} boxes for {len(phrases)} phrases (one box per phrase)")

    return FieldSpec("boxes", spec.type, check, spec.role, spec.required, spec.storage)


def _present(prediction, score: float) -> dict:
    # A region record (grounded captioning) parses to its description, a phrase record to phrases.
    if isinstance(prediction, str):
        return {"task": "grounding", "prediction": prediction}
    return {"phrases": [{"phrase": phrase, "box": box} for phrase, box in prediction or []]}


TASK = Task(
    name="grounding",
    fields={
        "width": size_field("width"),
        "height": size_field("height"),
        "caption": string_field("caption", role="input", required=False),
        "phrases": string_list_field("phrases", required=False, forbid=LABEL_FORBIDDEN),
        "boxes": _boxes_field(),
        "region": box_field("region", role="input", required=False),
        "description": string_field("description", required=False),
    },
    prompts=PROMPTS,
    primary_metric="phrase_acc@0.5",
    decoding="phrases",  # each phrase a run of the caption's words, in any order (PhraseSpanLogitsProcessor)
    order_by_position=_by_position,
    decoding_source=_source,
    format_target=_target,
    parse_output=_parse,
    gold_prediction=_gold,
    metric=_metric,
    examples=EXAMPLES,
    prompt_values=_prompt_values,
    select_prompts=_select_prompts,
    required_for=_required_for,
    metric_keys=("phrase_acc@0.5", "region_cider"),
    present=_present,
    description="Phrase grounding (phrase_acc@0.5) and grounded captioning (region_cider).",
)
