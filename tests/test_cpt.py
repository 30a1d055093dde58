"""CPT colour prompts (`unified_vl.prompting.cpt`): painting, templates, scoring over painted copies,
chunking, the proposals file, bad input, and the method through the CLI, the Predictor and the server."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from test_inference import scene_images, served_model_dir, torch_threads  # noqa: F401  (a fixture)
from test_jobs import FAST, synth_data  # noqa: F401  (a fixture)

import tasks
from tasks import boxes
from unified_vl.prompting import get_method
from unified_vl.prompting.cpt import (
    ALPHA,
    PALETTE,
    TEMPLATES,
    CPTError,
    candidates_of,
    choose,
    copies,
    paint,
    paint_copy,
    palette_from,
    templates_from,
)

CPT = get_method("cpt")


def noise(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def blended(pixels: np.ndarray, rgb, alpha: int) -> np.ndarray:
    return pixels.astype(float) + (np.array(rgb, dtype=float) - pixels) * alpha / 255


# -- painting -------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [ALPHA, 200])
def test_painting_puts_the_colour_at_alpha_exactly_inside_the_box(alpha):
    image = noise()
    before = np.asarray(image).copy()
    box_a, box_b = [2.4, 3.6, 10.5, 7.5], [20.0, 10.0, 40.0, 30.0]  # pixel centres: columns 2-9, rows 4-6
    painted = np.asarray(paint(image, [box_a, box_b], [PALETTE[0][1:], PALETTE[1][1:]], alpha=alpha)).astype(int)
    inside_a = np.zeros(before.shape[:2], bool)
    inside_a[4:7, 2:10] = True
    inside_b = np.zeros(before.shape[:2], bool)
    inside_b[10:30, 20:40] = True
    # Pillow rounds the blend to the nearest integer (at most 1 off the exact value).
    assert np.abs(painted[inside_a] - blended(before[inside_a], (240, 0, 30), alpha)).max() <= 1
    assert np.abs(painted[inside_b] - blended(before[inside_b], (0, 10, 255), alpha)).max() <= 1
    outside = ~(inside_a | inside_b)
    assert (painted[outside] == before[outside]).all()  # untouched, to the bit
    assert (painted[inside_a] != before[inside_a]).any(axis=-1).mean() > 0.9
    assert (np.asarray(image) == before).all()  # the input image is not changed


def test_painting_a_mask_paints_the_mask_not_the_box():
    image = noise(seed=1)
    before = np.asarray(image).astype(int)
    mask = np.zeros((30, 40), bool)
    mask[5:9, 5:7] = True
    triangle = [[20.0, 20.0, 30.0, 20.0, 20.0, 30.0]]  # COCO polygon
    painted = np.asarray(
        paint(image, [[0, 0, 40, 30], [0, 0, 40, 30]], [(0, 255, 0), (255, 255, 25)], masks=[mask, triangle])
    ).astype(int)
    changed = (painted != before).any(axis=-1)
    assert changed[mask].all() and changed[21, 21] and not changed[28, 28] and not changed[0, 39]
    assert np.abs(painted[mask] - blended(before[mask], (0, 255, 0), ALPHA)).max() <= 1


def test_a_record_with_candidate_masks_is_painted_on_them():
    triangle = [[2.0, 3.0, 10.0, 3.0, 2.0, 9.0]]  # the lower-right half of the gold box stays unpainted
    record = rec_record(candidate_masks=[triangle, []])
    tasks.get_task("rec").validate(record)
    example = CPT.make_example("rec", record, random.Random(0), CPT.resolve_options({}))
    before, after = np.asarray(record["image"]).astype(int), np.asarray(example.image).astype(int)
    changed = (after != before).any(axis=-1)
    assert changed[3, 2] and not changed[8, 9]  # inside the triangle / inside the box only
    assert changed[10:30, 20:40].all()  # the second candidate has no mask: its box
    with pytest.raises(tasks.RecordError, match="one entry per candidate box"):
        tasks.get_task("rec").validate(rec_record(candidate_masks=[triangle]))


def test_candidate_masks_are_stored_with_the_record(tmp_path):
    from data_tools import storage

    masked = rec_record(id="m", image=None, candidate_masks=[[[2.0, 3.0, 10.0, 3.0, 2.0, 9.0]], []])
    plain = rec_record(id="p", image=None)
    storage.write_dataset(tmp_path, {("rec", "test"): [masked, plain]}, source="test", command="test")
    rows = list(storage.load_split(tmp_path, "rec", "test"))
    assert rows[0]["candidate_masks"] == masked["candidate_masks"] and rows[1]["candidate_masks"] is None


def test_the_palette_and_alpha_are_options_and_each_colour_is_given_once():
    palette = palette_from(CPT.resolve_options({"palette": [["cyan", 0, 255, 255], ["black", 0, 0, 0]], "alpha": 64}))
    assert palette.names == ("cyan", "black") and palette.rgb[0] == (0, 255, 255) and palette.alpha == 64
    assert palette_from(CPT.resolve_options({})).names == ("red", "blue", "yellow", "purple", "green")
    with pytest.raises(CPTError, match=r"colour 'red' is given twice \(entries 0 and 2\)"):
        palette_from({"palette": [["red", 1, 2, 3], ["blue", 0, 0, 255], ["red", 9, 9, 9]]})
    with pytest.raises(CPTError, match=r"RGB \(0, 0, 255\) is given twice \('blue' and 'navy'\)"):
        palette_from({"palette": [["blue", 0, 0, 255], ["navy", 0, 0, 255]]})
    with pytest.raises(CPTError, match=r"entry 0: expected \[name, r, g, b\] with r, g, b in 0..255"):
        palette_from({"palette": [["red", 300, 0, 0]]})
    with pytest.raises(CPTError, match="'alpha' must be an integer from 1 to 255"):
        palette_from({"alpha": 0})
    with pytest.raises(CPTError, match="unknown template 'cloze'; known: sentinel, instruction"):
        templates_from({"templates": ["cloze"]})


def test_the_colour_templates():
    sentinel, instruction = TEMPLATES["sentinel"], TEMPLATES["instruction"]
    assert sentinel.prompt.format(expression="the red circle") == "the red circle is in <extra_id_0> color."
    assert sentinel.target.format(color="blue") == "<extra_id_0> blue"
    assert instruction.prompt.format(expression="x") == 'which color is the block on " x "?'
    assert instruction.target.format(color="blue") == "blue"


# -- candidates and bad input ---------------------------------------------------------------------
def rec_record(**fields):
    record = {
        "id": "r-7",
        "image": noise(),
        "width": 40,
        "height": 30,
        "expression": "the  left square.",
        "box": [2.0, 3.0, 10.0, 9.0],
        "candidate_boxes": [[2.0, 3.0, 10.0, 9.0], [20.0, 10.0, 40.0, 30.0]],
    }
    return {**record, **fields}


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"candidate_boxes": []}, r"rec record 'r-7': no candidates \(candidate_boxes is \[\]\)"),
        ({"candidate_boxes": None}, r"rec record 'r-7': no candidates"),
        ({"candidate_boxes": [[2, 3, 10, 9], [30, 10, 45, 20]]}, r"rec record 'r-7': candidate_boxes\[1\]: .* outside"),
        ({"candidate_boxes": [[2, 3, 2, 9]]}, r"rec record 'r-7': candidate_boxes\[0\] = \[2, 3, 2, 9\] is degenerate"),
        ({"candidate_boxes": [[5, 3, 2, 9]]}, r"rec record 'r-7': candidate_boxes\[0\]: expected x1 <= x2"),
        ({"expression": "  "}, r"rec record 'r-7': 'expression' must be a non-empty string"),
    ],
)
def test_bad_records_are_refused_with_the_record_named(fields, message):
    with pytest.raises(CPTError, match=message):
        CPT.check("rec", rec_record(**fields), CPT.resolve_options({}))
    with pytest.raises(CPTError, match=message):
        CPT.make_example("rec", rec_record(**fields), random.Random(0), CPT.resolve_options({}))


def test_cpt_answers_rec_only():
    with pytest.raises(CPTError, match="task 'rec'"):
        CPT.check("vqa", rec_record(), CPT.resolve_options({}))


def test_proposals_file_by_record_id_or_image_name(tmp_path):
    path = tmp_path / "proposals.json"
    path.write_text(json.dumps({"r-7": [[1, 1, 5, 5]], "scene.png": [[0, 0, 8, 8], [9, 9, 20, 20]]}))
    assert candidates_of(rec_record(), proposals_file=str(path)) == [[1.0, 1.0, 5.0, 5.0]]
    by_image = rec_record(id="other", image=str(tmp_path / "images" / "scene.png"))
    assert candidates_of(by_image, proposals_file=str(path)) == [[0, 0, 8, 8], [9, 9, 20, 20]]
    with pytest.raises(CPTError, match=r"rec record 'r-9': the proposals file .* has no boxes for 'r-9'"):
        candidates_of(rec_record(id="r-9"), proposals_file=str(path))
    path.write_text("[1, 2]")
    with pytest.raises(CPTError, match="must hold one JSON object"):
        candidates_of(rec_record(), proposals_file=str(path))


# -- training examples ----------------------------------------------------------------------------
def twelve_boxes() -> list[list[float]]:
    return [[3.0 * i, 2.0 * (i % 3), 3.0 * i + 3.0, 2.0 * (i % 3) + 9.0] for i in range(12)]


def test_a_training_example_paints_the_gold_copy_and_targets_its_colour():
    candidates = twelve_boxes()
    record = rec_record(candidate_boxes=candidates, box=candidates[7])
    options = CPT.resolve_options({"templates": ["sentinel", "instruction"]})
    examples = [CPT.make_example("rec", record, random.Random(seed), options) for seed in range(8)]
    # Candidate 7 is the third of copy 1 (candidates 5-9): yellow.
    assert {(e.prompt, e.target) for e in examples} == {
        ("the left square is in <extra_id_0> color.", "<extra_id_0> yellow"),
        ('which color is the block on " the left square "?', "yellow"),
    }
    expected = paint_copy(record["image"], candidates, palette_from(options), 1)
    assert (np.asarray(examples[0].image) == np.asarray(expected)).all()
    # Proposals that miss the referent: the gold box joins them as the last candidate (red of copy 0).
    missed = CPT.make_example("rec", rec_record(candidate_boxes=[[20, 10, 40, 30]]), random.Random(0), options)
    assert missed.target in ("<extra_id_0> blue", "blue")


# -- scoring --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_config, tokenizer, processor):
    from unified_vl.modeling import build_model

    torch.manual_seed(0)
    return build_model(tiny_config, tokenizer).eval(), processor


def test_twelve_candidates_make_three_copies_and_the_choice_is_the_argmax_over_all(tiny):
    from unified_vl.generation import score_candidates

    model, processor = tiny
    assert [list(c) for c in copies(12, 5)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    palette, templates = palette_from({}), templates_from({})
    images = [noise(40, 30, seed=s) for s in range(3)]
    candidates = [twelve_boxes(), twelve_boxes()[::-1], twelve_boxes()[:7]]
    with torch_threads(1):
        chosen = choose(
            model, processor, images, ["a", "the thing", "b"], candidates, palette=palette, templates=templates
        )
        for image, expression, cands, choice in zip(images, ["a", "the thing", "b"], candidates, chosen, strict=True):
            grid = []
            for k in range(len(copies(len(cands), 5))):
                painted = paint_copy(image, cands, palette, k)
                prompt = f"{expression} is in <extra_id_0> color."
                targets = [f"<extra_id_0> {name}" for name in palette.names]
                row = score_candidates(model, processor, [painted], [prompt], targets)[0].tolist()
                grid.append([s if k * 5 + c < len(cands) else -math.inf for c, s in enumerate(row)])
            flat = [s for row in grid for s in row]
            best = max(range(len(flat)), key=lambda i: (flat[i], -i))
            assert choice.index == best and choice.box == cands[best]
            assert choice.copy == best // 5 and choice.color == palette.names[best % 5]
            assert np.allclose(choice.scores, grid, atol=1e-5)
    assert [len(c.scores) for c in chosen] == [3, 3, 2]
    assert chosen[0].scores[2][2:] == [-math.inf] * 3 and math.isfinite(chosen[0].scores[2][1])


def test_chunking_gives_the_same_answer_as_one_big_batch(tiny):
    model, processor = tiny
    palette, templates = palette_from({}), templates_from({"templates": ["sentinel", "instruction"]})
    images = [noise(40, 30, seed=s) for s in range(4)]
    candidates = [twelve_boxes(), twelve_boxes()[:3], twelve_boxes()[2:11], twelve_boxes()[::-2]]
    with torch_threads(1):
        runs = [
            choose(
                model,
                processor,
                images,
                ["a", "b", "c", "d"],
                candidates,
                palette=palette,
                templates=templates,
                batch_size=b,
            )
            for b in (64, 1, 2, 5)
        ]
    for other in runs[1:]:
        assert [c.index for c in other] == [c.index for c in runs[0]]
        for a, b in zip(other, runs[0], strict=True):
            assert np.allclose(a.scores, b.scores, atol=1e-5)


def test_templates_are_ensembled_by_averaging_their_scores(tiny):
    model, processor = tiny
    palette = palette_from({})
    args = (model, processor, [noise()], ["x"], [twelve_boxes()[:4]])
    with torch_threads(1):
        one, two = (choose(*args, palette=palette, templates=templates_from({"templates": [t]}))[0] for t in TEMPLATES)
        both = choose(*args, palette=palette, templates=templates_from({"templates": list(TEMPLATES)}))[0]
    assert np.allclose(both.scores, (np.array(one.scores) + np.array(two.scores)) / 2, atol=1e-5)


# -- through the jobs, the Predictor and the server ------------------------------------------------
def test_cpt_finetunes_saves_reloads_and_evaluates_through_the_cli(synth_data, tmp_path, capsys):  # noqa: F811
    from unified_vl.app.jobs import evaluate, finetune
    from unified_vl.checkpoint import load_pretrained

    run = tmp_path / "run"
    common = ["--task", "rec", "--data", str(synth_data), "--method", "cpt"]
    assert finetune.main([*common, "--shots", "4", *FAST, "eval.every=0", f"output_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "method cpt" in out
    trained = json.loads((run / "eval_final.json").read_text())["metrics"]
    assert 0.0 <= trained["rec/test/acc@0.5"] <= 1.0 and "name: cpt" in (run / "config.yaml").read_text()
    load_pretrained(run / "model")
    result = tmp_path / "eval.json"
    evaluate_args = ["--model", str(run / "model"), "--data", str(synth_data), "--task", "rec", "--method", "cpt"]
    assert evaluate.main([*evaluate_args, "--out", str(result)]) == 0
    assert json.loads(result.read_text())["metrics"]["rec/test/acc@0.5"] == trained["rec/test/acc@0.5"]
    # The answers are the candidates' own boxes (to half a location bin): mIoU ~ Acc@0.5 for a choice.
    metrics = json.loads(result.read_text())["metrics"]
    assert abs(metrics["rec/test/miou"] - metrics["rec/test/acc@0.5"]) < 0.05
    bad = ["--method-option", "palette=[[red, 1, 2, 3], [red, 4, 5, 6]]"]
    assert evaluate.main([*evaluate_args, *bad]) == 1
    assert "colour 'red' is given twice" in capsys.readouterr().err


def test_evaluation_texts_are_the_chosen_candidates_boxes(synth_data, tiny):  # noqa: F811
    from data_tools import storage

    model, processor = tiny
    records = [storage.load_split(synth_data, "rec", "test")[i] for i in range(3)]
    options = CPT.resolve_options({})
    with torch_threads(1):
        texts = CPT.generate(model, processor, "rec", records, options, batch_size=2, num_beams=1)
    task = tasks.get_task("rec")
    for text, record in zip(texts, records, strict=True):
        box = task.parse(text, record)
        assert max(boxes.iou(box, c) for c in record["candidate_boxes"]) > 0.95


@pytest.fixture(scope="module")
def predictor(served_model_dir):  # noqa: F811
    from unified_vl import Predictor

    with torch_threads(1):
        yield Predictor.from_pretrained(served_model_dir, device="cpu", batch_size=4)


def test_predictor_locate_with_cpt_equals_the_evaluation_path(predictor):
    images = scene_images()
    candidates = [[[0, 0, 10, 10], [10, 10, 30, 30], [5, 20, 40, 44]] for _ in images]
    with torch_threads(1):
        results = predictor.locate(images, "the shape", method="cpt", candidates=candidates)
        records = [
            {
                "id": None,
                "image": im,
                "width": im.width,
                "height": im.height,
                "expression": "the shape",
                "candidate_boxes": c,
            }
            for im, c in zip(images, candidates, strict=True)
        ]
        answers = CPT.predict(
            predictor.model, predictor.processor, "rec", records, CPT.resolve_options({}), batch_size=4
        )
        shared = predictor.locate(images[1], "the shape", method="cpt", candidates=candidates[1])[0]
    for result, answer, image in zip(results, answers, images, strict=True):
        assert result.text == answer.text and result.score == pytest.approx(answer.score, abs=1e-5)
        assert result.color == PALETTE[result.candidate][0] and result.painted_copy == 0
        assert result.box == boxes.tokens_to_box(answer.text, image.width, image.height)
    assert shared.to_dict() == pytest.approx(results[1].to_dict())
    from unified_vl.app.inference.predictor import InputError

    with pytest.raises(InputError, match="rec request: candidate_boxes\\[0\\] = .* is degenerate"):
        predictor.locate(images[0], "the shape", method="cpt", candidates=[[3, 3, 3, 9]])
    with pytest.raises(InputError, match="rec request: no candidates"):
        predictor.locate(images[0], "the shape", method="cpt")
    with pytest.raises(InputError, match="unless a method chooses among candidate boxes"):
        predictor.locate(images[0], "the shape", candidates=[[0, 0, 5, 5]])
    with pytest.raises(InputError, match="unknown method 'cptt'"):
        predictor.locate(images[0], "the shape", method="cptt", candidates=[[0, 0, 5, 5]])


def test_the_server_predicts_with_cpt(predictor):
    import base64
    import io

    from fastapi.testclient import TestClient

    from unified_vl.app.inference.server import create_app

    image = scene_images()[2]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    candidates = [[0, 0, 10, 10], [10, 10, 30, 30], [5, 20, 40, 44]]
    body = {
        "task": "rec",
        "image": base64.b64encode(buffer.getvalue()).decode(),
        "expression": "the shape",
        "candidate_boxes": candidates,
        "method": "cpt",
        "method_options": {"templates": ["instruction"]},
    }
    with torch_threads(1), TestClient(create_app(predictor, max_batch=4, max_wait_ms=5)) as client:
        response = client.post("/v1/predict", json=body)
        expected = predictor.locate(
            image, "the shape", method="cpt", candidates=candidates, method_options={"templates": ["instruction"]}
        )[0]
        bad = client.post("/v1/predict", json={**body, "candidate_boxes": []})
        bad_option = client.post("/v1/predict", json={**body, "method_options": {"alpha": "half"}})
    assert response.status_code == 200, response.text
    prediction = response.json()["prediction"]
    assert prediction["candidate"] == expected.candidate and prediction["box"] == expected.box
    assert prediction["score"] == pytest.approx(expected.score, abs=1e-5)
    assert bad.status_code == 422 and "candidate_boxes" in bad.json()["error"]["message"]
    assert bad_option.status_code == 422 and bad_option.json()["error"]["param"] == "method_options"
