"""The Frozen recipe's data (data_tools/frozen.py): the language model's text, span corruption,
prompts, and fast-binding episodes; and the recipe end to end on its quick setting (slow)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_tools import frozen, synth

CAPTIONS = [
    {"id": "train-000000", "captions": ["a red cross and a blue circle", "a blue circle right of a red cross"]},
    {"id": "train-000001", "captions": ["a large green square"]},
]
QUESTIONS = [
    {"id": "train-000000-q0", "question": "what color is the cross?", "answers": ["red", "orange", "red"]},
    {"id": "train-000000-q1", "question": "how many circles are there?", "answers": ["1", "one", "1"]},
    {"id": "train-000001-q0", "question": "is there a square?", "answers": ["yes"] * 3},
]


def test_the_language_models_text_puts_each_answered_question_after_a_caption_of_its_image():
    records = frozen.lm_texts(CAPTIONS, QUESTIONS, seed=0)
    text = " ".join(r["text"] for r in records)
    assert "a red cross and a blue circle. question: what color is the cross? answer: red." in text
    assert (
        "a blue circle right of a red cross. question: how many circles are there? answer: 1." in text
    )  # next caption
    assert "a large green square. question: is there a square? answer: yes." in text
    assert all(r["image"] is None and 1 <= r["text"].count("question:") <= frozen.MAX_UNITS for r in records)
    assert records == frozen.lm_texts(CAPTIONS, QUESTIONS, seed=0)
    with pytest.raises(ValueError, match="vqa record 'train-000009-q0': no captioning record 'train-000009'"):
        frozen.lm_texts(CAPTIONS, [{**QUESTIONS[0], "id": "train-000009-q0"}])


def test_span_corruption_is_t5s_format_and_restores_the_text():
    text = "a red cross and a blue circle. question: what color is the cross? answer: red."
    rng = random.Random(0)
    for _ in range(20):
        source, target = frozen.span_corruption(text, rng)
        assert target.startswith("<extra_id_0>") and target.split()[-1].startswith("<extra_id_")
        spans, current = {}, None
        for word in target.split():
            if word.startswith("<extra_id_"):
                current = spans.setdefault(word, [])
            else:
                current.append(word)
        restored = " ".join(" ".join(spans[w]) if w in spans else w for w in source.split())
        assert restored == text
        assert 1 <= source.count("<extra_id_") <= 3


def test_the_suffix_blank_is_the_end_of_the_text_and_both_kinds_are_drawn():
    text = "a red cross. question: what color is the cross? answer: red."
    rng = random.Random(0)
    for _ in range(20):
        source, target = frozen.suffix_infilling(text, rng)
        assert (
            source.endswith(" <extra_id_0>") and target.startswith("<extra_id_0> ") and target.endswith(" <extra_id_1>")
        )
        assert source.removesuffix(" <extra_id_0>") + " " + target[len("<extra_id_0> ") : -len(" <extra_id_1>")] == text
    kinds = [frozen.lm_example(text, rng)[0].endswith("<extra_id_0>") for _ in range(400)]
    assert 0.4 < sum(kinds) / len(kinds) < 0.75  # half suffix blanks, and span corruption's blank may end a text


def test_a_blank_is_read_back_up_to_the_end_of_its_sentence():
    assert frozen.parse_blank("<pad><extra_id_0> red<extra_id_1></s>") == "red"
    assert frozen.parse_blank("<pad> <extra_id_0> red. a large cross. question</s>") == "red"
    assert (
        frozen.parse_blank("<pad> <extra_id_0> a red cross, a blue circle. question:") == "a red cross, a blue circle"
    )
    assert frozen.parse_blank("<pad> dax</s><pad>") == "dax"  # no sentinel written: the whole text
    assert frozen.blank_target("dax") == "<extra_id_0> dax <extra_id_1>"


def test_prompts_have_one_placeholder_per_image_and_the_blank_last():
    prompt = frozen.vqa_prompt("how many circles?", [("what color is it?", "red"), ("is there a cross?", "no")])
    assert prompt == (
        "<image> question: what color is it? answer: red. <image> question: is there a cross? answer: no. "
        "<image> question: how many circles? answer: <extra_id_0>"
    )
    assert frozen.binding_prompt(["dax", "blicket"]) == (
        "<image> this is a dax. <image> this is a blicket. <image> question: what is this? answer: <extra_id_0>"
    )
    assert frozen.CAPTION_PROMPT == "<image> <extra_id_0>"


def _main_color(image) -> str:
    pixels = np.asarray(image).reshape(-1, 3).astype(int)
    distance = {name: np.abs(pixels - rgb).sum(axis=1) for name, rgb in synth.COLORS.items()}
    return max(synth.COLORS, key=lambda name: int((distance[name] < 60).sum()))


@pytest.mark.parametrize(("ways", "shots"), [(2, 1), (5, 3)])
def test_binding_episodes_name_each_category_and_ask_about_one(ways, shots):
    episodes = frozen.binding_episodes("test", ways=ways, shots=shots, count=6, seed=0, image_size=64)
    assert len(episodes) == 6
    for episode in episodes:
        assert len(episode.supports) == len(episode.names) == ways * shots
        assert len(set(episode.names)) == ways and set(episode.names) <= set(frozen.NAMES)
        assert episode.answer in episode.names and episode.prompt.count("<image>") == ways * shots + 1
        pairs = {tuple(c.split()) for c in episode.categories}
        assert len(pairs) == ways and not pairs & synth.HELDOUT_PAIRS and episode.asked in episode.categories
        # The query and the support images named like the answer show the asked category's colour.
        named = [img for img, name in zip(episode.supports, episode.names, strict=True) if name == episode.answer]
        color = episode.asked.split()[0]
        assert len(named) == shots and {_main_color(img) for img in [*named, episode.query]} == {color}
    again = frozen.binding_episodes("test", ways=ways, shots=shots, count=6, seed=0, image_size=64)
    assert [e.names for e in again] == [e.names for e in episodes]
    assert np.array_equal(np.asarray(again[0].query), np.asarray(episodes[0].query))


def test_heldout_episodes_ask_about_a_held_out_pair_and_five_names_is_the_limit():
    for episode in frozen.binding_episodes("heldout", ways=2, shots=1, count=8, seed=1, image_size=64):
        assert tuple(episode.asked.split()) in synth.HELDOUT_PAIRS
        assert _main_color(episode.query) == episode.asked.split()[0]
        named = [img for img, n in zip(episode.supports, episode.names, strict=True) if n == episode.answer]
        assert [_main_color(img) for img in named] == [episode.asked.split()[0]]
    with pytest.raises(ValueError, match="ways must be from 2 to 5"):
        frozen.binding_episodes("test", ways=6, shots=1, count=1, seed=0)


@pytest.mark.slow
def test_the_recipe_runs_end_to_end_on_its_quick_setting(tmp_path):
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "table.md"
    command = [sys.executable, str(root / "scripts" / "frozen.py"), "--quick", "--out", str(out)]
    result = subprocess.run([*command, "--work", str(tmp_path / "work")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = out.read_text()
    for label in ("| Frozen |", "| Frozen finetuned |", "| Frozen scratch |", "| Frozen blind |", "| chance"):
        assert table.count(label) == 2  # test and heldout
    raw = json.loads(out.with_suffix(".json").read_text())
    metrics = raw["results"]["frozen"]["0"]["metrics"]
    assert {"test/captioning_cider", "heldout/vqa_4shot", "test/binding_5way_3shot"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if "binding" in k or "vqa" in k)
