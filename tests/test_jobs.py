"""The jobs end to end on a small synthetic world: pretrain, eval, finetune (few-shot), bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unified_vl.app.jobs import evaluate, finetune, pretrain
from unified_vl.checkpoint import load_pretrained

TINY = (
    "model.overrides={image_size: 32, vision_kwargs: {patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}, "
    "text_config: {d_model: 32, d_kv: 16, d_ff: 64, num_heads: 2, num_layers: 1, num_decoder_layers: 1}}"
)
FAST = [
    TINY,
    "model.tokenizer_vocab_size=null",  # the packaged tokenizer; training one is tested on its own
    "train.max_minutes=null",
    "train.max_steps=3",
    "train.global_batch_size=8",
    "train.micro_batch_size=8",
    "train.num_threads=1",
    "train.local_processes=1",  # the main job's 2 would relaunch under torch.distributed.run
    "optim.warmup_steps=1",
    "checkpoint.every=0",
    "eval.batch_size=32",
]
FIVE = ["captioning", "vqa", "rec", "grounding", "classification"]


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    from data_tools import synth

    out = tmp_path_factory.mktemp("synth") / "data"
    synth.generate(str(out), num_images=24, num_eval_images=4, image_size=32, seed=0, log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def pretrained(synth_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    code = pretrain.main([f"data.path={synth_data}", *FAST, f"output_dir={run_dir}"])
    assert code == 0
    return run_dir


def test_pretrain_evaluates_every_task_and_exports(pretrained, capsys):
    final = json.loads((pretrained / "eval_final.json").read_text())["metrics"]
    import tasks

    for name in FIVE:
        for split in ("test", "heldout"):
            assert f"{name}/{split}/{tasks.get_task(name).primary_metric}" in final
    model, processor = load_pretrained(pretrained / "model")
    assert model.config.image_size == 32 and processor.image_size == 32
    assert (pretrained / "curves.png").is_file() and (pretrained / "example.png").is_file()


def test_pretrain_prints_the_table_and_the_predict_command(synth_data, tmp_path, capsys):
    code = pretrain.main(
        [
            f"data.path={synth_data}",
            *FAST,
            "train.max_steps=1",
            "eval.final_splits=[test]",
            f"output_dir={tmp_path / 'r'}",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "task            metric" in out and "baseline" in out
    for name in FIVE:
        assert f"\n  {name} " in out
    assert f"unified-vl predict --model {tmp_path / 'r' / 'model'} --task vqa --image" in out


def test_eval_cli_writes_metric_keys(pretrained, synth_data, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = evaluate.main(
        [
            "--model",
            str(pretrained / "model"),
            "--data",
            str(synth_data),
            "--task",
            "vqa",
            "rec",
            "--split",
            "test",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert {"vqa/test/accuracy", "rec/test/acc@0.5", "mean/test/primary"} <= set(metrics)
    assert "vqa/test/accuracy" in capsys.readouterr().out


def test_finetune_few_shot_from_the_pretrained_model(pretrained, synth_data, tmp_path):
    run_dir = tmp_path / "ft"
    args = ["--task", "classification", "--data", str(synth_data), "--init", str(pretrained / "model")]
    args += ["--shots", "4", "--seed", "3", *FAST[1:], "eval.every=2", f"output_dir={run_dir}", "train.freeze=[visual]"]
    assert finetune.main(args) == 0
    resolved = (run_dir / "config.yaml").read_text()
    assert "shots: 4" in resolved and "seed: 3" in resolved and "init: " + str(pretrained / "model") in resolved
    index = json.loads((run_dir / "checkpoints" / "index.json").read_text())
    assert index["best"]["metric"] == "classification/val/top1"
    assert "classification/test/top1" in json.loads((run_dir / "eval_final.json").read_text())["metrics"]


# -- bad input: one clear line, before any training --------------------------------------------


def test_data_folder_missing_a_task(synth_data, tmp_path, capsys):
    from data_tools import storage

    partial = tmp_path / "partial"
    records = list(storage.load_split(synth_data, "vqa", "train", decode_images=False))
    storage.write_dataset(
        partial, {("vqa", "train"): ({**r, "image": r["image"]["bytes"]} for r in records)}, source="test", command=""
    )
    code = pretrain.main([f"data.path={partial}", *FAST, "data.tasks={vqa: 1, rec: 1}", f"output_dir={tmp_path / 'x'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "data.tasks names 'rec' but the data folder" in err and "it has: vqa (train)" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["optim.learning_rate=1"], "unknown config key 'optim.learning_rate'"),
        (["train.max_steps=many"], "train.max_steps: expected int, got str 'many'"),
        (
            ["train.global_batch_size=12"],
            "global_batch_size=12 is not divisible by train.micro_batch_size x world size = 8",
        ),
        (["data.tasks={vqa: 1, ocr: 1}"], "unknown task(s) ['ocr']"),
    ],
)
def test_bad_config_is_one_clear_error(args, message, synth_data, tmp_path, capsys):
    assert pretrain.main([f"data.path={synth_data}", *FAST, *args, f"output_dir={tmp_path / 'x'}"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_finetune_from_a_folder_that_is_not_a_model(synth_data, tmp_path, capsys):
    (tmp_path / "notamodel").mkdir()
    args = ["--task", "vqa", "--data", str(synth_data), "--init", str(tmp_path / "notamodel"), *FAST[1:]]
    assert finetune.main([*args, f"output_dir={tmp_path / 'x'}"]) == 1
    assert "is not a model folder: it has no config.json" in capsys.readouterr().err


def test_synthetic_world_and_tokenizer_are_cached(tmp_path):
    from unified_vl.app.jobs.common import prepare_data
    from unified_vl.engine.config import load_config
    from unified_vl.engine.distributed import DistInfo

    overrides = [
        "data.tasks={vqa: 1}",
        "data.synth.num_images=8",
        "data.synth.image_size=32",
        "model.tokenizer_vocab_size=200",
        f"data.cache_dir={tmp_path}",
    ]
    dist = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo")
    first = prepare_data(load_config(None, overrides), dist)
    assert Path(first.data.path).parent == tmp_path and Path(first.data.path).name.startswith("synth-")
    assert (Path(first.model.tokenizer) / "tokenizer.json").is_file()
    stamp = (Path(first.data.path) / "manifest.json").stat().st_mtime_ns
    second = prepare_data(load_config(None, overrides), dist)
    assert (second.data.path, second.model.tokenizer) == (first.data.path, first.model.tokenizer)
    assert (Path(first.data.path) / "manifest.json").stat().st_mtime_ns == stamp  # reused, not regenerated
    other = prepare_data(load_config(None, [*overrides, "data.synth.seed=1"]), dist)
    assert other.data.path != first.data.path


@pytest.mark.slow
def test_deepspeed_launcher_two_processes_match_one(synth_data, tmp_path):
    """`deepspeed --num_gpus 2 scripts/pretrain.py`: sharded evaluation gives one process's metrics."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        f"data.path={synth_data}",
        *FAST,
        "train.micro_batch_size=4",
        "train.zero_stage=2",
        "eval.final_splits=[test]",
    ]
    assert pretrain.main([*args, f"output_dir={tmp_path / 'one'}"]) == 0
    script = Path(__file__).resolve().parents[1] / "scripts" / "pretrain.py"
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(port),
        str(script),
    ]
    subprocess.run([*cmd, *args, f"output_dir={tmp_path / 'two'}"], check=True, timeout=600, cwd=tmp_path)

    def metrics(name):
        return json.loads((tmp_path / name / "eval_final.json").read_text())["metrics"]

    assert metrics("two") == pytest.approx(metrics("one"), abs=1e-6)
    losses = [
        [
            json.loads(line)["train/loss"]
            for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()
            if '"train"' in line
        ]
        for n in ("one", "two")
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_local_processes_rerun_the_job_under_torchrun(monkeypatch):
    import subprocess
    import sys
    from types import SimpleNamespace

    from unified_vl.app.jobs.common import relaunch_locally
    from unified_vl.engine.config import ConfigError, load_config

    calls = []
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(
        subprocess, "run", lambda command, check: calls.append(command) or SimpleNamespace(returncode=3)
    )
    sizes = ["data.tasks={vqa: 1}", "train.global_batch_size=8", "train.micro_batch_size=4"]
    config = load_config(None, ["train.local_processes=2", *sizes])
    assert relaunch_locally(config, "pretrain", ["my.yaml", "optim.lr=1e-3"]) == 3  # the children's status
    assert calls == [
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        + ["-m", "unified_vl.app.cli", "pretrain", "my.yaml", "optim.lr=1e-3"]
    ]
    assert relaunch_locally(load_config(None, sizes), "pretrain", []) is None  # one process: run here
    launcher = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for name, value in launcher.items():
        monkeypatch.setenv(name, value)
    assert relaunch_locally(config, "pretrain", []) is None  # already a launched child: run here
    for name in launcher:
        monkeypatch.delenv(name)
    with pytest.raises(ConfigError, match="not divisible"):  # checked before any process starts
        relaunch_locally(load_config(None, ["train.local_processes=3", *sizes]), "pretrain", [])
    assert len(calls) == 1
