"""The learning benchmark's parts: the real datasets in official layouts (through our converters), the
plain baselines, and the table (scripts/bench_vs_baseline.py; docs/learning.md)."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools import storage, synth
from unified_vl.app import baselines

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    make_bench_data = _script("make_bench_data")
    out = tmp_path_factory.mktemp("digits")
    folders = make_bench_data.make("digits", out, limit=100, log=lambda *_: None)
    return out, folders


def test_real_digits_are_written_in_official_layouts_and_converted(digits):
    out, folders = digits
    raw = out / "raw"
    # VQAv2's file names and COCO's image names, which `data convert vqav2` finds by themselves.
    for subtype in ("train2014", "val2014", "test2015"):
        questions = json.loads((raw / "vqav2" / f"v2_OpenEnded_mscoco_{subtype}_questions.json").read_text())
        annotations = json.loads((raw / "vqav2" / f"v2_mscoco_{subtype}_annotations.json").read_text())
        assert questions["data_subtype"] == annotations["data_subtype"] == subtype
        first = questions["questions"][0]
        assert (raw / "vqav2" / f"COCO_{subtype}_{first['image_id']:012d}.jpg").is_file()
        assert all(len(a["answers"]) == 10 for a in annotations["annotations"])
    counts = storage.read_manifest(folders["classification"])["tasks"]["classification"]
    assert sum(counts.values()) == 100 and set(counts) == {"train", "val", "test"}
    # No single-digit image is in two splits (ImageFolder file names are the source's indices).
    names = {s: {p.name for p in (raw / "imagefolder" / s).rglob("*.png")} for s in ("train", "val", "test")}
    assert not (names["train"] & names["test"]) and not (names["train"] & names["val"])
    records = storage.load_split(folders["classification"], "classification", "test")
    assert {r["label"] for r in records} <= set("0123456789") and records[0]["image"].size == (8, 8)
    assert storage.read_manifest(folders["vqa"])["tasks"]["vqa"]["train"] == 4 * round(2.5 * counts["train"])


def test_real_digit_questions_agree_with_each_other(digits):
    _, folders = digits
    by_image = defaultdict(dict)
    for record in storage.load_split(folders["vqa"], "vqa", "train", decode_images=False):
        by_image[record["image"]["path"]][record["question"]] = record["answers"][0]
    checked = 0
    for answers in by_image.values():
        left, right = int(answers["what is the left digit?"]), int(answers["what is the right digit?"])
        assert left != right
        for question, answer in answers.items():
            if m := re.fullmatch(r"is the left digit (larger|smaller) than the right digit\?", question):
                assert answer == ("yes" if (left > right) == (m.group(1) == "larger") else "no")
                checked += 1
            if m := re.fullmatch(r"is there a (\d) in the image\?", question):
                assert answer == ("yes" if int(m.group(1)) in (left, right) else "no")
    assert checked == len(by_image) > 100


def _colour_folder(root: Path, n: int = 24) -> Path:
    """ImageFolder of noisy red and blue images: a task any classifier learns in a few steps."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", 8), ("test", 8)):
        for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 30, (12, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_baseline_classifier_learns_and_is_scored_by_the_task_metric(tmp_path):
    from data_tools.converters import convert

    raw = _colour_folder(tmp_path / "raw")
    convert("imagefolder", inputs=[raw], out=tmp_path / "data", log=lambda *_: None)
    config = baselines.BaselineConfig(width=4, batch_size=16, evals=2, warmup_steps=2, lr=1e-2)
    result = baselines.train_baseline(
        str(tmp_path / "data"), "classification", config=config, max_steps=30, log=lambda *_: None
    )
    assert result.steps == 30 and [step for step, _ in result.history] == [15, 30]
    assert result.metrics == {"classification/test/top1": 1.0}
    assert result.val_metric == 1.0
    test = storage.load_split(str(tmp_path / "data"), "classification", "test", decode_images=False)
    assert result.test_predictions == dict(zip(test["id"], test["label"], strict=True))  # every test image, by id


def test_baseline_mixup_mixes_pairs_of_the_batch_and_still_learns(tmp_path):
    from data_tools.converters import convert

    images = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).reshape(4, 3, 2, 2)
    mixed, partners, lam = baselines._mixup(images, 0.4, random.Random(0), torch.Generator().manual_seed(0))
    assert 0 < lam < 1 and sorted(partners.tolist()) == [0, 1, 2, 3]
    assert torch.allclose(mixed, lam * images + (1 - lam) * images[partners])
    raw = _colour_folder(tmp_path / "raw")
    convert("imagefolder", inputs=[raw], out=tmp_path / "data", log=lambda *_: None)
    config = baselines.BaselineConfig(width=4, batch_size=16, evals=2, warmup_steps=2, lr=1e-2, mixup=0.4)
    result = baselines.train_baseline(
        str(tmp_path / "data"), "classification", config=config, max_steps=30, log=lambda *_: None
    )
    assert result.steps == 30 and result.metrics == {"classification/test/top1": 1.0}


def test_baseline_sam_steps_from_the_original_weights_and_still_learns(tmp_path, monkeypatch):
    from data_tools.converters import convert

    raw = _colour_folder(tmp_path / "raw")
    convert("imagefolder", inputs=[raw], out=tmp_path / "data", log=lambda *_: None)
    calls = {"ascend": 0, "back": 0}
    ascend, back = baselines.sharpness.ascend, baselines.sharpness.descend_back

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(baselines.sharpness, "ascend", counted("ascend", ascend))
    monkeypatch.setattr(baselines.sharpness, "descend_back", counted("back", back))
    config = baselines.BaselineConfig(width=4, batch_size=16, evals=2, warmup_steps=2, lr=1e-2, sam=0.05)
    result = baselines.train_baseline(
        str(tmp_path / "data"), "classification", config=config, max_steps=30, log=lambda *_: None
    )
    assert calls == {"ascend": 30, "back": 30}  # one perturbation per step, always undone before the step
    assert result.steps == 30 and result.metrics == {"classification/test/top1": 1.0}


def test_baseline_trains_under_bf16_autocast_and_refuses_other_precisions(tmp_path):
    from data_tools.converters import convert

    raw = _colour_folder(tmp_path / "raw")
    convert("imagefolder", inputs=[raw], out=tmp_path / "data", log=lambda *_: None)
    config = baselines.BaselineConfig(width=4, batch_size=16, evals=2, warmup_steps=2, lr=1e-2, precision="bf16")
    with baselines._autocast("bf16"):
        logits = baselines.Classifier(3, config)(torch.zeros(2, 3, 16, 16))
    assert logits.dtype == torch.bfloat16  # the forward pass runs in bf16; the weights stay float32
    result = baselines.train_baseline(
        str(tmp_path / "data"), "classification", config=config, max_steps=30, log=lambda *_: None
    )
    assert result.steps == 30 and result.metrics == {"classification/test/top1": 1.0}
    with pytest.raises(ValueError, match="baseline precision must be one of fp32, bf16, got 'fp16'"):
        baselines.train_baseline(
            str(tmp_path / "data"), "classification", config=baselines.BaselineConfig(precision="fp16"), max_steps=1
        )


def test_baseline_zoom_scales_about_the_centre_within_its_range():
    images = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    images[:, :, 12:20, 12:20] = 255  # an 8-pixel square in the middle
    zoomed = baselines._zoom(images, 0.25, torch.Generator().manual_seed(0))
    assert zoomed.dtype == torch.uint8 and zoomed.shape == images.shape
    widths = (zoomed[:, 0] > 127).sum(dim=2).max(dim=1).values  # the square's width in each image
    assert widths.min() <= 7 and widths.max() >= 9 and 5 <= widths.min() and widths.max() <= 11  # 8 x [0.75, 1.25]
    rows, cols = torch.nonzero(zoomed[0, 0] > 127, as_tuple=True)
    assert abs(float(rows.float().mean()) - 15.5) < 0.6 and abs(float(cols.float().mean()) - 15.5) < 0.6  # centred
    assert baselines._zoom(images, 0.0, torch.Generator()) is images


@pytest.fixture(scope="module")
def free_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("free")
    synth.generate(str(out), num_images=16, num_eval_images=4, image_size=32, layout="free", log=lambda *_: None)
    return out


def test_baseline_vqa_answers_from_the_training_answers_and_reports_question_types(free_world):
    config = baselines.BaselineConfig(width=4, hidden=16, word_dim=8, batch_size=8, evals=1)
    result = baselines.train_baseline(str(free_world), "vqa", config=config, max_steps=3, log=lambda *_: None)
    assert result.steps == 3 and set(result.metrics) >= {"vqa/test/accuracy", "vqa/test/accuracy_yes/no"}
    assert {"relation", "relation choice", "how many"} <= set(result.by_question_type)
    assert all(0.0 <= v <= 1.0 for v in result.by_question_type.values())
    assert result.parameters > 0


def _score_on_test_and_heldout(script: str, data, model, processor, tmp_path, monkeypatch):
    """Runs ``scripts/SCRIPT --model M --data D --split test heldout --out X.md`` on a saved tiny
    model, in this process (a subprocess would spend most of its time importing torch); (the JSON
    it wrote, the Markdown it wrote)."""
    import runpy

    from unified_vl.checkpoint import save_pretrained

    folder = save_pretrained(model.eval(), processor, tmp_path / "model")
    out = tmp_path / "table.md"
    path = ROOT / "scripts" / script
    argv = [str(path), f"--model={folder}", f"--data={data}", "--split", "test", "heldout", f"--out={out}"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts scripts/ first on it
    runpy.run_path(str(path), run_name="__main__")
    return json.loads(out.with_suffix(".json").read_text()), out.read_text()


def test_our_model_is_scored_per_question_type_with_the_relation_mean(
    free_world, tiny_model, processor, tmp_path, monkeypatch
):
    results, table = _score_on_test_and_heldout(
        "vqa_by_question_type.py", free_world, tiny_model, processor, tmp_path, monkeypatch
    )
    accuracy = results["accuracy"]
    test_types = {r["question_type"] for r in storage.load_split(free_world, "vqa", "test", decode_images=False)}
    assert set(accuracy["test"]) == test_types | {"relations (both forms, mean)"}
    relations = (accuracy["test"]["relation"] + accuracy["test"]["relation choice"]) / 2
    assert accuracy["test"]["relations (both forms, mean)"] == pytest.approx(relations)
    assert set(accuracy) == {"test", "heldout"} and "| relation choice |" in table
    # The first N records only (how a run fits its own train split, without scoring all of it).
    first = storage.load_split(free_world, "vqa", "train", decode_images=False).select(range(5))
    some = baselines.model_accuracy_by_question_type(tmp_path / "model", free_world, "train", max_examples=5)
    assert set(some) == set(first["question_type"])


def test_grounding_is_scored_with_open_and_phrase_decoding_per_split(
    free_world, tiny_model, processor, tmp_path, monkeypatch
):
    results, table = _score_on_test_and_heldout(
        "grounding_decoding.py", free_world, tiny_model, processor, tmp_path, monkeypatch
    )
    assert set(results) == {"test", "heldout"}
    for split, by_decoding in results.items():
        records = storage.load_split(free_world, "grounding", split, decode_images=False).to_list()
        gold = sum(len(r["phrases"]) for r in records if r.get("phrases"))
        assert set(by_decoding) == {"open", "phrases"}
        for values in by_decoding.values():
            assert values["phrases"] == gold > 0
            assert all(0.0 <= values[k] <= 1.0 for k in ("phrase_acc@0.5", "phrases written exactly"))
    assert table.count("| phrases |") == 2


def test_baseline_refuses_unknown_tasks_and_two_budgets(free_world):
    with pytest.raises(ValueError, match="no baseline for task 'rec'; baselines exist for classification, vqa"):
        baselines.train_baseline(str(free_world), "rec", max_steps=1)
    with pytest.raises(ValueError, match="exactly one budget"):
        baselines.train_baseline(str(free_world), "vqa", max_steps=1, minutes=1.0)


def test_question_words_and_accuracy_by_type():
    assert baselines.words("Is the LEFT digit larger than the right-digit?") == [
        "is", "the", "left", "digit", "larger", "than", "the", "right", "digit",
    ]  # fmt: skip
    common = {"image": None, "width": 8, "height": 8, "question": "q?"}
    records = [
        {"id": "a", **common, "question_type": "relation", "answers": ["yes"] * 10, "answer_type": "yes/no"},
        {"id": "b", **common, "question_type": "relation", "answers": ["no"] * 10, "answer_type": "yes/no"},
        {"id": "c", **common, "question_type": "how many", "answers": ["2"] * 10, "answer_type": "number"},
    ]
    assert baselines.accuracy_by_question_type(["yes", "yes", "2"], records) == {"how many": 1.0, "relation": 0.5}


def test_table_gives_mean_std_and_ratios_with_the_relation_line():
    bench = _script("bench_vs_baseline")

    def runs(values, relation=None):
        return [
            {
                "metrics": {"vqa/test/accuracy": v},
                "by_question_type": {"relation": relation, "relation choice": relation} if relation else {},
            }
            for v in values
        ]

    results = {
        "synth-free/vqa": {
            "name": "world (free)",
            "task": "vqa",
            "ours": runs([0.9, 0.8], 0.6),
            "baseline": runs([0.5, 0.5], 0.5),
        },
        "digits/vqa": {"name": "digits", "task": "vqa", "ours": runs([0.5]), "baseline": runs([1.0])},
    }
    text = bench.table(results, budget=bench.Budget(minutes=2), seeds=[0, 1])
    assert text.splitlines()[0].startswith("machine: ") and "torch" in text.splitlines()[0]
    assert "| world (free) | vqa | accuracy | 0.850 ± 0.071 | 0.500 ± 0.000 | 1.700 |" in text
    assert "| world (free) | vqa: relations only | accuracy | 0.600 ± 0.000 | 0.500 ± 0.000 | 1.200 |" in text
    assert "| digits | vqa | accuracy | 0.500 ± 0.000 | 1.000 ± 0.000 | 0.500 |" in text
    assert "**1.100**" in text  # the mean of the per-row ratios (relations are part of their row)


@pytest.mark.slow
def test_bench_vs_baseline_quick_runs_both_sides_end_to_end(tmp_path):
    out = tmp_path / "table.md"
    command = [sys.executable, str(ROOT / "scripts" / "bench_vs_baseline.py"), "--quick", f"--out={out}"]
    command += ["--rows", "digits/classification", f"--work={tmp_path / 'work'}"]
    # and a user's folder beside the built-in row (an ImageFolder of 32-pixel images through `data convert`,
    # train and test only: val is carved from train)
    command += [f"--data={_convert_folder(tmp_path, splits=('train', 'test'))}", "--task=classification"]
    subprocess.run(command, check=True, cwd=ROOT, timeout=900)
    raw = json.loads(out.with_suffix(".json").read_text())
    assert list(raw["rows"]) == ["digits/classification", "shapes/classification"]
    for entry in raw["rows"].values():
        assert len(entry["ours"]) == len(entry["baseline"]) == 1
        for side in ("ours", "baseline"):
            assert 0.0 <= entry[side][0]["metrics"]["classification/test/top1"] <= 1.0
    assert "| digits | classification | top1 |" in out.read_text()
    assert "| shapes (val: 10% of train) | classification | top1 |" in out.read_text()


def test_grounding_errors_sorts_each_gold_phrase_and_reads_the_output_order(tmp_path, monkeypatch, capsys):
    module = _script("grounding_errors")
    a, b, c = [0, 0, 10, 10], [40, 0, 50, 10], [0, 40, 10, 50]  # reading order: a, b, c
    rows = [
        # right, right, swapped onto b: "another object"; written in the record's order, not reading order
        {"task": "grounding", "gold": [["x", c], ["y", b], ["z", a]], "prediction": [["x", c], ["y", b], ["z", b]]},
        # written c-first: neither order; "w" boxed nowhere, "v" not written
        {
            "task": "grounding",
            "gold": [["u", c], ["w", a], ["v", b]],
            "prediction": [["w", [20, 20, 30, 30]], ["u", c]],
        },
        {"task": "grounding", "gold": [["p", b], ["q", a]], "prediction": [["q", a], ["p", b]]},  # reading order
        {"task": "grounding", "gold": "a region's description", "prediction": "a red circle"},  # not counted
        {"task": "vqa", "gold": "red", "prediction": "red"},
    ]
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    (run / "predictions" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    scores = module.score_file(run / "predictions" / "test.jsonl")
    assert scores["phrases"] == 8
    assert scores["right"] == 5 / 8 and scores["another object"] == 1 / 8
    assert scores["elsewhere"] == 1 / 8 and scores["not written"] == 1 / 8
    assert scores["record order"] == 1 / 2 and scores["reading order"] == 1 / 2  # of the two fully written records
    monkeypatch.setattr(sys, "argv", ["grounding_errors.py", str(run), "--out", str(tmp_path / "t.md")])
    module.main()
    assert "| 8 | 0.625 | 0.125 | 0.125 | 0.125 | 0.50 | 0.50 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "t.json").read_text())[f"{run}:test"]["right"] == 0.625
    bad = tmp_path / "bad"
    (bad / "predictions").mkdir(parents=True)
    (bad / "predictions" / "test.jsonl").write_text(json.dumps({"task": "grounding", "gold": [["x"]]}) + "\n")
    with pytest.raises(SystemExit, match=r"test.jsonl:1: gold must be a list of \[phrase, box\] pairs"):
        module.score_file(bad / "predictions" / "test.jsonl")


def test_vqa_unseen_answers_splits_the_questions_by_what_followed_them_in_training(tmp_path, monkeypatch, capsys):
    module = _script("vqa_unseen_answers")
    seen = {"what color is the circle?": {"blue", "green"}, "how many circles are there?": {"1", "2"}}
    records = [
        {"id": "a", "question": "What color is the  circle?", "answers": ["red"] * 10},  # unseen, missed as trained
        {"id": "b", "question": "what color is the circle?", "answers": ["red"] * 10},  # unseen, right
        {"id": "c", "question": "what color is the circle?", "answers": ["blue"] * 10},  # seen, right
        {"id": "d", "question": "how many circles are there?", "answers": ["2"] * 10},  # seen, missed
        {"id": "e", "question": "is it raining?", "answers": ["no"] * 10},  # never asked in training: unseen
    ]
    predictions = {"a": "green", "b": "red", "c": "blue", "d": "3", "e": None}
    scores = module.score(predictions, records, seen)
    assert scores["unseen questions"] == 3 and scores["unseen accuracy"] == pytest.approx(1 / 3)
    assert scores["seen questions"] == 2 and scores["seen accuracy"] == pytest.approx(1 / 2)
    assert scores["unseen misses answered as after training"] == pytest.approx(1 / 2)  # "green" of a, None of e
    with pytest.raises(SystemExit, match="record 'b': no prediction"):
        module.score({"a": "red"}, records, seen)
    # End to end on a stored world: a run that answers every heldout question with its gold answer.
    data = tmp_path / "data"
    synth.generate(str(data), num_images=8, num_eval_images=4, image_size=32, seed=0, log=lambda *a: None)
    heldout = storage.load_split(data, "vqa", "heldout")
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    lines = [
        {"id": r["id"], "task": "vqa", "prediction": r["answers"][0]} for r in heldout.select_columns(["id", "answers"])
    ]
    (run / "predictions" / "heldout.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    monkeypatch.setattr(sys, "argv", ["x", str(run), "--data", str(data), "--out", str(tmp_path / "u.md")])
    module.main()
    result = json.loads((tmp_path / "u.json").read_text())[f"{run}:heldout"]
    assert result["unseen questions"] > 0 and result["unseen questions"] + result["seen questions"] == len(heldout)
    assert result["unseen accuracy"] > 0.5 and result["seen accuracy"] > 0.5  # 10 noisy answerers, first one kept
    assert "| heldout |" in capsys.readouterr().out


def test_vqa_binding_errors_tells_another_objects_attribute_from_one_not_in_the_picture(tmp_path, monkeypatch, capsys):
    module = _script("vqa_binding_errors")
    objects = {"test-000001": [{"label": "red circle"}, {"label": "blue square"}]}
    records = [
        {"id": "test-000001-q0", "question_type": "what color is the", "answers": ["red"] * 10},  # right
        {"id": "test-000001-q1", "question_type": "what color is the", "answers": ["red"] * 10},  # the square's
        {"id": "test-000001-q2", "question_type": "what shape is the", "answers": ["square"] * 10},  # the circle's
        {"id": "test-000001-q3", "question_type": "what shape is the", "answers": ["square"] * 10},  # no cross here
        {"id": "test-000001-q4", "question_type": "how many", "answers": ["2"] * 10},  # not an attribute question
    ]
    predictions = {
        "test-000001-q0": "red",
        "test-000001-q1": "blue",
        "test-000001-q2": "circle",
        "test-000001-q3": "cross",
        "test-000001-q4": "3",
    }
    scores = module.score(predictions, records, objects)
    assert scores == {"questions": 4, "right": 0.25, "another object's": 0.5, "not in the picture": 0.25}
    # A colour question answered with a shape word in the picture is not another object's colour.
    assert module.score({"test-000001-q1": "square"}, records[1:2], objects)["not in the picture"] == 1.0
    with pytest.raises(SystemExit, match="record 'test-000001-q0': no prediction"):
        module.score({}, records[:1], objects)
    with pytest.raises(SystemExit, match="record 'test-000001-q0': no detection record 'test-000001'"):
        module.score(predictions, records[:1], {})
    # End to end on a stored world: a run that answers every test question with its first answerer's answer.
    data = tmp_path / "data"
    synth.generate(str(data), num_images=8, num_eval_images=4, image_size=32, seed=0, log=lambda *a: None)
    test = list(storage.load_split(data, "vqa", "test").select_columns(["id", "answers"]))
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    lines = [{"id": r["id"], "task": "vqa", "prediction": r["answers"][0]} for r in test]
    (run / "predictions" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    monkeypatch.setattr(sys, "argv", ["x", str(run), "--data", str(data), "--out", str(tmp_path / "b.md")])
    module.main()
    result = json.loads((tmp_path / "b.json").read_text())[f"{run}:test"]
    assert result["questions"] > 0 and result["right"] > 0.5  # 10 noisy answerers, the first one's answer kept
    assert result["right"] + result["another object's"] + result["not in the picture"] == pytest.approx(1.0)
    assert "| test |" in capsys.readouterr().out


def test_classification_misses_tells_steady_misses_shared_by_both_sides_from_one_sides_own(tmp_path, capsys):
    from data_tools.converters import convert

    module = _script("classification_misses")
    convert("imagefolder", inputs=[_colour_folder(tmp_path / "raw", n=4)], out=tmp_path / "data", log=lambda *_: None)
    test = storage.load_split(str(tmp_path / "data"), "classification", "test", decode_images=False)
    gold = dict(zip(test["id"], test["label"], strict=True))
    ids = sorted(gold)
    flip = {"red": "blue", "blue": "red"}
    hard, ours_own, base_once = ids[0], ids[1], ids[2]  # hard: both sides miss it in every run

    def wrong(*keys):
        return {k: (flip[v] if k in keys else v) for k, v in gold.items()}

    for name, predicted in (("r0", wrong(hard, ours_own)), ("r1", wrong(hard, ours_own, base_once))):
        (tmp_path / name / "predictions").mkdir(parents=True)
        rows = [{"id": k, "task": "classification", "split": "test", "prediction": v} for k, v in predicted.items()]
        rows.append({"id": "q", "task": "vqa", "prediction": "red"})  # another task's rows are not read
        (tmp_path / name / "predictions" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for name, predicted in (("b0.json", wrong(hard, base_once)), ("b1.json", wrong(hard))):
        (tmp_path / name).write_text(json.dumps({"metrics": {}, "test_predictions": predicted}))
    out = tmp_path / "m.md"
    args = ["--data", str(tmp_path / "data"), "--ours", str(tmp_path / "r0"), str(tmp_path / "r1")]
    module.main([*args, "--baseline", str(tmp_path / "b0.json"), str(tmp_path / "b1.json"), "--out", str(out)])
    text = capsys.readouterr().out
    assert "| ours | 2, 3 | 2 | 1 | 1 |" in text  # hard + ours_own every run; only hard is the baseline's too
    assert "| baseline | 2, 1 | 1 | 1 | 1 |" in text
    assert f"| {ours_own} | {gold[ours_own]} | {flip[gold[ours_own]]}, {flip[gold[ours_own]]} | " in text
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["sides"]["ours"]["every_run"] == sorted([hard, ours_own])
    assert report["sides"]["baseline"]["some_run"] == sorted([hard, base_once])
    with pytest.raises(SystemExit):
        module.main([*args, str(tmp_path / "r0"), "--baseline", str(tmp_path / "b0.json")])
    assert "--ours names " + str(tmp_path / "r0") + " more than once" in capsys.readouterr().err
    (tmp_path / "old.json").write_text(json.dumps({"metrics": {}}))
    with pytest.raises(ValueError, match="old.json: no 'test_predictions'"):
        module.main([*args, "--baseline", str(tmp_path / "old.json")])
    (tmp_path / "short.json").write_text(json.dumps({"test_predictions": {ids[0]: "red"}}))
    with pytest.raises(
        ValueError, match=r"short.json: its predictions do not cover the data's test split \(15 test ids"
    ):
        module.main([*args, "--baseline", str(tmp_path / "short.json")])


def _shapes_folder(root: Path, *, splits=("train", "val", "test"), per_class: int = 12) -> Path:
    """An ImageFolder of two classes a CNN tells apart: a red or a blue square, anywhere."""
    rng = random.Random(0)
    for split in splits:
        for label, colour in (("red", (230, 30, 30)), ("blue", (30, 30, 230))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.zeros((32, 32, 3), np.uint8)
                x0, y0 = rng.randrange(2, 20), rng.randrange(2, 20)
                pixels[y0 : y0 + 10, x0 : x0 + 10] = colour
                Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return root


def _convert_folder(tmp_path: Path, **kw) -> Path:
    from data_tools.converters import convert

    root = _shapes_folder(tmp_path / "raw", **kw)
    convert("imagefolder", inputs=[root], images=(), out=tmp_path / "shapes", log=lambda *_: None)
    return tmp_path / "shapes"


def test_bench_takes_a_users_data_folder_as_one_more_row(tmp_path):
    """--data/--task: a folder from `data convert` runs as a row of its own, named by --name."""
    data = _convert_folder(tmp_path)
    out = tmp_path / "mine.md"
    command = [sys.executable, str(ROOT / "scripts" / "bench_vs_baseline.py"), f"--out={out}", "--sides=baseline"]
    command += [f"--data={data}", "--task=classification", "--name=my shapes", "--examples=6400", "--seeds", "0"]
    command += [f"--work={tmp_path / 'work'}"]
    subprocess.run(command, check=True, cwd=ROOT, timeout=300, capture_output=True)
    raw = json.loads(out.with_suffix(".json").read_text())
    assert list(raw["rows"]) == ["my-shapes/classification"]  # the built-in rows are not run
    (run,) = raw["rows"]["my-shapes/classification"]["baseline"]
    assert run["metrics"]["classification/test/top1"] == 1.0  # 24 test images, the square's colour decides
    assert "| my shapes | classification | top1 | - | 1.000 ± 0.000 | - |" in out.read_text()
    assert not (tmp_path / "work" / "data").exists()  # a user's folder is used as it is; nothing is made


def test_bench_refuses_a_data_folder_it_cannot_score_naming_what_it_holds(tmp_path, capsys):
    bench = _script("bench_vs_baseline")
    with pytest.raises(ValueError, match=r"no val / test split \(it has: train 24\).*split folders"):
        bench.folder_row(_convert_folder(tmp_path / "a", splits=("train",)), "classification")
    data = _convert_folder(tmp_path / "b")
    with pytest.raises(ValueError, match=r"holds no vqa records \(its tasks: classification\)"):
        bench.folder_row(data, "vqa")
    with pytest.raises(ValueError, match=r"--task 'rec': the baselines exist for classification, vqa only"):
        bench.folder_row(data, "rec")
    with pytest.raises(ValueError, match=r"--data .*nowhere.*has no manifest.json"):
        bench.folder_row(tmp_path / "nowhere", "classification")
    row = bench.folder_row(data, "classification")
    assert (row.name, row.source, row.folder, row.carve_val) == ("shapes", "shapes", data.resolve(), False)
    assert bench.prepare(row, tmp_path / "work", quick=False) == data.resolve()  # used as it is
    # The command line: --data and --task go together, and a row's name cannot take a built-in row's place.
    for argv, message in (
        (["--data", str(data)], "--data and --task go together"),
        (
            ["--data", str(data), "--task", "classification", "--name", "mnist5k", "--rows", "mnist5k/classification"],
            "is also a built-in row's",
        ),
    ):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--out", str(tmp_path / "x.md"), *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bench_sets_a_tenth_of_train_aside_as_val_for_a_folder_without_one(tmp_path):
    bench = _script("bench_vs_baseline")
    data = _convert_folder(tmp_path, splits=("train", "test"), per_class=20)
    row = bench.folder_row(data, "classification", "mine")
    assert (row.name, row.carve_val) == ("mine (val: 10% of train)", True)
    carved = bench.prepare(row, tmp_path / "work", quick=False)
    assert carved == tmp_path / "work" / "mine-with-val"
    val_ids = storage.load_split(carved, "classification", "val", decode_images=False)["id"]
    assert storage.available(carved) == {"classification": {"train": 36, "val": 4, "test": 40}}
    assert storage.available(data) == {"classification": {"train": 40, "test": 40}}  # the user's folder as it was
    assert bench.prepare(row, tmp_path / "work", quick=False) == carved  # a second command carves the same
    assert storage.load_split(carved, "classification", "val", decode_images=False)["id"] == val_ids


def test_vqa_evidence_errors_scores_the_written_boxes_and_the_answers_beside_them(tmp_path, monkeypatch, capsys):
    module = _script("vqa_evidence_errors")
    from tasks.boxes import box_to_tokens

    left, right, elsewhere = [0, 20, 16, 36], [40, 20, 56, 36], [20, 0, 30, 10]

    def written(*boxes_, answer):
        items = " ; ".join(f"obj{box_to_tokens(b, 64, 64)}" for b in boxes_)
        return (f"{items} ; answer: {answer}" if items else f"answer: {answer}"), answer

    def record(i, kind, answer, boxes_):
        phrases = [f"obj {k}" for k in range(len(boxes_))]
        return {
            "id": f"test-000001-q{i}", "question_type": kind, "answers": [answer] * 10, "width": 64, "height": 64,
            "evidence_phrases": phrases, "evidence_boxes": boxes_,
        }  # fmt: skip

    records = [
        record(0, "relation choice", "left", [left, right]),  # boxes right, answer right
        record(1, "relation choice", "left", [left, right]),  # boxes off but in order, answer right
        record(2, "relation choice", "left", [left, right]),  # boxes swapped, answer wrong
        record(3, "how many", "0", []),  # nothing to write, nothing written
    ]
    shifted = [[4, 24, 12, 32], [60, 24, 63, 32]]  # centres in the same order, IoU < 0.5 with the gold
    outputs = {
        "test-000001-q0": written(left, right, answer="left"),
        "test-000001-q1": written(*shifted, answer="left"),
        "test-000001-q2": written(right, left, answer="right"),
        "test-000001-q3": written(answer="0"),
    }
    scores = module.score(outputs, records)
    assert scores["relation choice"] == {
        "questions": 3, "accuracy": pytest.approx(2 / 3), "evidence right": pytest.approx(1 / 3),
        "accuracy, evidence right": 1.0, "accuracy, evidence wrong": 0.5, "pair order right": pytest.approx(2 / 3),
    }  # fmt: skip
    assert scores["how many"]["evidence right"] == 1.0 and scores["how many"]["pair order right"] is None
    # A box written where no object is, and a missing one, are wrong evidence; so is an extra one.
    one = [record(0, "what color is the", "red", [left])]
    for text in (written(elsewhere, answer="red"), written(answer="red"), written(left, right, answer="red")):
        assert module.score({"test-000001-q0": text}, one)["what color is the"]["evidence right"] == 0.0
    with pytest.raises(SystemExit, match="record 'test-000001-q0': no prediction"):
        module.score({}, records[:1])
    with pytest.raises(SystemExit, match="record 'x': no evidence"):
        module.score({}, [{"id": "x", "question_type": "how many", "answers": ["1"]}])
    # End to end on a stored world with evidence: a run that writes every test record's own target.
    import tasks

    vqa = tasks.get_task("vqa")
    data = tmp_path / "data"
    synth.generate(
        str(data), num_images=4, num_eval_images=3, image_size=32, layout="free", vqa_evidence=True, log=lambda *a: None
    )
    test = [dict(r, image=None) for r in storage.load_split(data, "vqa", "test", decode_images=False)]
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    lines = [
        {"id": r["id"], "task": "vqa", "text": vqa.target(r), "prediction": vqa.parse(vqa.target(r), r)} for r in test
    ]
    (run / "predictions" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    monkeypatch.setattr(sys, "argv", ["x", str(run), "--data", str(data), "--out", str(tmp_path / "e.md")])
    module.main()
    result = json.loads((tmp_path / "e.json").read_text())[f"{run}:test"]
    assert result and all(s["evidence right"] == 1.0 for s in result.values())
    assert all(s["pair order right"] in (None, 1.0) for s in result.values())
    assert "| test |" in capsys.readouterr().out


def test_probe_image_tokens_reads_each_object_at_its_own_token_and_fits_a_linear_read_out(
    tmp_path, monkeypatch, capsys
):
    module = _script("probe_image_tokens")
    record = {
        "width": 64, "height": 64, "objects": [
            {"label": "red circle", "box": [0, 0, 10, 10]},  # centre (5, 5): token 0
            {"label": "blue large square", "box": [40, 20, 60, 40]},  # centre (50, 30): row 1, column 3
            {"label": "green cross", "box": [2, 2, 12, 12]},  # centre (7, 7): token 0 again
        ],
    }  # fmt: skip
    # The two objects on token 0 are left out; a shape of more than one word stays whole.
    assert module.object_cells(record, 4, 4) == [(7, "blue", "large square")]
    # Two separable clusters are read perfectly; labels drawn independently of the vectors are not.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=generator)
    y = ["a" if v > 0 else "b" for v in torch.randn(400, generator=generator).tolist()]
    x[:, 0] += torch.tensor([3.0 if label == "a" else -3.0 for label in y])  # six standard deviations apart
    assert module.probe_accuracy(x[:200], y[:200], x[200:], y[200:]) > 0.98
    noise = ["a" if v > 0 else "b" for v in torch.randn(400, generator=generator).tolist()]
    assert 0.35 < module.probe_accuracy(x[:, 1:][:200], noise[:200], x[:, 1:][200:], noise[200:]) < 0.65
    # End to end: an untrained uvl-tiny model with a conv-deep stem on a small free world. The pixels'
    # colour is readable without any learning; every probe is scored on the same test objects.
    from unified_vl.checkpoint import save_pretrained
    from unified_vl.config import UnifiedVLConfig
    from unified_vl.modeling import build_model
    from unified_vl.processor import UnifiedVLProcessor
    from unified_vl.tokenizer import load_tokenizer

    data = tmp_path / "data"
    synth.generate(str(data), num_images=60, num_eval_images=20, image_size=64, layout="free", log=lambda *a: None)
    tokenizer = load_tokenizer()
    text = {"vocab_size": len(tokenizer)}
    config = UnifiedVLConfig.from_preset("uvl-tiny", text_config=text, vision_stem="conv-deep")
    torch.manual_seed(0)
    model = build_model(config, tokenizer)
    processor = UnifiedVLProcessor.from_config(config, tokenizer, vision_backbone=model.visual.backbone)
    folder = save_pretrained(model.eval(), processor, tmp_path / "model")
    out = tmp_path / "p.md"
    argv = ["x", "--model", str(folder), "--data", str(data), "--stem-layers", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    module.main()
    result = json.loads(out.with_suffix(".json").read_text())[str(folder)]
    test = storage.load_split(data, "detection", "test")
    kept = sum(len(module.object_cells(test[i], 4, 4)) for i in range(len(test)))
    assert result["objects"]["test"] == kept > 20
    # The stem's six ReLUs (16-pixel patches: four stride-2 blocks, the first two with a stride-1 layer).
    relus = {f"relu {k}" for k in (2, 5, 8, 11, 14, 17)}
    assert set(result["colour"]) == set(result["shape"]) == {*module.FEATURES, *relus, "chance"}
    assert result["colour"]["pixels"] > result["colour"]["chance"] + 0.2
    assert all(0.0 <= v <= 1.0 for attribute in module.ATTRIBUTES for v in result[attribute].values())
    assert "| colour |" in capsys.readouterr().out
    patchify = build_model(UnifiedVLConfig.from_preset("uvl-tiny", text_config=text), tokenizer)
    with pytest.raises(SystemExit, match="--stem-layers needs a convolutional stem; this model's is Conv2d"):
        module._stem_layers(patchify, torch.zeros(1, 3, 64, 64), (4, 4))
