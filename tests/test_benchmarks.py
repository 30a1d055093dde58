"""Each benchmark script runs on a tiny setting and prints its table (the figures are not judged here).

The generation benchmark runs in the default suite; the others start DeepSpeed, servers or
several processes and run with the slow suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _run(script: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{Path(script).stem}.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={"OMP_NUM_THREADS": "1", **__import__("os").environ},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("machine: ") and "| " in text and text.strip() in proc.stdout
    return json.loads(out.with_suffix(".json").read_text())


def test_bench_generate(tmp_path):
    data = _run("bench_generate.py", "--batch", "4", "--new-tokens", "4", "--repeats", "1", tmp_path=tmp_path)
    assert data["batch_vs_one_greedy"]["median"] > 0 and data["tokens_per_s"]["no_cache"] > 0
    assert set(data) >= {"kv_cache", "vl_over_bare_t5", "predictor_over_generate"}


def test_profile_train_step(tmp_path):
    args = ["scripts/configs/learn_recipe.yaml", "model.overrides.image_size=32", "--micro-batch", "2", "--steps", "2"]
    data = _run("profile_train_step.py", *args, tmp_path=tmp_path)
    assert data["micro_batch"] == 2 and data["step_s"] > data["image_side_s"] > 0
    assert 0 < data["image_side_share"] < 1 and "compiled_speedup" not in data


@pytest.mark.slow
def test_bench_train(tmp_path):
    args = ["--presets", "uvl-tiny", "--batches", "4", "--steps", "1", "--repeats", "1", "--threads", "1"]
    row = _run("bench_train.py", *args, tmp_path=tmp_path)["rows"][0]
    assert row["preset"] == "uvl-tiny" and row["step_gflop"] > 0 and 0 < row["utilisation"] < 10


@pytest.mark.slow
def test_bench_data(tmp_path):
    data = _run(
        "bench_data.py", "--num-images", "16", "--batch", "8", "--steps", "2", "--repeats", "1", tmp_path=tmp_path
    )
    assert data["consumption_samples_per_s"] > 0
    assert set(data["stores"]) == {"embedded PNG bytes", "image files by path"}


@pytest.mark.slow
def test_bench_memory(tmp_path):
    args = ["--preset", "uvl-tiny", "--steps", "1", "--settings", "ZeRO 0", "ZeRO 3"]
    data = _run("bench_memory.py", *args, tmp_path=tmp_path)
    assert set(data["settings"]) == {"ZeRO 0", "ZeRO 3"}
    assert all(s["peak"] > s["floor"] > 0 for s in data["settings"].values())
    # ZeRO 3 counts its partitioned parameters whole (ds_numel), so the model is the same size
    assert data["settings"]["ZeRO 0"]["parameters"] == data["settings"]["ZeRO 3"]["parameters"] > 1e6
    assert 0.5 < data["ideal_zero3_ratio"] < 1.0


@pytest.mark.slow
def test_bench_serve(tmp_path):
    data = _run("bench_serve.py", "--requests", "8", "--clients", "1", "4", tmp_path=tmp_path)
    assert all(run["errors"] == 0 for run in data["runs"].values()) and len(data["runs"]) == 4


@pytest.mark.slow
def test_bench_learning(tmp_path):
    from test_jobs import FAST

    from data_tools import synth
    from unified_vl.app.jobs import pretrain

    data = tmp_path / "data"
    synth.generate(str(data), num_images=24, num_eval_images=4, image_size=32, seed=0, log=lambda *a: None)
    run = tmp_path / "run"
    overrides = [*FAST, "checkpoint.every=1", "checkpoint.keep_last=10", "eval.final_splits=[]"]
    assert pretrain.main([f"data.path={data}", *overrides, f"output_dir={run}"]) == 0
    result = _run("bench_learning.py", "--run", str(run), "--max-examples", "4", tmp_path=tmp_path)
    assert [p["step"] for p in result["points"]] == [1, 2, 3]
    assert (tmp_path / "bench_learning.png").is_file()
