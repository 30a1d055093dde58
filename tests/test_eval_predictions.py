"""Evaluation keeps its predictions: the training jobs' final evaluation writes each record's prediction,
score and gold into the run folder, the kept predictions reproduce the reported metrics, and
`unified-vl data show --predictions` draws them beside the gold."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from test_jobs import FIVE, pretrained, synth_data  # noqa: F401  (fixtures)

import tasks
from data_tools import cli, show, storage
from data_tools.predictions import read_predictions


def test_the_final_evaluation_keeps_its_predictions_in_the_run_folder(pretrained, synth_data):  # noqa: F811
    final = json.loads((pretrained / "eval_final.json").read_text())["metrics"]
    for split in ("test", "heldout"):
        lines = read_predictions(pretrained / "predictions" / f"{split}.jsonl")
        for name in FIVE:
            task = tasks.get_task(name)
            mine = [line for line in lines if line["task"] == name]
            records = list(storage.load_split(synth_data, name, split, decode_images=False))
            assert [line["id"] for line in mine] == [r["id"] for r in records]
            assert all(
                line["split"] == split and line["score"] <= 0.0 and math.isfinite(line["score"]) for line in mine
            )
            assert mine[0]["gold"] == json.loads(json.dumps(task.gold(records[0])))
            # The kept predictions give the reported metric: a user can sort and inspect what was scored.
            recomputed = task.evaluate([line["prediction"] for line in mine], records)[task.primary_metric]
            assert recomputed == pytest.approx(final[f"{name}/{split}/{task.primary_metric}"], abs=1e-12)


def test_data_show_draws_predictions_beside_the_gold(pretrained, synth_data, tmp_path, capsys):  # noqa: F811
    predictions = pretrained / "predictions" / "test.jsonl"
    png = tmp_path / "worst.png"
    args = ["show", "--data", str(synth_data), "--predictions", str(predictions), "--task", "rec", "--n", "4"]
    assert cli.main([*args, "--worst", "--out", str(png)]) == 0
    cell_height = show.CELL_SIZE + show.TEXT_LINES * show.LINE_HEIGHT
    grid = np.asarray(Image.open(png))
    assert grid.shape[:2] == (2 * cell_height, 2 * 2 * show.CELL_SIZE)  # 2 x 2 pairs: gold | prediction
    # Under the images: the gold's text on the left (grey and red), the prediction's in blue on the right.
    text = grid[show.CELL_SIZE : cell_height].astype(int)  # (rows, width, 3)
    bluish = (text[..., 2] - text[..., 0] > 100).any(axis=0)  # (width,)
    assert bluish[show.CELL_SIZE : 2 * show.CELL_SIZE].any() and not bluish[: show.CELL_SIZE].any()

    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "nope", "task": "rec", "split": "test", "text": "", "prediction": None,
                                 "score": None}) + "\n")  # fmt: skip
    assert cli.main(["show", "--data", str(synth_data), "--predictions", str(other), "--out", str(png)]) == 1
    assert "prediction 'nope' is not a record of" in capsys.readouterr().err
    assert cli.main(["show", "--data", str(synth_data), "--worst", "--out", str(png)]) == 1
    assert "--worst orders predictions: give --predictions FILE" in capsys.readouterr().err
