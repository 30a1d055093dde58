"""Issue #17 outside the server: bad values refused before work starts, no NaN model, your own data end
to end, converters under malformed input (hypothesis), file modes, and corrupt model files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_jobs import FAST

from unified_vl.app.jobs import evaluate, finetune, pretrain
from unified_vl.engine.config import ConfigError, load_config

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


# -- the config layer -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.lr=inf", ["optim.lr", "finite"]),
        ("optim.lr=nan", ["optim.lr", "finite"]),
        ("optim.lr=-1e-3", ["optim.lr", "> 0"]),
        ("optim.beta1=2", ["optim.beta1", "[0, 1)"]),
        ("optim.beta2=-0.1", ["optim.beta2", "[0, 1)"]),
        ("optim.eps=-1", ["optim.eps", "> 0"]),
        ("optim.eps=0", ["optim.eps", "> 0"]),
        ("data.tasks={vqa: .nan}", ["data.tasks.vqa", "finite"]),
        ("model.overrides.text_config.d_model=abc", ["text_config.d_model", "expected int", "'abc'"]),
        ("model.overrides.text_config.num_heads=0", ["text_config.num_heads", ">= 1"]),
        ("model.overrides.text_config.dropout_rate=1.5", ["dropout_rate", "[0, 1)"]),
        ("model.overrides.image_size=big", ["model.overrides.image_size", "expected int"]),
        ("model.overrides.visual_mode=stacked", ["visual_mode", "fused"]),
    ],
)
def test_bad_values_are_refused_when_the_config_loads(override, words):
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["data.tasks={vqa: 1}", override])
    for word in words:
        assert word in str(caught.value)


# Values a careless user types: numbers of every kind, words, empty, YAML structures.
VALUES = st.one_of(
    st.sampled_from(["inf", "-inf", "nan", ".nan", "", "null", "abc", "1e-3", "-1", "0", "2", "0.5", "1e309"]),
    st.sampled_from(["[]", "[val]", "{}", "{vqa: 1}", "true", "[1, 2]", "{a: {b: 1}}", "²", "--3"]),
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=8),
)
KEYS = st.sampled_from(
    [
        "optim.lr",
        "optim.beta1",
        "optim.beta2",
        "optim.eps",
        "optim.weight_decay",
        "optim.min_lr_ratio",
        "optim.grad_clip",
        "optim.warmup_steps",
        "optim.schedule",
        "train.max_steps",
        "train.global_batch_size",
        "train.micro_batch_size",
        "train.max_minutes",
        "train.loc_sigma",
        "train.precision",
        "train.zero_stage",
        "data.temperature",
        "data.shots",
        "data.tasks",
        "data.tasks.vqa",
        "eval.splits",
        "eval.num_beams",
        "model.overrides.text_config.d_model",
        "model.overrides.text_config.dropout_rate",
        "model.overrides.image_size",
        "model.overrides.num_bins",
        "model.nosuch",
        "nosuch",
    ]
)


@PROPERTY
@given(items=st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=4))
def test_any_overrides_give_a_clear_error_or_a_valid_config(items):
    import math

    from unified_vl.engine.config import RunConfig, to_dict, validate

    overrides = ["data.tasks={vqa: 1}", *(f"{key}={value}" for key, value in items)]
    try:
        config = load_config(None, overrides)
    except ConfigError as exc:
        assert str(exc).strip() and "\n" not in str(exc).split("All keys:")[0].strip()
        return
    assert isinstance(config, RunConfig)
    validate(config)  # a loaded config is a valid one

    def finite(value):
        if isinstance(value, float):
            assert math.isfinite(value)
        elif isinstance(value, dict):
            for v in value.values():
                finite(v)
        elif isinstance(value, list):
            for v in value:
                finite(v)

    finite(to_dict(config))
    o = config.optim
    assert o.lr > 0 and o.eps > 0 and 0 <= o.beta1 < 1 and 0 <= o.beta2 < 1


@pytest.mark.parametrize(
    "args, words",
    [
        (["data.tasks={nosuchtask: 1}"], ["data.tasks", "nosuchtask", "known tasks", "vqa"]),
        (["eval.final_splits=[nosuch]"], ["eval.final_splits", "'nosuch'", "train, val"]),
        (
            ["eval.every=1", "eval.splits=[nosuch]", "eval.final_splits=[val]"],
            ["eval.splits", "'nosuch'", "eval.splits=[val] or eval.every=0"],
        ),
        (["eval.final_splits=[test]"], ["eval.final_splits", "'test'", "eval.final_splits=[val]"]),
    ],
)
def test_tasks_and_splits_are_checked_before_any_process_starts(own_vqa, tmp_path, capsys, monkeypatch, args, words):
    from unified_vl.app.jobs import common

    def no_start(*a, **k):  # the checks must come first: reaching here is a failure
        raise AssertionError("a process would have started")

    monkeypatch.setattr(common, "relaunch_locally", no_start)
    monkeypatch.setattr(pretrain, "relaunch_locally", no_start)
    code = pretrain.main([f"data.path={own_vqa}", "data.tasks={vqa: 1}", *FAST, *args, f"output_dir={tmp_path / 'r'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    for word in words:
        assert word in err
    assert not (tmp_path / "r").exists()


# -- non-finite training ---------------------------------------------------------------------------------
def test_a_nan_loss_stops_the_run_at_its_step_and_nothing_is_exported(own_vqa, tmp_path, capsys):
    run = tmp_path / "r"
    args = [f"data.path={own_vqa}", "data.tasks={vqa: 1}", *FAST, "eval.final_splits=[val]", f"output_dir={run}"]
    # A finite learning rate so large that the first update overflows the next forward pass.
    code = pretrain.main([*args, "optim.lr=1e30", "optim.warmup_steps=0", "train.max_steps=3"])
    assert code == 1
    err = capsys.readouterr().err
    assert "error: step 2: the training loss is nan" in err
    assert not (run / "model").exists() and not (run / "eval_final.json").exists()
    assert not list((run / "checkpoints").glob("step_*"))


def test_weights_with_nan_are_never_saved(tiny_model):
    import torch

    from unified_vl.engine.trainer import NonFiniteError, check_weights_finite

    check_weights_finite(tiny_model, 5, what="the model folder")  # finite: no error
    with torch.no_grad():
        next(tiny_model.parameters())[0].fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="step 5: the weights hold nan or inf .*the model folder was not written"):
        check_weights_finite(tiny_model, 5, what="the model folder")


# -- your own data, end to end ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def own_vqa(tmp_path_factory):
    """A VQAv2-layout dataset with train and val only (as VQAv2 ships), converted from JSON lines."""
    from data_tools.converters import convert

    root = tmp_path_factory.mktemp("own")
    rows = []
    for i in range(24):
        colour = ("red", "green", "blue")[i % 3]
        Image.new("RGB", (32, 32), colour).save(root / f"{i}.png")
        split = "val" if i % 4 == 0 else "train"
        question = {"question": "what color is the image?", "answers": [colour], "answer_type": "other"}
        rows.append(json.dumps({"task": "vqa", "split": split, "id": f"q{i}", "image": f"{i}.png", **question}))
    (root / "records.jsonl").write_text("\n".join(rows) + "\n")
    convert("jsonl", inputs=[root / "records.jsonl"], images=[root], out=root / "data", log=lambda *a: None)
    return root / "data"


def test_pretrain_on_train_and_val_only_data_ends_with_exit_0(own_vqa, tmp_path, capsys):
    import shlex

    from unified_vl.app.inference.cli import predict_main

    run = tmp_path / "r"
    code = pretrain.main(
        [f"data.path={own_vqa}", "data.tasks={vqa: 1}", "eval.final_splits=[val]", *FAST, f"output_dir={run}"]
    )
    assert code == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.strip().startswith("task"))
    assert header.split() == ["task", "metric", "val"]  # the split evaluated, no empty test/heldout columns
    assert "vqa/val/accuracy" in json.loads((run / "eval_final.json").read_text())["metrics"]
    command = out.split("try a prediction:\n")[1].strip().splitlines()[0]
    args = shlex.split(command)
    assert args[:2] == ["unified-vl", "predict"] and Path(args[args.index("--image") + 1]).is_file()
    assert predict_main(args[2:]) == 0  # the command to try works as printed


def test_finetune_on_train_and_val_only_data_ends_with_exit_0(own_vqa, tmp_path):
    run = tmp_path / "f"
    args = ["--task", "vqa", "--data", str(own_vqa), *FAST, "eval.final_splits=[val]", "eval.every=2"]
    assert finetune.main([*args, f"output_dir={run}"]) == 0
    assert "vqa/val/accuracy" in json.loads((run / "eval_final.json").read_text())["metrics"]


# -- file modes ------------------------------------------------------------------------------------------
def _modes(folder: Path) -> set[int]:
    return {stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def test_model_folders_and_manifests_follow_the_umask(tiny_model, processor, tmp_path):
    from data_tools import storage
    from unified_vl.checkpoint import save_pretrained

    old = os.umask(0o022)
    try:
        out = save_pretrained(tiny_model, processor, tmp_path / "model")
        storage.write_dataset(tmp_path / "data", {("vqa", "train"): []}, source="t", command="t")
    finally:
        os.umask(old)
    dirs = {stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")] if p.is_dir()}
    files = {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert dirs == {0o755} and files == {0o644}
    assert stat.S_IMODE((tmp_path / "data" / storage.MANIFEST_NAME).stat().st_mode) == 0o644
    os.umask(0o077)
    try:
        private = save_pretrained(tiny_model, processor, tmp_path / "private")
    finally:
        os.umask(old)
    assert _modes(private) <= {0o700, 0o600}


# -- corrupt model files -----------------------------------------------------------------------------------
@pytest.fixture()
def model_copy(tiny_model, processor, tmp_path):
    from unified_vl.checkpoint import save_pretrained

    return save_pretrained(tiny_model, processor, tmp_path / "model")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-64])


CORRUPTIONS = {
    "truncated weights": ("model.safetensors", _truncate, "not a complete safetensors file"),
    "malformed config": ("config.json", lambda p: p.write_text('{"model_type": "unified_vl",'), "not valid JSON"),
    "wrong-typed config": (
        "config.json",
        lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "image_size": "big"})),
        "do not make a model",
    ),
    "corrupt tokenizer": ("tokenizer.json", lambda p: p.write_text('{"version": "1.0", "model": 5}'), "tokenizer"),
}


@pytest.mark.parametrize("command", ["predict", "eval", "serve"])
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_corrupt_model_file_is_one_line_and_exit_2(model_copy, own_vqa, tmp_path, capsys, command, name):
    from unified_vl.app.inference.cli import predict_main, serve_main

    file, corrupt, words = CORRUPTIONS[name]
    corrupt(model_copy / file)
    image = tmp_path / "i.png"
    Image.new("RGB", (16, 16)).save(image)
    argv = {
        "predict": ["--model", str(model_copy), "--task", "vqa", "--image", str(image), "--text", "what?"],
        "eval": ["--model", str(model_copy), "--data", str(own_vqa), "--split", "val"],
        "serve": ["--model", str(model_copy), "--port", "1"],  # never binds: the model fails first
    }[command]
    main = {"predict": predict_main, "eval": evaluate.main, "serve": serve_main}[command]
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "Loading weights" not in line]
    assert len(lines) == 1 and str(model_copy / file) in lines[0] and words in lines[0]


# -- converters under malformed input ---------------------------------------------------------------------
def _convert(source, inputs, images, out, **kwargs):
    from data_tools.converters import convert

    return convert(source, inputs=inputs, images=images, out=out, log=lambda *a: None, **kwargs)


def test_vqav2_skip_bad_skips_duplicate_question_ids(tmp_path):
    from data_tools import storage
    from data_tools.converters import ConversionError

    images = tmp_path / "images"
    images.mkdir()
    for image_id in (1, 2):
        Image.new("RGB", (20, 10)).save(images / f"COCO_val2014_{image_id:012d}.jpg")
    questions = [
        {"image_id": 1, "question": "what?", "question_id": 10},
        {"image_id": 2, "question": "again?", "question_id": 10},  # a duplicate id
        {"image_id": 2, "question": "where?", "question_id": 11},
    ]
    answers = [{"answer": "yes"}] * 3
    annotations = [
        {"question_id": 10, "answers": answers, "answer_type": "yes/no"},
        {"question_id": 11, "answers": answers, "answer_type": "yes/no"},
        {"question_id": 11, "answers": [{"answer": "no"}] * 3, "answer_type": "yes/no"},  # a duplicate annotation
    ]
    q = tmp_path / "q.json"
    a = tmp_path / "a.json"
    q.write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))
    a.write_text(json.dumps({"data_subtype": "val2014", "annotations": annotations}))
    with pytest.raises(ConversionError, match="duplicate question_id"):
        _convert("vqav2", [q, a], [images], tmp_path / "strict")
    assert not (tmp_path / "strict" / storage.MANIFEST_NAME).exists()
    manifest = _convert("vqav2", [q, a], [images], tmp_path / "out", skip_bad=True)
    assert manifest["tasks"] == {"vqa": {"val": 2}} and manifest["skipped_count"] == 2
    rows = {r["id"]: r for r in storage.load_split(tmp_path / "out", "vqa", "val", decode_images=False)}
    assert rows["10"]["question"] == "what?" and rows["11"]["answers"] == ["yes"] * 3  # the first of each


def test_imagefolder_resolves_symlinks_skips_loops_and_duplicates(tmp_path):
    from data_tools import storage

    root = tmp_path / "root"
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
    for name in ("cat/a.png", "cat/b.png", "dog/c.png"):
        Image.new("RGB", (8, 8)).save(root / name)
    (root / "cat" / "loop").symlink_to("..")  # a loop back to the root: dog/ reachable under cat/
    (root / "dog" / "a-link.png").symlink_to("../cat/a.png")  # a cat image linked under dog
    manifest = _convert("imagefolder", [root], [], tmp_path / "out")
    rows = list(storage.load_split(tmp_path / "out", "classification", "train", decode_images=False))
    labels = {Path(r["image"]["path"]).name: r["label"] for r in rows}
    assert len(rows) == 3 and labels == {"a.png": "cat", "b.png": "cat", "c.png": "dog"}
    assert manifest["notes"]["folders reached twice through symlinks (loops) skipped"] >= 1
    assert manifest["notes"]["image files reached twice (symlinks) listed once"] == 3


@pytest.mark.parametrize("source", ["csv", "jsonl"])
def test_image_paths_stay_inside_the_images_folder_unless_allowed(tmp_path, source):
    from data_tools import storage
    from data_tools.converters import ConversionError

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "in.png")
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), "red").save(secret)
    (images / "out-link.png").symlink_to(secret)
    paths = ["in.png", "../secret.png", str(secret), "out-link.png"]
    if source == "csv":
        file = tmp_path / "labels.csv"
        file.write_text("path,label\n" + "".join(f"{p},thing\n" for p in paths))
    else:
        file = tmp_path / "records.jsonl"
        lines = [{"task": "classification", "id": f"r{i}", "image": p, "label": "thing"} for i, p in enumerate(paths)]
        file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ConversionError, match="leads outside the images folder"):
        _convert(source, [file], [images], tmp_path / "strict", embed_images=True)
    manifest = _convert(source, [file], [images], tmp_path / "skip", embed_images=True, skip_bad=True)
    assert manifest["tasks"]["classification"]["train"] == 1 and manifest["skipped_count"] == 3
    allowed = _convert(source, [file], [images], tmp_path / "all", confine_images=False)
    assert allowed["tasks"]["classification"]["train"] == 4
    assert len(storage.load_split(tmp_path / "all", "classification", "train")) == 4


# Malformed records: any JSON value where a record (or one of its fields) should be.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
FIELDS = {
    "task": st.sampled_from(["vqa", "classification", "rec", "nosuch"]) | JSON,
    "id": st.text(max_size=6) | JSON,
    "image": st.sampled_from(["0.png", "1.png", "missing.png", "../0.png", "/etc/passwd", "", "a\x00b"]) | JSON,
    "question": st.sampled_from(["what color?", "", " "]) | JSON,
    "answers": st.sampled_from([["red"], [], ["red", ""]]) | JSON,
    "answer_type": st.sampled_from(["other", "yes/no", "colour"]) | JSON,
    "label": st.sampled_from(["red", "blue", ""]) | JSON,
    "expression": st.text(max_size=10) | JSON,
    "box": st.sampled_from([[0, 0, 4, 4], [0, 0, 99, 4], [4, 4, 0, 0]]) | JSON,
    "split": st.sampled_from(["train", "val"]) | JSON,
}
RECORDS = st.fixed_dictionaries({}, optional=FIELDS)


@pytest.fixture(scope="module")
def jsonl_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jsonl-images")
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (8, 8), colour).save(folder / f"{i}.png")
    return folder


@PROPERTY
@given(lines=st.lists(RECORDS | JSON, min_size=1, max_size=6))
def test_jsonl_records_convert_fail_clearly_or_are_skipped_and_counted(jsonl_images, tmp_path_factory, lines):
    from data_tools import storage
    from data_tools.converters import ConversionError

    work = tmp_path_factory.mktemp("prop")
    file = work / "records.jsonl"
    file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    try:
        _convert("jsonl", [file], [jsonl_images], work / "strict")
    except ConversionError as exc:
        assert str(file) in str(exc) and "line " in str(exc)  # names the file and the record
        assert not (work / "strict" / storage.MANIFEST_NAME).exists()  # nothing half-written
    manifest = _convert("jsonl", [file], [jsonl_images], work / "skip", skip_bad=True)
    written = sum(n for splits in manifest["tasks"].values() for n in splits.values())
    assert written + manifest["skipped_count"] == len(lines)  # every line either written or counted
    for task, splits in manifest["tasks"].items():
        for split in splits:
            for row in storage.load_split(work / "skip", task, split, decode_images=False):
                line = next(
                    ln for ln in lines if isinstance(ln, dict) and ln.get("id") == row["id"] and ln.get("task") == task
                )
                assert Path(row["image"]["path"]) == (jsonl_images / line["image"]).resolve()
                if task == "classification":
                    assert row["label"] == line["label"]  # never a wrong label


@PROPERTY
@given(
    questions=st.lists(
        st.fixed_dictionaries(
            {"image_id": st.sampled_from([1, 2, 3]) | JSON, "question_id": st.integers(1, 6) | JSON},
            optional={"question": st.sampled_from(["what?", ""]) | JSON},
        ),
        max_size=6,
    ),
    annotations=st.lists(
        st.fixed_dictionaries(
            {"question_id": st.integers(1, 6) | JSON},
            optional={
                "answers": st.sampled_from([[{"answer": "yes"}] * 3, [], [{"answer": ""}]]) | JSON,
                "answer_type": st.sampled_from(["yes/no", "number", "x"]) | JSON,
            },
        ),
        max_size=6,
    ),
)
def test_vqav2_malformed_records_fail_clearly_or_are_skipped_and_counted(tmp_path_factory, questions, annotations):
    from data_tools import storage
    from data_tools.converters import ConversionError

    work = tmp_path_factory.mktemp("vqa")
    for image_id in (1, 2):
        Image.new("RGB", (8, 8)).save(work / f"COCO_train2014_{image_id:012d}.jpg")
    q, a = work / "q.json", work / "a.json"
    q.write_text(json.dumps({"data_subtype": "train2014", "questions": questions}))
    a.write_text(json.dumps({"data_subtype": "train2014", "annotations": annotations}))
    try:
        _convert("vqav2", [q, a], [work], work / "strict")
    except ConversionError as exc:
        assert str(q) in str(exc) or str(a) in str(exc)
    manifest = _convert("vqav2", [q, a], [work], work / "skip", skip_bad=True)
    written = manifest["tasks"].get("vqa", {}).get("train", 0)
    annotation_problems = sum(1 for s in manifest["skipped"] if "annotations[" in s["record"])
    assert written + manifest["skipped_count"] - annotation_problems == len(questions)
    first_answers = {}
    for ann in annotations:
        if isinstance(ann.get("question_id"), int) and not isinstance(ann["question_id"], bool):
            first_answers.setdefault(ann["question_id"], ann)
    for row in storage.load_split(work / "skip", "vqa", "train", decode_images=False) if written else []:
        expected = [x["answer"] for x in first_answers[int(row["id"])]["answers"]]
        assert row["answers"] == expected  # the answers of that question's first annotation
