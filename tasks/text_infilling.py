"""Text infilling (pretraining, text only): restore a text whose spans were replaced by sentinels.

Corruption is T5's span corruption (Raffel et al., 2020, §3.1.4): 15% of the words are noise, in
spans of mean length 3, each span replaced by one sentinel ``<extra_id_0>``, ``<extra_id_1>``, ...
Ported from T5's ``random_spans_noise_mask`` (t5/data/preprocessors.py). T5 corrupts SentencePiece
tokens; tasks speak text (DESIGN.md §7.2), so we corrupt whitespace-separated words.

Following OFA's text infilling (data/pretrain_data/unify_dataset.py, instruction
``' what is the complete text of " {} "?'`` with the masked text inside), the target is the whole
original text, not T5's sentinel-and-span target.

Determinism: ``prompt(record)`` without ``rng`` corrupts with a seed from ``zlib.crc32`` of the
record id (of the text when there is no id), stable across processes, unlike ``hash()``, which
Python salts per process.

Metric ``token_accuracy``: word-level accuracy of the prediction against the original text,
aligned by position: for each record, the number of positions i where both have word i and the
words are equal; summed over records and divided by the summed ``max(len(prediction), len(text))``
word counts, so missing and extra words both count as errors.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence

from tasks._common import Record, Task, as_random, squash, string_field

PROMPTS = (
    'what is the complete text of " {text} "?',
    "fill in the blanks: {text}",
    'restore the text " {text} "',
)
NOISE_DENSITY = 0.15  # Raffel et al., 2020, §3.1.4
MEAN_NOISE_SPAN_LENGTH = 3.0  # Raffel et al., 2020, §3.1.4


def sentinel(index: int) -> str:
    """T5's sentinel token ``<extra_id_{index}>``."""
    return f"<extra_id_{index}>"


def _random_segmentation(num_items: int, num_segments: int, rng: random.Random) -> list[int]:
    """Splits ``num_items`` into ``num_segments`` positive lengths, uniformly (T5 `_random_segmentation`)."""
    cuts = sorted(rng.sample(range(1, num_items), num_segments - 1))
    bounds = [0, *cuts, num_items]
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]


def random_spans_noise_mask(
    length: int,
    rng: random.Random,
    *,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
    random_roll: bool = True,
) -> list[bool]:
    """T5's ``random_spans_noise_mask``: which of ``length`` items are noise.

    Noise spans and non-noise spans alternate, starting with non-noise; the numbers of noise items
    and spans are ``round(length * noise_density)`` (at least 1, at most ``length - 1``) and
    ``round(noise / mean_noise_span_length)`` (at least 1). Like T5, lengths below 2 are
    computed as 2 and truncated.

    ``random_roll`` is T5's option of the same name (off by default there): it rotates the mask
    by a uniform offset. We turn it on because our texts are short: a 10-20 word caption gets a
    single noise span, and without the roll a single span always ends the text.
    """
    original_length = length
    length = max(length, 2)  # T5: "increase length to avoid degeneracy"
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    mask: list[bool] = []
    for keep, drop in zip(nonnoise_lengths, noise_lengths, strict=True):
        mask += [False] * keep + [True] * drop
    mask = mask[:original_length]
    if random_roll and original_length > 1:
        offset = rng.randrange(original_length)  # np.roll / tf.roll by `offset`
        mask = mask[len(mask) - offset :] + mask[: len(mask) - offset]
    return mask


def corrupt(text: str, rng: random.Random) -> str:
    """``text`` with T5 noise spans of its words replaced by ``<extra_id_k>`` sentinels."""
    words = text.split()
    mask = random_spans_noise_mask(len(words), rng)
    out, span = [], 0
    for i, (word, noise) in enumerate(zip(words, mask, strict=True)):
        if not noise:
            out.append(word)
        elif i == 0 or not mask[i - 1]:  # first word of a noise span
            out.append(sentinel(span))
            span += 1
    return " ".join(out)


def stable_seed(record: Record) -> int:
    """A per-record seed that is the same in every process (crc32, not the salted ``hash()``)."""
    key = record.get("id") if isinstance(record.get("id"), str) else record["text"]
    return zlib.crc32(key.encode("utf-8"))


def _prompt_values(record: Record, rng) -> dict[str, str]:
    generator = as_random(rng) if rng is not None else random.Random(stable_seed(record))
    return {"text": corrupt(squash(record["text"]), generator)}


def _parse(text: str, record: Record) -> str | None:
    return squash(text) or None


def _metric(predictions: Sequence[str | None], records: Sequence[Record]) -> dict[str, float]:
    correct = total = 0
    for prediction, record in zip(predictions, records, strict=True):
        gold = record["text"].split()
        predicted = prediction.split() if isinstance(prediction, str) else []
        # Aligned by position; unmatched extra or missing words still count in `total`.
        correct += sum(1 for p, g in zip(predicted, gold, strict=False) if p == g)
        total += max(len(predicted), len(gold))
    return {"token_accuracy": correct / total if total else 0.0}


EXAMPLES = [
    {
        "id": "txt-0", "image": None, "width": 0, "height": 0,
        "text": "a red circle is left of a blue square and a green triangle is above them both",
    },
    {
        "id": "txt-1", "image": None, "width": 0, "height": 0,
        "text": "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat",
    },
    {
        "id": "txt-2", "image": None, "width": 0, "height": 0,
        "text": "unified models read an image and an instruction and write text",
    },
]  # fmt: skip

TASK = Task(
    name="text_infilling",
    fields={"text": string_field("text", role="input")},
    prompts=PROMPTS,
    primary_metric="token_accuracy",
    decoding="open",
    format_target=lambda record, rng: squash(record["text"]),
    parse_output=_parse,
    gold_prediction=lambda record: squash(record["text"]),
    metric=_metric,
    examples=EXAMPLES,
    prompt_values=_prompt_values,
    metric_keys=("token_accuracy",),
    description="T5 span-corruption text infilling (pretraining, text only); word-level accuracy.",
)
