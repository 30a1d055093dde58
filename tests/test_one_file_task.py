"""A task of your own is one file: registered from outside the package, it converts, trains,
evaluates and serves with no other file touched (DESIGN.md §4: adding a task adds a file)."""

from __future__ import annotations

import base64
import io
import json
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image
from test_jobs import FAST

TASK_FILE = '''
"""How bright is the image? A task the project has never heard of."""

from tasks import Task, choice_field, size_field

LEVELS = ("dark", "bright")


def metric(predictions, records):
    hits = [p == r["level"] for p, r in zip(predictions, records)]
    return {"accuracy": sum(hits) / len(hits)}


TASK = Task(
    name="brightness",
    fields={
        "width": size_field("width"),
        "height": size_field("height"),
        "level": choice_field("level", LEVELS),
        "lamp": choice_field("lamp", ("on", "off"), role="input", required=False),
    },
    prompts=("is the image dark or bright?",),
    primary_metric="accuracy",
    decoding="candidates",
    format_target=lambda record, rng: record["level"],
    parse_output=lambda text, record: text.strip() if text.strip() in LEVELS else None,
    gold_prediction=lambda record: record["level"],
    metric=metric,
    candidate_texts=lambda records: list(LEVELS),
    present=lambda level, score: {"level": level, "confident": score > -0.1},
    examples=(
        {"id": "b0", "image": None, "width": 8, "height": 8, "level": "dark"},
        {"id": "b1", "image": None, "width": 8, "height": 8, "level": "bright"},
        {"id": "b2", "image": None, "width": 8, "height": 8, "level": "dark", "lamp": "off"},
    ),
)
'''


@pytest.fixture()
def brightness(tmp_path, monkeypatch):
    import tasks

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "brightness.py").write_text(textwrap.dedent(TASK_FILE))
    monkeypatch.syspath_prepend(str(plugins))
    monkeypatch.setenv(tasks.TASKS_ENV, "brightness")  # what a user sets for every process of a run
    task = tasks.load_module("brightness")
    yield task
    tasks.unregister("brightness")
    sys.modules.pop("brightness", None)


def _records(folder, n: int, split: str, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        level = ("dark", "bright")[i % 2]
        base = 30 if level == "dark" else 220
        pixels = np.clip(base + rng.integers(-20, 20, (24, 20, 3)), 0, 255).astype(np.uint8)
        name = f"{split}-{i}.png"
        Image.fromarray(pixels).save(folder / name)
        rows.append({"task": "brightness", "split": split, "id": f"{split}-{i}", "image": name, "level": level})
    return rows


def test_a_task_from_one_outside_file_converts_trains_evaluates_and_serves(brightness, tmp_path, capsys):
    from data_tools import cli, storage
    from unified_vl.app.inference.predictor import Predictor
    from unified_vl.app.inference.server import create_app
    from unified_vl.app.jobs import evaluate, finetune

    images = tmp_path / "images"
    images.mkdir()
    lines = _records(images, 16, "train", 0) + _records(images, 6, "val", 1) + _records(images, 6, "test", 2)
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))

    # converted: the schema comes from the task's field specs
    data = tmp_path / "data"
    assert (
        cli.main(
            [
                "convert",
                "jsonl",
                "--input",
                str(tmp_path / "records.jsonl"),
                "--images",
                str(images),
                "--out",
                str(data),
            ]
        )
        == 0
    )
    assert storage.available(data) == {"brightness": {"train": 16, "val": 6, "test": 6}}
    stored = storage.load_split(data, "brightness", "train")[0]
    assert stored["level"] == "dark" and stored["lamp"] is None and (stored["width"], stored["height"]) == (20, 24)

    # trained (a few steps) and evaluated by the job, then by `unified-vl eval`
    run = tmp_path / "run"
    assert finetune.main(["--task", "brightness", "--data", str(data), *FAST, "eval.every=0", f"output_dir={run}"]) == 0
    final = json.loads((run / "eval_final.json").read_text())["metrics"]
    assert 0.0 <= final["brightness/test/accuracy"] <= 1.0
    out = tmp_path / "eval.json"
    assert (
        evaluate.main(["--model", str(run / "model"), "--data", str(data), "--split", "test", "--out", str(out)]) == 0
    )
    assert json.loads(out.read_text())["metrics"]["brightness/test/accuracy"] == final["brightness/test/accuracy"]

    # served: the request fields and the answer's shape are the task's own
    from fastapi.testclient import TestClient

    png = io.BytesIO()
    Image.open(images / "test-0.png").save(png, format="PNG")
    with TestClient(create_app(Predictor.from_pretrained(run / "model", device="cpu"))) as client:
        models = client.get("/v1/models").json()["data"][0]["tasks"]
        assert models["brightness"] == ["lamp"]
        body = {"task": "brightness", "image": base64.b64encode(png.getvalue()).decode(), "lamp": "on"}
        answer = client.post("/v1/predict", json=body)
        assert answer.status_code == 200, answer.text
        prediction = answer.json()["prediction"]
        assert prediction["level"] in ("dark", "bright") and isinstance(prediction["confident"], bool)
        assert set(prediction) == {"level", "confident", "score", "text"}
        bad = client.post("/v1/predict", json={**body, "lamp": "dim"})
        assert bad.status_code == 422 and "lamp" in bad.json()["error"]["message"]
