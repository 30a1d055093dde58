"""Text to train a tokenizer on: the text fields of stored records, every task's templates, and the
project's own default corpus (the one the packaged tokenizer was trained on).

    from data_tools.corpus import corpus
    from unified_vl.tokenizer import train_tokenizer
    train_tokenizer(corpus(["data/synth"]), out_dir="tok/", vocab_size=8000)

Location tokens and T5's sentinels (``<extra_id_N>``, text infilling's) are removed from every
text: the tokenizer adds them as whole tokens of its own, and SentencePiece must not learn pieces
for their characters. Which record fields hold text comes from the task registry: every field
whose storage type is a string, a list of strings, or a list of objects with string members.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from data_tools import storage

NUM_SCENES = 250  # synthetic scenes per split in the default corpus; covers every word and template (tests)
SEED = 0

_SPECIAL = re.compile(r"<loc_\d+>|<extra_id_\d+>")  # whole tokens the tokenizer adds itself
_FIELD = re.compile(r"\{[^{}]*\}")


def clean(text: str) -> str:
    """``text`` without location tokens and sentinels, whitespace collapsed."""
    return " ".join(_SPECIAL.sub(" ", text).split())


def text_fields() -> tuple[str, ...]:
    """Record fields that hold text, over every registered task (from each field's storage type)."""
    import tasks

    names = {
        name
        for task in tasks.TASKS.values()
        for name, spec in task.fields.items()
        if tasks.storage_holds(spec.storage, "string")
    }
    return tuple(sorted(names))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)


def record_texts(record: Mapping[str, Any], fields: Iterable[str] | None = None) -> Iterator[str]:
    """The texts of one record's text fields (``fields``; default: :func:`text_fields`)."""
    for name in text_fields() if fields is None else fields:
        yield from _strings(record.get(name))


def dataset_texts(data_dir: str, *, batch_size: int = 1000) -> Iterator[str]:
    """Every text of every stored (task, split) of a data folder, without decoding images."""
    wanted = set(text_fields())
    for task, splits in storage.available(data_dir).items():
        for split in splits:
            dataset = storage.load_split(data_dir, task, split)
            columns = [c for c in dataset.column_names if c in wanted]
            for batch in dataset.select_columns(columns).iter(batch_size=batch_size):
                for row in zip(*(batch[c] for c in columns), strict=True):
                    yield from record_texts(dict(zip(columns, row, strict=True)), columns)


def template_texts() -> list[str]:
    """Every task's instruction templates, filled with each task's example records, plus the bare templates."""
    import tasks

    texts = []
    for task in tasks.TASKS.values():
        texts += [" ".join(_FIELD.sub(" ", t).split()) for t in task.prompts]
        for example in task.examples:
            for k in range(len(task.templates_for(example))):
                texts.append(task.prompt(example, template=k))
            texts.append(task.target(example))
    return [t for t in (clean(t) for t in texts) if t]


def default_corpus_texts(*, num_scenes: int = NUM_SCENES, seed: int = SEED) -> list[str]:
    """The corpus of the packaged tokenizer: deterministic text the project produces itself.

    Every task's templates filled with synthetic records, those records' targets and text fields
    for a fixed sample of synthetic scenes of every split (held-out pairs included, so their words
    are known), and the world's vocabulary. Scenes are generated in memory without drawing.

    Args:
        num_scenes: synthetic scenes per split.
        seed: seed of the synthetic world.
    """
    import tasks
    from data_tools import synth

    texts = list(template_texts())
    texts.append(" ".join(synth.vocabulary()))
    for split in synth.SPLITS:
        for index in range(num_scenes):
            _, per_task = synth.make_image(seed, split, index, synth.DEFAULT_IMAGE_SIZE, render=False)
            for name, records in per_task.items():
                task = tasks.get_task(name)
                for record in records:
                    texts.extend(record_texts(record))
                    # One template per record, rotating, keeps the corpus balanced and small.
                    templates = task.templates_for(record)
                    texts.append(task.prompt(record, template=index % len(templates)))
                    texts.append(task.target(record))
    return [t for t in (clean(t) for t in texts) if t]


def corpus(data_dirs: Iterable[str]) -> Iterator[str]:
    """Tokenizer training text: every template, then the records of ``data_dirs`` (the default corpus if none)."""
    data_dirs = list(data_dirs)
    yield from template_texts()
    if not data_dirs:
        yield from default_corpus_texts()
    for data_dir in data_dirs:
        yield from (clean(t) for t in dataset_texts(data_dir))
