"""The text the project itself produces: the corpus of the default tokenizer shipped with the package.

It holds every task's instruction templates filled with synthetic records, the targets of those
records (location tokens and sentinels removed: the tokenizer adds them as tokens of their own), the records'
own text (captions, questions, answers, expressions, phrases, labels, ...) for a fixed sample of
synthetic scenes of every split (held-out pairs included, so their words are known), and the
world's vocabulary. Scenes are generated in memory without drawing; the result is deterministic.
"""

from __future__ import annotations

import re

NUM_SCENES = 250  # per split; covers every word and template (checked by tests), ~2 s
SEED = 0

# Location tokens and T5 sentinels (text infilling's <extra_id_N>) are whole tokens that the
# tokenizer adds itself; SentencePiece must not learn pieces for their characters.
_SPECIAL = re.compile(r"<loc_\d+>|<extra_id_\d+>")


def _clean(text: str) -> str:
    return " ".join(_SPECIAL.sub(" ", text).split())


def default_corpus_texts(*, num_scenes: int = NUM_SCENES, seed: int = SEED) -> list[str]:
    """Deterministic list of sentences for tokenizer training (see the module docstring).

    Args:
        num_scenes: synthetic scenes per split.
        seed: seed of the synthetic world.
    """
    import tasks
    from data_tools import synth
    from data_tools.cli import record_texts, template_texts

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
    return [t for t in (_clean(t) for t in texts) if t]
