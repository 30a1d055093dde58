"""Image captioning: describe the image in one sentence; CIDEr-D, BLEU-4 and ROUGE-L.

Instruction from OFA (data/mm_data/caption_dataset.py: ``' what does the image describe?'``),
without OFA's leading space (it only served GPT-2 BPE; our tokenizer marks word starts itself).
"""

from __future__ import annotations

from collections.abc import Sequence

from tasks._caption_metrics import caption_scores
from tasks._common import Record, Task, rng_index, source_id_field, squash, string_list_field

PROMPTS = (
    "what does the image describe?",
    "describe the image.",
    "write a caption for the image.",
)


def _target(record: Record, rng) -> str:
    # Training draws one of the references each time it sees the image (OFA and VL-T5 train on
    # every reference); evaluation and rng=None use the first.
    captions = record["captions"]
    return squash(captions[rng_index(rng, len(captions)) if rng is not None else 0])


def _parse(text: str, record: Record) -> str | None:
    return squash(text) or None


def _metric(predictions: Sequence[str | None], records: Sequence[Record]) -> dict[str, float]:
    # Corpus-level: CIDEr-D's IDF comes from the references of all records at once.
    return caption_scores(
        [p if isinstance(p, str) else None for p in predictions],
        [record["captions"] for record in records],
    )


EXAMPLES = [
    {
        "id": "cap-0", "image": None, "width": 64, "height": 64, "image_id": 391895,
        "captions": ["a red circle left of a blue square", "a red circle and a blue square", "red circle, blue square"],
    },
    {
        "id": "cap-1", "image": None, "width": 64, "height": 64,
        "captions": ["a green triangle above a yellow star", "a yellow star below a green triangle"],
    },
    {
        "id": "cap-2", "image": None, "width": 64, "height": 64,
        "captions": ["two purple hexagons on a white background", "a pair of purple hexagons"],
    },
]  # fmt: skip

TASK = Task(
    name="captioning",
    # image_id: COCO's id of the image (data_tools.converters.coco_captions); COCO caption results key on it.
    fields={"captions": string_list_field("captions"), "image_id": source_id_field("image_id")},
    prompts=PROMPTS,
    primary_metric="cider",
    decoding="open",
    format_target=_target,
    parse_output=_parse,
    gold_prediction=lambda record: squash(record["captions"][0]),
    metric=_metric,
    examples=EXAMPLES,
    metric_keys=("cider", "bleu4", "rouge_l"),
    present=lambda caption, score: {"caption": caption},
    description="Image captioning; CIDEr-D (primary), BLEU-4, ROUGE-L via pycocoevalcap's pure-Python scorers.",
)
