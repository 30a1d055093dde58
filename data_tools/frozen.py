"""The Frozen recipe's data (Tsimpoukelli et al. 2021): the language model's text, its examples, the
few-shot prompts and the fast-binding episodes, on any data folder with captioning and VQA records.

``scripts/frozen.py`` runs the recipe; docs/frozen.md describes it. One format throughout, so that
what the text-only language model learns is what the prompts ask:

* **the language model's text** (:func:`lm_texts`): each training image's VQA questions with their
  answers, each after one of the image's captions, ``"{caption}. question: {q} answer: {a}."``;
  one to :data:`MAX_UNITS` such units make a ``text_infilling`` record;
* **its examples** (:func:`lm_example`): text infilling in T5's sentinel format, half of them T5's
  span corruption with the ``text_infilling`` task's noise (:func:`span_corruption`), half with the
  blank at the text's end (:func:`suffix_infilling`, UL2's S-denoiser), which makes the model a
  language model that continues a text, as Frozen's is;
* **the prompts** put an image where a unit's caption would be and the blank at the end, where the
  model continues: captioning ``"<image> <extra_id_0>"``; VQA after k solved examples
  ``"<image> question: q1 answer: a1. ... <image> question: q answer: <extra_id_0>"``; fast binding
  (Frozen §4.3) ``"<image> this is a dax. <image> this is a blicket. <image> question: what is
  this? answer: <extra_id_0>"``. The model writes ``"<extra_id_0> red. ..."``; the answer is the
  first sentence (:func:`parse_blank`).

Fast-binding images show one object (a colour-shape pair of the synthetic world, drawn like its
scenes); a category gets a nonsense name for one episode only.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from PIL import Image

from data_tools import synth
from tasks.text_infilling import random_spans_noise_mask, sentinel

IMAGE = "<image>"  # unified_vl.tokenizer.IMAGE_TOKEN; data_tools does not import the library
# Frozen's nonsense names for miniImageNet fast binding (Tsimpoukelli et al. 2021, §4.3, "dax",
# "blicket", ...); the 5-way tasks need five.
NAMES = ("dax", "blicket", "slation", "perpo", "shously")
MAX_UNITS = 3  # units per language-model text: texts of several units teach the k-shot layout
# Half the language model's examples blank the text's end (UL2 mixes its denoisers; our split):
# the prompts' blank is at the end, where span corruption alone rarely puts one.
SUFFIX_RATE = 0.5
BINDING_QUESTION = "question: what is this? answer:"


def answer_of(record: Mapping) -> str:
    """A VQA record's answer: the most common of its human answers (ties: the first given)."""
    answers = list(record["answers"])
    return max(answers, key=answers.count)


def unit(caption: str, question: str, answer: str) -> str:
    """One unit of the language model's text."""
    return f"{caption.rstrip('.')}. question: {question} answer: {answer}."


def lm_texts(captions: Sequence[Mapping], questions: Sequence[Mapping], *, seed: int = 0) -> list[dict]:
    """``text_infilling`` records of the language model: every question of an image, with its answer,
    after one of the image's captions (taken in turn), grouped 1..MAX_UNITS units to a text.

    Args:
        captions: captioning records (``id``, ``captions``).
        questions: VQA records whose ``id`` starts with an image's id (``train-000017-q3``).
        seed: the grouping's seed.

    Raises:
        ValueError: a question whose image has no captioning record.
    """
    by_image = {r["id"]: list(r["captions"]) for r in captions}
    units = []
    turn: dict[str, int] = {}
    for record in questions:
        image_id = record["id"].rsplit("-q", 1)[0]
        if image_id not in by_image:
            raise ValueError(f"vqa record {record['id']!r}: no captioning record {image_id!r} to put before it")
        k = turn.get(image_id, 0)
        turn[image_id] = k + 1
        image_captions = by_image[image_id]
        units.append(unit(image_captions[k % len(image_captions)], record["question"], answer_of(record)))
    rng = random.Random(f"lm-texts:{seed}")
    rng.shuffle(units)
    texts, i = [], 0
    while i < len(units):
        n = rng.randint(1, MAX_UNITS)
        texts.append(" ".join(units[i : i + n]))
        i += n
    return [{"id": f"lm-{k:06d}", "image": None, "width": 0, "height": 0, "text": t} for k, t in enumerate(texts)]


def span_corruption(text: str, rng: random.Random) -> tuple[str, str]:
    """T5's span corruption of ``text``'s words: ``(input with sentinels, sentinels + spans target)``.

    The noise is the ``text_infilling`` task's (15 % of the words in spans of mean length 3); the
    target is T5's (Raffel et al. 2020, Figure 2): each sentinel and the words it hides, then a final
    sentinel, not the task's whole restored text (OFA's target), so that a filled blank is short.
    """
    words = text.split()
    mask = random_spans_noise_mask(len(words), rng)
    source, target, span = [], [], 0
    for i, (word, noise) in enumerate(zip(words, mask, strict=True)):
        if not noise:
            source.append(word)
            continue
        if i == 0 or not mask[i - 1]:
            source.append(sentinel(span))
            target.append(sentinel(span))
            span += 1
        target.append(word)
    target.append(sentinel(span))
    return " ".join(source), " ".join(target)


def suffix_infilling(text: str, rng: random.Random) -> tuple[str, str]:
    """The text's end as the blank: ``(first words + sentinel, sentinel + the rest + final sentinel)``.

    UL2's S-denoiser (Tay et al. 2022, §3.1.2: "prefix language modeling" as span corruption with
    the span at the end; T5's prefix LM objective, Raffel et al. 2020 §3.3.2): the split falls
    uniformly between two words, so every word after it is predicted from all before it, as a
    decoder-only language model such as Frozen's is trained.
    """
    words = text.split()
    k = rng.randint(1, max(1, len(words) - 1))
    return " ".join([*words[:k], sentinel(0)]), " ".join([sentinel(0), *words[k:], sentinel(1)])


def lm_example(text: str, rng: random.Random, *, suffix_rate: float = SUFFIX_RATE) -> tuple[str, str]:
    """One language-model example: T5 span corruption, or with ``suffix_rate`` the suffix blank."""
    return suffix_infilling(text, rng) if rng.random() < suffix_rate else span_corruption(text, rng)


def blank_target(answer: str) -> str:
    """The target of a prompt with one blank: ``"<extra_id_0> {answer} <extra_id_1>"``."""
    return f"{sentinel(0)} {answer} {sentinel(1)}"


def parse_blank(text: str) -> str:
    """What the model wrote into its first blank (decoded with special tokens), up to the sentence's end.

    A blank at the end of a prompt is filled with the rest of a text (see :func:`suffix_infilling`):
    the answer, caption or name is its first sentence.
    """
    text = text.replace("</s>", "<extra_id_>").replace("<pad>", " ")
    start = text.find(sentinel(0))
    if start >= 0:
        text = text[start + len(sentinel(0)) :]
    text = text.split("<extra_id_")[0].split(".")[0]
    return " ".join(text.split())


CAPTION_PROMPT = f"{IMAGE} {sentinel(0)}"


def vqa_prompt(question: str, solved: Sequence[tuple[str, str]] = ()) -> str:
    """A VQA prompt after ``solved`` ``(question, answer)`` examples, one image each, in order."""
    shots = [f"{IMAGE} question: {q} answer: {a}." for q, a in solved]
    return " ".join([*shots, f"{IMAGE} question: {question} answer: {sentinel(0)}"])


def binding_prompt(names: Sequence[str]) -> str:
    """Frozen's fast-binding prompt: ``"this is a {name}."`` after each support image, then the question."""
    shots = [f"{IMAGE} this is a {name}." for name in names]
    return " ".join([*shots, f"{IMAGE} {BINDING_QUESTION} {sentinel(0)}"])


# -- fast-binding episodes -----------------------------------------------------------------------


def object_image(color: str, shape: str, key: str, *, image_size: int) -> Image.Image:
    """One large ``color`` ``shape`` in a random cell, on the world's background with its clutter."""
    rng = random.Random(f"binding:{key}")
    s = float(image_size)
    r = round(synth.LARGE_R * rng.uniform(*synth.MAIN_R) * s, 2)
    row, col = rng.randrange(synth.GRID), rng.randrange(synth.GRID)
    cx = round(min(s - r, max(r, (col + 0.5) * s / synth.GRID)), 2)
    cy = round(min(s - r, max(r, (row + 0.5) * s / synth.GRID)), 2)
    rgb = tuple(min(255, max(0, c + rng.randint(-synth.COLOR_JITTER, synth.COLOR_JITTER))) for c in synth.COLORS[color])
    obj = synth.SceneObject(shape, color, "large", cx, cy, r, rgb)
    background = rng.randint(175, 225)
    line = (*(round(rng.uniform(0, s), 2) for _ in range(4)), background + rng.choice((-1, 1)) * rng.randint(18, 40))
    scene = synth.Scene(image_size, (obj,), 0, background, (line,), rng.getrandbits(63))
    return synth.render_scene(scene)


@dataclass(frozen=True)
class Episode:
    """One fast-binding task: support images named in order, then a query of one of the categories."""

    supports: tuple[Image.Image, ...]
    names: tuple[str, ...]  # the support images' names, in order
    query: Image.Image
    answer: str  # the query's category's name
    categories: tuple[str, ...]  # "colour shape" of each way
    way_names: tuple[str, ...]  # each way's name, aligned with ``categories``

    @property
    def asked(self) -> str:
        """The query's category."""
        return self.categories[self.way_names.index(self.answer)]

    @property
    def prompt(self) -> str:
        return binding_prompt(self.names)


def categories(split: str) -> list[tuple[str, str]]:
    """The colour-shape pairs a split's episodes use: those seen in training (``heldout``: the held-out ones)."""
    pairs = [(c, s) for c in synth.COLOR_NAMES for s in synth.SHAPES]
    held = sorted(synth.HELDOUT_PAIRS)
    return held if split == "heldout" else [p for p in pairs if p not in synth.HELDOUT_PAIRS]


def binding_episodes(
    split: str, *, ways: int, shots: int, count: int, seed: int, image_size: int = synth.DEFAULT_IMAGE_SIZE
) -> list[Episode]:
    """``count`` episodes of ``ways``-way ``shots``-shot fast binding (Frozen §4.3, miniImageNet style).

    Each episode draws ``ways`` categories and gives them ``ways`` of :data:`NAMES` at random;
    the support shows ``shots`` images of each (``ways * shots`` in a shuffled order, each followed by
    its name), the query one more image of one category. On ``heldout`` the query's category is a
    held-out colour-shape pair, the others any pair; elsewhere every category is a training pair.
    Chance is ``1 / ways``.

    Raises:
        ValueError: more ways than names.
    """
    if not 1 < ways <= len(NAMES):
        raise ValueError(f"ways must be from 2 to {len(NAMES)} (one nonsense name each), got {ways}")
    rng = random.Random(f"episodes:{split}:{ways}:{shots}:{seed}")
    pool = categories(split)
    everything = [(c, s) for c in synth.COLOR_NAMES for s in synth.SHAPES]
    episodes = []
    for e in range(count):
        if split == "heldout":
            target = rng.choice(pool)
            chosen = [target, *rng.sample([p for p in everything if p != target], ways - 1)]
            rng.shuffle(chosen)
        else:
            chosen = rng.sample(pool, ways)
            target = rng.choice(chosen)
        names = rng.sample(NAMES, ways)
        order = [(k, j) for k in range(ways) for j in range(shots)]
        rng.shuffle(order)
        key = f"{split}:{ways}:{shots}:{seed}:{e}"
        supports = [object_image(*chosen[k], f"{key}:{k}:{j}", image_size=image_size) for k, j in order]
        query = object_image(*target, f"{key}:query", image_size=image_size)
        episodes.append(
            Episode(
                supports=tuple(supports),
                names=tuple(names[k] for k, _ in order),
                query=query,
                answer=names[chosen.index(target)],
                categories=tuple(f"{c} {s}" for c, s in chosen),
                way_names=tuple(names),
            )
        )
    return episodes
