"""Image classification as text generation, with a PET-style verbalizer.

The verbalizer (answer engineering; Schick & Schütze, 2021, "PET") maps each label to one or more
label words; the target is the first word of the label, and any of its words reads back as the
label (many-to-one). Without a verbalizer every label is its own word. Decoding is "candidates":
generation is constrained to (or ranked over) the label words of the records, as OFA does for
ImageNet with a trie of class names.

Instructions: DESIGN.md §1's ``what is the main object in the image?`` and two paraphrases. OFA's
ImageNet instruction ``' what does the image describe?'`` (OFA data/cv_data/image_classify_dataset.py)
is left out on purpose: it is also OFA's captioning instruction, and in a task mixture one
instruction with two kinds of answer (a label word, a sentence) leaves the model guessing which to
write.

A verbalizer for a dataset: set ``VERBALIZER`` here, or build a task with
``make_task(verbalizer={...})`` and register it (``tasks.register(task, replace=True)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tasks._common import FieldSpec, Record, Task, safe_mean, squash, string_field

PROMPTS = (
    "what is the main object in the image?",
    "which category does the image belong to?",
    "what kind of object is this?",
)
TOP_K = 5  # top-5 accuracy, the ImageNet convention

# label -> label word(s); empty means "every label is its own word".
VERBALIZER: dict[str, list[str]] = {}


def _key(text: str) -> str:
    # Label words match case-insensitively with collapsed whitespace.
    return squash(text).lower()


class Verbalizer:
    """Label <-> label words.

    Args:
        mapping: label -> one word or a list of words (first = the target word). Empty or None:
            the identity (each label is its own word; any generated text is a label).

    Raises:
        ValueError: a label without words, or a word claimed by two labels.
    """

    def __init__(self, mapping: Mapping[str, str | Sequence[str]] | None = None):
        self.words: dict[str, tuple[str, ...]] = {}
        self._label_of: dict[str, str] = {}
        for label, words in (mapping or {}).items():
            words = (words,) if isinstance(words, str) else tuple(words)
            words = tuple(squash(w) for w in words if isinstance(w, str) and w.strip())
            if not words:
                raise ValueError(f"verbalizer: label {label!r} has no label words")
            self.words[label] = words
            for word in words:
                other = self._label_of.setdefault(_key(word), label)
                if other != label:
                    raise ValueError(f"verbalizer: word {word!r} maps to both {other!r} and {label!r}")

    @property
    def is_identity(self) -> bool:
        """True when no mapping was given (labels are their own words)."""
        return not self.words

    def words_of(self, label: str) -> tuple[str, ...]:
        """The label words of ``label`` (the label itself for the identity verbalizer)."""
        return self.words[label] if not self.is_identity else (squash(label),)

    def label_of(self, word: str) -> str | None:
        """The label a generated word stands for; None for a word of no label."""
        if self.is_identity:
            return squash(word) or None
        return self._label_of.get(_key(word))


def _present(label: str | None, score: float) -> dict:
    # Written labels rank only themselves; rank classification (the Predictor's labels=) ranks many.
    return {"label": label, "top_k": [{"label": label, "score": score}] if label is not None else []}


def make_task(verbalizer: Mapping[str, str | Sequence[str]] | None = None, *, prompts: Sequence[str] = PROMPTS) -> Task:
    """A classification task with the given verbalizer.

    Args:
        verbalizer: label -> label word(s); None/empty: each label is its own word.
        prompts: instruction templates (first = canonical).

    Returns:
        A `Task` named "classification".
    """
    verb = Verbalizer(verbalizer)
    label_spec = string_field("label")

    def check_label(value, record) -> None:
        label_spec.check(value, record)
        if not verb.is_identity and value not in verb.words:
            raise ValueError(f"label {value!r} is not in the verbalizer; known labels: {sorted(verb.words)}")

    def target(record: Record, rng) -> str:
        return verb.words_of(record["label"])[0]

    def parse(text: str, record: Record) -> str | None:
        return verb.label_of(text)

    def ranked(prediction) -> list[str]:
        if isinstance(prediction, str):
            return [prediction]
        if isinstance(prediction, (list, tuple)):  # rank classification: labels, best first
            return [p for p in prediction if isinstance(p, str)]
        return []

    def metric(predictions, records: Sequence[Record]) -> dict[str, float]:
        golds = [_key(r["label"]) for r in records]
        lists = [[_key(p) for p in ranked(prediction)] for prediction in predictions]
        result = {"top1": safe_mean([1.0 if ps[:1] == [g] else 0.0 for ps, g in zip(lists, golds, strict=True)])}
        if any(isinstance(p, (list, tuple)) for p in predictions):
            result[f"top{TOP_K}"] = safe_mean(
                [1.0 if g in ps[:TOP_K] else 0.0 for ps, g in zip(lists, golds, strict=True)]
            )
        return result

    def candidates(records: Sequence[Record]) -> list[str]:
        return sorted({word for r in records for word in verb.words_of(r["label"])})

    return Task(
        name="classification",
        fields={"label": FieldSpec("label", "str", check_label)},
        prompts=tuple(prompts),
        primary_metric="top1",
        decoding="candidates",
        format_target=target,
        parse_output=parse,
        gold_prediction=lambda record: record["label"],
        metric=metric,
        examples=EXAMPLES,
        candidate_texts=candidates,
        metric_keys=("top1", f"top{TOP_K}"),
        present=_present,
        description="Image classification with a verbalizer; top-1 (and top-5 for ranked predictions).",
    )


EXAMPLES = [
    {"id": "cls-0", "image": None, "width": 64, "height": 64, "label": "circle"},
    {"id": "cls-1", "image": None, "width": 64, "height": 64, "label": "square"},
    {"id": "cls-2", "image": None, "width": 64, "height": 64, "label": "triangle"},
]

TASK = make_task(VERBALIZER)
