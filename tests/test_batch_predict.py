"""`unified-vl predict` over many inputs: a folder equals one-at-a-time predict, a killed run resumes
without duplicates or gaps, bad input is named, and predictions of a data folder equal evaluation's.

The model is tests/test_inference.py's briefly trained uvl-tiny folder (its outputs differ between images).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_formats import official_vqa_accuracy, vqav2_fixture
from test_inference import EXPRESSION, QUESTION, scene_images, served_model_dir, torch_threads  # noqa: F401

from data_tools.predictions import PredictionsError, read_predictions
from unified_vl.app.cli import main

REPO = Path(__file__).resolve().parents[1]


def _predict(model, *args) -> int:
    with torch_threads(1):
        return main(["predict", "--model", str(model), "--device", "cpu", *map(str, args)])


@pytest.fixture()
def folder(tmp_path):
    """The four scene images of different sizes, one under a COCO file name in a subfolder."""
    names = ["a.png", "b.png", "sub/COCO_val2014_000000000042.png", "sub/d.png"]
    for name, image in zip(names, scene_images(), strict=True):
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(tmp_path / "images" / name)
    (tmp_path / "images" / "notes.txt").write_text("not an image: skipped")
    return tmp_path / "images"


def _requests(tmp_path, folder, n, **fields):
    path = tmp_path / "requests.jsonl"
    images = sorted(p.relative_to(tmp_path).as_posix() for p in folder.rglob("*.png"))
    lines = [{"id": f"r{k:03d}", "image": images[k % len(images)], **fields} for k in range(n)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.mark.parametrize("task, text", [("vqa", QUESTION), ("rec", EXPRESSION)])
def test_a_folder_equals_one_image_at_a_time(served_model_dir, folder, tmp_path, capsys, task, text):  # noqa: F811
    out = tmp_path / "preds.jsonl"
    assert _predict(served_model_dir, "--task", task, "--images", folder, "--text", text, "--predictions", out,
                    "--batch-size", 3) == 0  # fmt: skip
    assert "4 predictions in" in capsys.readouterr().err
    lines = read_predictions(out)
    assert [line["id"] for line in lines] == ["a.png", "b.png", "sub/COCO_val2014_000000000042.png", "sub/d.png"]
    for line in lines:
        assert _predict(served_model_dir, "--task", task, "--image", folder / line["id"], "--text", text) == 0
        single = json.loads(capsys.readouterr().out)["prediction"]
        assert line["text"] == single["text"]
        assert line["score"] == pytest.approx(single["score"], abs=1e-4)
        assert line["prediction"] == (single["answer"] if task == "vqa" else pytest.approx(single["box"]))
        assert line["image"] == str(folder / line["id"])
    assert len({line["text"] for line in lines}) > 1  # different outputs: the equality is not vacuous
    # COCO file names give the image id that COCO results key on (vqa records have one; rec's do not).
    assert [line.get("image_id") for line in lines] == ([None, None, 42, None] if task == "vqa" else [None] * 4)


def test_requests_carry_their_ids_and_source_ids_into_lines_and_the_official_file(
    served_model_dir,  # noqa: F811
    folder,
    tmp_path,
    capsys,
):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(
        json.dumps({"id": "q1", "image": "images/a.png", "question": QUESTION, "question_id": 101}) + "\n\n"
        + json.dumps({"image": str(folder / "b.png"), "question": "how many shapes?", "question_id": 102}) + "\n"
    )  # fmt: skip
    out = tmp_path / "preds.jsonl"
    assert _predict(served_model_dir, "--task", "vqa", "--requests", requests, "--predictions", out,
                    "--format", "vqav2") == 0  # fmt: skip
    lines = read_predictions(out)
    assert [(line["id"], line["question_id"]) for line in lines] == [("q1", 101), ("3", 102)]  # id: line number
    results = json.loads((tmp_path / "preds.vqav2.json").read_text())
    assert results == [{"question_id": line["question_id"], "answer": line["prediction"] or ""} for line in lines]
    assert "wrote 2 vqav2 results" in capsys.readouterr().err


def test_a_killed_run_resumes_without_duplicates_or_gaps(served_model_dir, folder, tmp_path):  # noqa: F811
    n = 96
    requests = _requests(tmp_path, folder, n, question=QUESTION)
    out, reference = tmp_path / "preds.jsonl", tmp_path / "reference.jsonl"
    command = [sys.executable, "-m", "unified_vl.app.cli", "predict", "--model", str(served_model_dir), "--device",
               "cpu", "--task", "vqa", "--requests", str(requests), "--predictions", str(out), "--batch-size", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 5:
            process.send_signal(signal.SIGKILL)  # no cleanup at all: a kill at any point of a write
            break
        time.sleep(0.005)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    written = out.read_bytes().count(b"\n")
    assert 5 <= written < n, "the run must be killed midway"

    assert _predict(served_model_dir, "--task", "vqa", "--requests", requests, "--predictions", out, "--resume") == 0
    assert _predict(served_model_dir, "--task", "vqa", "--requests", requests, "--predictions", reference) == 0
    resumed, whole = read_predictions(out), read_predictions(reference)
    assert [line["id"] for line in resumed] == [f"r{k:03d}" for k in range(n)]  # every input once, in order
    assert [line["text"] for line in resumed] == [line["text"] for line in whole]
    assert [line["score"] for line in resumed] == pytest.approx([line["score"] for line in whole], abs=1e-4)
    # Resuming a finished file predicts nothing and changes nothing.
    before = out.read_bytes()
    assert _predict(served_model_dir, "--task", "vqa", "--requests", requests, "--predictions", out, "--resume") == 0
    assert out.read_bytes() == before


def test_an_incomplete_last_line_is_refused_when_read_and_cut_on_resume(
    served_model_dir,  # noqa: F811
    folder,
    tmp_path,
    capsys,
):
    requests = _requests(tmp_path, folder, 5, question=QUESTION)
    out = tmp_path / "preds.jsonl"
    assert _predict(served_model_dir, "--task", "vqa", "--requests", requests, "--predictions", out) == 0
    complete = out.read_bytes()
    out.write_bytes(complete[: complete.rfind(b'"score"')])  # a kill in the middle of the last line
    with pytest.raises(PredictionsError, match=r"line 5 is incomplete.*--resume"):
        read_predictions(out)
    assert _predict(served_model_dir, "--task", "vqa", "--requests", requests, "--predictions", out, "--resume") == 0
    err = capsys.readouterr().err
    assert "1 predictions in" in err and "4 already there" in err
    resumed = read_predictions(out)
    assert [line["id"] for line in resumed] == [f"r{k:03d}" for k in range(5)]
    assert [line["text"] for line in resumed] == [json.loads(x)["text"] for x in complete.splitlines()]


def _error(capsys, model, *args) -> str:
    assert _predict(model, *args) == 2
    return capsys.readouterr().err


def test_bad_input_is_named_before_anything_runs(folder, tmp_path, capsys):
    model = tmp_path / "no-model"  # never loaded: every error comes first
    out = tmp_path / "preds.jsonl"
    requests = tmp_path / "requests.jsonl"
    a = json.dumps({"image": "images/a.png", "question": "what?"})
    for lines, message in [
        ([a, "[1, 2]"], "requests.jsonl line 2: expected a JSON object, got list"),
        ([a, "{not json"], "requests.jsonl line 2: not valid JSON"),
        ([json.dumps({"image": "images/a.png"})], "line 1: missing field(s) ['question'] that a vqa request needs"),
        ([json.dumps({"image": "images/a.png", "questoin": "x"})], "line 1: unknown field(s) ['questoin']; a vqa"),
        ([json.dumps({"image": "images/gone.png", "question": "x"})], "line 1: image file"),
        ([json.dumps({"id": "x", "image": "images/a.png", "question": "x"})] * 2, "line 2: id 'x' repeats line 1"),
        (
            [json.dumps({"image": "images/a.png", "question": "x", "question_id": "7"})],
            "'question_id' must be an integer",
        ),
    ]:
        requests.write_text("\n".join(lines) + "\n")
        err = _error(capsys, model, "--task", "vqa", "--requests", requests, "--predictions", out)
        assert message in err, err
        assert not out.exists()
    requests.write_text(a + "\n")
    err = _error(capsys, model, "--task", "vqa", "--requests", requests, "--predictions", out, "--format", "vqav2")
    assert "record '1' has no 'question_id'" in err and "--format vqav2 keys on it" in err
    assert "write their predictions to --predictions" in _error(capsys, model, "--task", "vqa", "--requests", requests)
    assert "no image files found" in _error(capsys, model, "--task", "captioning", "--images", tmp_path / "*.gif",
                                            "--predictions", out)  # fmt: skip
    out.write_text("")
    assert "preds.jsonl exists; pass --overwrite" in _error(
        capsys, model, "--task", "vqa", "--requests", requests, "--predictions", out
    )
    out.write_text(json.dumps({"id": "other", "task": "vqa", "text": "", "prediction": None, "score": None}) + "\n")
    err = _error(capsys, model, "--task", "vqa", "--requests", requests, "--predictions", out, "--resume")
    assert "prediction for id 'other', which is not among these inputs" in err


def test_predictions_of_a_data_folder_equal_evaluation_and_round_trip_to_vqav2(
    served_model_dir,  # noqa: F811
    tmp_path,
    capsys,
):
    from data_tools.converters import convert
    from unified_vl.app.jobs import evaluate

    questions, annotations = vqav2_fixture(tmp_path)
    data = tmp_path / "data"
    convert("vqav2", inputs=[questions, annotations], images=[tmp_path], out=data, log=lambda *a: None)
    predicted = tmp_path / "predicted.jsonl"
    assert _predict(served_model_dir, "--data", data, "--task", "vqa", "--split", "val", "--predictions", predicted,
                    "--format", "vqav2", "--batch-size", 3) == 0  # fmt: skip
    evaluated = tmp_path / "evaluated.jsonl"
    with torch_threads(1):
        assert evaluate.main(["--model", str(served_model_dir), "--data", str(data), "--task", "vqa", "--split", "val",
                              "--predictions", str(evaluated), "--out", str(tmp_path / "metrics.json")]) == 0  # fmt: skip
    served, scored = read_predictions(predicted), read_predictions(evaluated)
    assert [line["id"] for line in served] == [line["id"] for line in scored]
    assert [line["text"] for line in served] == [line["text"] for line in scored]  # a served answer = an evaluated one
    assert [line["score"] for line in served] == pytest.approx([line["score"] for line in scored], abs=1e-4)
    assert [line["question_id"] for line in scored] == [int(line["id"]) for line in scored]
    assert scored[0]["gold"] == "2" and scored[0]["split"] == "val"
    accuracy = json.loads((tmp_path / "metrics.json").read_text())["metrics"]["vqa/val/accuracy"]
    results = tmp_path / "predicted.vqav2.json"
    assert official_vqa_accuracy(questions, annotations, results) == pytest.approx(accuracy, abs=1e-12)
    # The same file from evaluation; an existing one is refused without --overwrite.
    args = ["--model", str(served_model_dir), "--data", str(data), "--task", "vqa", "--split", "val",
            "--format", "vqav2", "--results", str(results)]  # fmt: skip
    assert evaluate.main(args) == 2
    assert "predicted.vqav2.json exists; pass --overwrite" in capsys.readouterr().err
    with torch_threads(1):
        assert evaluate.main([*args, "--overwrite"]) == 0
    assert official_vqa_accuracy(questions, annotations, results) == pytest.approx(accuracy, abs=1e-12)


def test_sigterm_stops_after_the_batch_in_flight(served_model_dir, folder, tmp_path, capsys, monkeypatch):  # noqa: F811
    from data_tools.predictions import PredictionsWriter

    requests = _requests(tmp_path, folder, 9, question=QUESTION)
    out = tmp_path / "preds.jsonl"
    write = PredictionsWriter.write

    def write_then_terminate(self, lines):
        write(self, lines)
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler stopping the job; our handler only takes note

    monkeypatch.setattr(PredictionsWriter, "write", write_then_terminate)
    args = ("--task", "vqa", "--requests", requests, "--predictions", out, "--batch-size", 2)
    assert _predict(served_model_dir, *args) == 130
    assert "stopped early; the same command with --resume continues" in capsys.readouterr().err
    assert [line["id"] for line in read_predictions(out)] == ["r000", "r001"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone again
    monkeypatch.undo()
    assert _predict(served_model_dir, *args, "--resume") == 0
    assert [line["id"] for line in read_predictions(out)] == [f"r{k:03d}" for k in range(9)]
