"""Image-text matching (pretraining): does the text describe the image? yes / no.

Instruction from OFA's pretraining (data/pretrain_data/unify_dataset.py:
``' does the image describe " {} "?'``, target ``yes``/``no``), without OFA's leading space.
Decoding is "candidates" over ``["no", "yes"]``.
"""

from __future__ import annotations

from collections.abc import Sequence

from tasks._common import Record, Task, bool_field, safe_mean, squash, string_field

PROMPTS = (
    'does the image describe " {text} "?',
    'is " {text} " a description of the image?',
    "image-text match: {text}",
)
ANSWERS = {True: "yes", False: "no"}


def _parse(text: str, record: Record) -> bool | None:
    word = squash(text).lower().rstrip(".!")
    return {"yes": True, "no": False}.get(word)


def _metric(predictions: Sequence[bool | None], records: Sequence[Record]) -> dict[str, float]:
    return {"accuracy": safe_mean([1.0 if p is r["match"] else 0.0 for p, r in zip(predictions, records, strict=True)])}


EXAMPLES = [
    {
        "id": "itm-0",
        "image": None,
        "width": 64,
        "height": 64,
        "text": "a red circle left of a blue square",
        "match": True,
    },
    {"id": "itm-1", "image": None, "width": 64, "height": 64, "text": "two green stars", "match": False},
    {"id": "itm-2", "image": None, "width": 64, "height": 64, "text": "a yellow triangle", "match": True},
]

TASK = Task(
    name="itm",
    fields={"text": string_field("text", role="input"), "match": bool_field("match")},
    prompts=PROMPTS,
    primary_metric="accuracy",
    decoding="candidates",
    format_target=lambda record, rng: ANSWERS[record["match"]],
    parse_output=_parse,
    gold_prediction=lambda record: record["match"],
    metric=_metric,
    examples=EXAMPLES,
    prompt_values=lambda record, rng: {"text": squash(record["text"])},
    candidate_texts=lambda records: ["no", "yes"],
    metric_keys=("accuracy",),
    description="Image-text matching (pretraining); accuracy.",
)
