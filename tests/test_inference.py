"""The Python inference API (`Predictor`) and `unified-vl predict`.

The model folder is a uvl-tiny model trained for a few steps on four images (captions, answers,
boxes, labels), so that its outputs are non-empty and differ between images: equality tests
between batched and one-at-a-time runs, and between serving and evaluation, compare real text.
`tests/test_server.py` serves the same folder.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tasks
from tasks import boxes

QUESTION = "what color is the shape?"
EXPRESSION = "the shape"
LABELS = ["circle", "triangle", "star", "square"]
# One training example per (image, task); the images have different sizes so boxes in pixels differ.
CAPTIONS = ["a red circle left of a blue square", "two green triangles", "a yellow star", "a blue square"]
ANSWERS = ["red", "green", "yellow", "blue"]
BOX_TOKENS = [
    "<loc_100><loc_200><loc_500><loc_600>",
    "<loc_300><loc_100><loc_900><loc_700>",
    "<loc_10><loc_20><loc_300><loc_400>",
    "<loc_500><loc_500><loc_990><loc_990>",
]
TRAIN_STEPS = 30


def scene_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 64 - 4 * i, 3), dtype=np.uint8)) for i in range(4)]


@contextmanager
def torch_threads(n: int):
    # Two shared CPU cores: torch's intra-op threads spin against other processes and slow a
    # tiny model down 50-fold; one thread is fastest here.
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def build_served_model(folder: Path) -> Path:
    """A briefly trained uvl-tiny model folder (a few seconds on one CPU core)."""
    from unified_vl.checkpoint import save_pretrained
    from unified_vl.config import UnifiedVLConfig
    from unified_vl.modeling import build_model
    from unified_vl.processor import UnifiedVLProcessor
    from unified_vl.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    config = UnifiedVLConfig.from_preset("uvl-tiny", text_config={"vocab_size": len(tokenizer)})
    torch.manual_seed(0)
    model = build_model(config, tokenizer)
    processor = UnifiedVLProcessor.from_config(config, tokenizer, vision_backbone=model.visual.backbone)
    images, prompts, targets = [], [], []
    for i, image in enumerate(scene_images()):
        record = {"image": image, "width": image.width, "height": image.height}
        for task, fields, target in (
            ("captioning", {}, CAPTIONS[i]),
            ("vqa", {"question": QUESTION}, ANSWERS[i]),
            ("rec", {"expression": EXPRESSION}, BOX_TOKENS[i]),
            ("classification", {}, LABELS[i]),
        ):
            images.append(image)
            prompts.append(tasks.get_task(task).prompt({**record, **fields}))
            targets.append(target)
    batch = processor(images=images, text=prompts, targets=targets)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(TRAIN_STEPS):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_pretrained(model.eval(), processor, folder)


@pytest.fixture(scope="session")
def served_model_dir(tmp_path_factory) -> Path:
    # Shared with tests/test_server.py through the session's base temp folder.
    folder = tmp_path_factory.getbasetemp() / "served-model"
    if not (folder / "config.json").is_file():
        with torch_threads(1):
            build_served_model(folder)
    return folder


@pytest.fixture(scope="module")
def predictor(served_model_dir):
    from unified_vl import Predictor

    with torch_threads(1):
        yield Predictor.from_pretrained(served_model_dir, device="cpu", batch_size=3)


@pytest.fixture(scope="module")
def images():
    return scene_images()


def _same(a, b) -> None:
    """Results equal, scores to float tolerance (padding changes the summation order)."""
    da, db = a.to_dict(), b.to_dict()
    sa, sb = da.pop("score"), db.pop("score")
    for item_a, item_b in zip(da.get("top_k", []), db.get("top_k", []), strict=True):
        assert item_a.pop("score") == pytest.approx(item_b.pop("score"), abs=1e-4)
    assert da == db
    assert sa == pytest.approx(sb, abs=1e-4)


# -- batched == one at a time -------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, texts, options",
    [
        ("caption", None, {}),
        ("answer", QUESTION, {}),
        ("answer", QUESTION, {"candidates": ANSWERS}),
        ("locate", EXPRESSION, {}),
        ("ground", "a red circle and a blue square", {}),
        ("classify", None, {}),
        ("classify", None, {"labels": LABELS, "top_k": 3}),
        ("detect", None, {"max_new_tokens": 12}),
        ("generate", "what does the image describe?", {"num_beams": 2}),
    ],
)
def test_batched_results_equal_one_at_a_time(predictor, images, method, texts, options):
    call = getattr(predictor, method)
    args = (images,) if texts is None else (images, [texts] * len(images))
    batched = call(*args, **options)  # batch_size=3: a full batch and a partial one
    singles = [call(*((img,) if texts is None else (img, texts)), **options)[0] for img in images]
    assert len(batched) == len(images)
    for b, s in zip(batched, singles, strict=True):
        _same(b, s)
    if method in ("caption", "answer", "locate"):
        assert len({r.text for r in batched}) > 1, f"identical outputs would make the test vacuous: {batched}"


def test_outputs_are_the_trained_ones_and_parse_like_evaluation(predictor, images):
    captions = predictor.caption(images)
    assert [c.caption for c in captions][:1] == CAPTIONS[:1]
    answers = predictor.answer(images, QUESTION)
    assert sum(a.answer == gold for a, gold in zip(answers, ANSWERS, strict=True)) >= 3
    for result in captions + answers:
        assert isinstance(result.score, float) and result.score <= 0.0


def test_a_served_answer_equals_the_evaluated_one(predictor, images):
    from unified_vl.generation import generate_texts

    task = tasks.get_task("vqa")
    records = [{"image": im, "width": im.width, "height": im.height, "question": QUESTION} for im in images]
    evaluated = generate_texts(predictor.model, predictor.processor, images, [task.prompt(r) for r in records])
    served = predictor.answer(images, QUESTION)
    assert [r.text for r in served] == evaluated
    assert [r.answer for r in served] == [task.parse(t, r) for t, r in zip(evaluated, records, strict=True)]


def test_locate_gives_boxes_in_pixels_of_each_original_image(predictor, images):
    located = predictor.locate(images, EXPRESSION)
    for image, result in zip(images, located, strict=True):
        assert len(boxes.parse_loc_bins(result.text)) == 4  # "loc4" decoding
        assert result.box == pytest.approx(boxes.tokens_to_box(result.text, image.width, image.height))
        boxes.validate_box(result.box, image.width, image.height)
    # The first image learned <loc_100><loc_200><loc_500><loc_600> on a 64x48 image.
    assert located[0].box == pytest.approx([0.1005 * 64, 0.2005 * 48, 0.5005 * 64, 0.6005 * 48])


def test_classify_ranks_labels_through_score_candidates(predictor, images):
    from unified_vl.generation import score_candidates

    results = predictor.classify(images, labels=LABELS, top_k=3)
    prompt = tasks.get_task("classification").prompt({"width": 1, "height": 1})
    scores = score_candidates(predictor.model, predictor.processor, images, [prompt] * len(images), LABELS)
    for result, row in zip(results, scores.tolist(), strict=True):
        order = sorted(range(len(LABELS)), key=lambda k: -row[k])
        assert [item.label for item in result.top_k] == [LABELS[k] for k in order[:3]]
        assert [item.score for item in result.top_k] == pytest.approx([row[k] for k in order[:3]], abs=1e-5)
        assert result.label == result.top_k[0].label and result.score == result.top_k[0].score
    assert [r.label for r in results] == LABELS  # the trained labels


def test_classify_scores_a_label_by_its_best_verbalizer_word(predictor, images):
    from tasks.classification import make_task

    original = tasks.get_task("classification")
    tasks.register(make_task({"circle": ["ring", "circle"], "square": ["square"]}), replace=True)
    try:
        (result,) = predictor.classify(images[:1], labels=["circle", "square"], top_k=2)
    finally:
        tasks.register(original, replace=True)
    (plain,) = predictor.classify(images[:1], labels=["ring", "circle", "square"], top_k=3)
    word_scores = {item.label: item.score for item in plain.top_k}
    assert result.top_k[0].label == "circle"
    assert result.top_k[0].score == pytest.approx(max(word_scores["ring"], word_scores["circle"]))
    assert result.text == max(("ring", "circle"), key=word_scores.get)


def test_answer_with_candidates_is_one_of_them(predictor, images):
    candidates = ["purple", "yellow", "red"]
    for result in predictor.answer(images, QUESTION, candidates=candidates):
        assert result.answer in candidates


def test_generic_predict_covers_every_task_with_image_inputs(predictor, images):
    itm = predictor.predict("itm", images[:2], {"text": "a red circle"})
    assert all(r.task == "itm" and r.text in ("no", "yes") and isinstance(r.prediction, bool) for r in itm)
    region = predictor.predict("grounding", images[0], {"region": [0, 0, 32, 24]})[0]
    assert region.task == "grounding" and math.isfinite(region.score)


def test_grounding_copies_each_querys_own_caption_in_one_batch(predictor, images):
    import re

    captions = ["a red circle left of a blue square", "two green triangles", "a yellow star"]
    # One batch (batch_size 3), three captions: each row is held to its own.
    results = predictor.predict("grounding", images[:3], [{"caption": c} for c in captions], max_new_tokens=40)
    for result, caption in zip(results, captions, strict=True):
        words = caption.split()
        spans = {" ".join(words[a:b]) for a in range(len(words)) for b in range(a + 1, len(words) + 1)}
        items = [re.fullmatch(r"([^<]+?)(<loc_\d+>){4}", item) for item in result.text.split(" ; ")]
        assert items and all(items), f"{result.text!r} is not phrase<loc>x4 ; ..."
        assert all(item[1] in spans for item in items), (result.text, caption)


def test_one_image_broadcasts_over_several_questions(predictor, images):
    results = predictor.answer(images[0], [QUESTION, "what is it?"])
    assert len(results) == 2
    _same(results[0], predictor.answer([images[0]], [QUESTION])[0])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p, im: p.predict("painting", im), r"unknown task 'painting'; known tasks: captioning, classification"),
        (lambda p, im: p.predict("vqa", im, {}), r"missing field 'question'"),
        (lambda p, im: p.predict("vqa", im, {"question": 7}), r"field 'question' must be str"),
        (lambda p, im: p.predict("vqa", im, {"question": "q", "colour": "red"}), r"unknown field 'colour'"),
        (lambda p, im: p.classify(im, top_k=2), r"top_k > 1 ranks labels"),
        (lambda p, im: p.answer(im, "q", labels=["a"]), r"labels only apply to tasks with a 'label' field"),
        (lambda p, im: p.locate(im, "x", candidates=["a"]), r"candidates do not apply to a task that writes a box"),
        (lambda p, im: p.answer([im, im], ["a", "b", "c"]), r"got 2 images but 3 texts"),
    ],
)
def test_bad_inputs_name_what_is_wrong(predictor, images, call, match):
    from unified_vl.app.inference.predictor import InputError

    with pytest.raises(InputError, match=match):
        call(predictor, images[0])


def test_from_pretrained_takes_a_dtype(served_model_dir, images):
    from unified_vl import Predictor

    with torch_threads(1):
        predictor = Predictor.from_pretrained(served_model_dir, device="cpu", dtype="bfloat16")
        (result,) = predictor.caption(images[:1])
    assert predictor.model.dtype == torch.bfloat16 and predictor.name == "served-model"
    assert isinstance(result.caption, str) and math.isfinite(result.score)
    with pytest.raises(ValueError, match="unknown dtype 'float8'; expected one of float32, float16, bfloat16"):
        Predictor.from_pretrained(served_model_dir, dtype="float8")


def test_predict_cli_prints_json_and_draws_boxes(served_model_dir, images, tmp_path, capsys):
    from unified_vl.app.cli import main

    images[0].save(tmp_path / "scene.png")
    with torch_threads(1):
        code = main(
            ["predict", "--model", str(served_model_dir), "--task", "rec", "--image", str(tmp_path / "scene.png"),
             "--text", EXPRESSION, "--device", "cpu", "--out", str(tmp_path / "vis.png")]
        )  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "rec" and out["model"] == "served-model"
    x1, y1, x2, y2 = out["prediction"]["box"]
    drawn = np.asarray(Image.open(tmp_path / "vis.png"))
    original = np.asarray(images[0])
    assert drawn.shape == original.shape
    changed = np.argwhere((drawn != original).any(axis=-1))  # (N, 2) rows of (y, x)
    # The rectangle's outline lies on the predicted box (within a pixel of rounding).
    assert changed[:, 1].min() <= x1 + 1 and changed[:, 1].max() >= x2 - 1
    assert changed[:, 0].max() >= y2 - 1


def test_predict_cli_reports_bad_input_with_exit_code_2(served_model_dir, images, tmp_path, capsys):
    from unified_vl.app.cli import main

    (tmp_path / "not.png").write_text("not an image")
    assert (
        main(
            [
                "predict",
                "--model",
                str(served_model_dir),
                "--task",
                "vqa",
                "--image",
                str(tmp_path / "not.png"),
                "--text",
                "q",
            ]
        )
        == 2
    )
    assert "not a readable image" in capsys.readouterr().err
    images[0].save(tmp_path / "scene.png")
    assert (
        main(["predict", "--model", str(tmp_path), "--task", "captioning", "--image", str(tmp_path / "scene.png")]) == 2
    )
    assert "no config.json" in capsys.readouterr().err
    assert (
        main(["predict", "--model", str(served_model_dir), "--task", "captioning", "--image", "x.png", "--text", "q"])
        == 2
    )
    assert "takes no --text" in capsys.readouterr().err
