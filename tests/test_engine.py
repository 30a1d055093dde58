"""The DeepSpeed engine on the CPU, for real: ZeRO stages, export, resume, failing saves, bad input.

Records here are tiny in-memory ones (random 32 px images, short targets) so that the engine is
tested on its own; the jobs tests run it on the synthetic world through the task modules.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unified_vl.checkpoint import CheckpointError, load_pretrained
from unified_vl.engine import mixture
from unified_vl.engine.config import ConfigError, load_config
from unified_vl.engine.export import export_checkpoint
from unified_vl.engine.trainer import Example, TrainData, train

# A model small enough that a DeepSpeed step takes milliseconds; dropout on, so that resuming
# must restore the RNG too.
TINY = (
    "model.overrides={image_size: 32, vision_kwargs: {patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}, "
    "text_config: {d_model: 32, d_kv: 16, d_ff: 64, num_heads: 2, num_layers: 1, num_decoder_layers: 1, dropout_rate: 0.1}}"
)
NO_DROPOUT = TINY.replace("dropout_rate: 0.1", "dropout_rate: 0.0")
WORDS = ["red", "blue", "green", "circle", "square", "left", "right"]


def _records(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "word": WORDS[i % len(WORDS)]} for i in range(n)
    ]


DATA = {"colors": _records(24, 0), "shapes": _records(18, 1)}


def make_example(task: str, record: dict, rng: random.Random) -> Example:
    # rng: the target varies with it, so the per-slot seeding is part of what resume must reproduce.
    return Example(record["image"], f"{task}: name it", f"{record['word']} {rng.choice(WORDS)}")


def run(tmp: Path, name: str, *overrides: str, data: TrainData | None = None):
    base = [
        "data.tasks={colors: 1, shapes: 1}",
        TINY,
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.max_steps=6",
        "optim.warmup_steps=2",
        "train.log_every=2",
        "optim.lr=5e-3",
        # One thread: the CPU is shared in CI, and two OpenMP threads contending with another
        # process make a step many times slower.
        "train.num_threads=1",
        f"output_dir={tmp / name}",
    ]
    return train(load_config(None, [*base, *overrides]), data or TrainData(DATA, make_example))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    model, _ = load_pretrained(folder)
    return model.state_dict()


@pytest.fixture(scope="module")
def stage0(tmp_path_factory):
    return run(tmp_path_factory.mktemp("zero"), "stage0", "train.zero_stage=0")


def test_training_lowers_the_loss_and_writes_the_run(stage0):
    assert len(stage0.losses) == 6 and stage0.losses[-1] < stage0.losses[0]
    run_dir = stage0.run_dir
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"
    assert json.loads((run_dir / "ds_config.json").read_text())["gradient_accumulation_steps"] == 2
    assert "gradient_accumulation_steps: 2" in (run_dir / "config.yaml").read_text()  # the derived values
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert {"train/loss", "train/lr", "train/samples_per_s", "train/loss/colors", "train/loss/shapes"} <= set(rows[0])
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_train_alike_and_export(stage, stage0, tmp_path):
    result = run(tmp_path, f"stage{stage}", f"train.zero_stage={stage}")
    np.testing.assert_allclose(result.losses, stage0.losses, rtol=1e-5)
    reference, exported = _weights(stage0.model_dir), _weights(result.model_dir)  # ZeRO-3 shards consolidated
    assert reference.keys() == exported.keys()
    for key in reference:
        torch.testing.assert_close(exported[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)
    # Offline: the saved checkpoint's shards consolidated by zero_to_fp32 give the same weights.
    offline = _weights(export_checkpoint(result.run_dir, tmp_path / "offline", tag="latest"))
    for key in reference:
        torch.testing.assert_close(offline[key], exported[key], msg=key)


def test_resume_after_a_kill_gives_the_same_losses(tmp_path, monkeypatch):
    args = ["train.max_steps=20", "checkpoint.every=10", "checkpoint.export=false"]
    full = run(tmp_path, "full", *args).losses

    real_next_step = mixture.MixtureSampler.next_step

    def killed_at_step_10(self):
        if self.step == 10:
            raise KeyboardInterrupt("killed")  # dies mid-run: no final checkpoint, nothing cleaned up
        return real_next_step(self)

    monkeypatch.setattr(mixture.MixtureSampler, "next_step", killed_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "part", *args)
    monkeypatch.undo()
    assert (tmp_path / "part" / "checkpoints" / "latest").read_text() == "step_00000010"
    resumed = run(tmp_path, "part", *args, "resume=true").losses
    assert len(resumed) == 10
    np.testing.assert_allclose(resumed, full[10:], rtol=0, atol=1e-6)


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def disk_full_on_the_second_checkpoint(obj, f, *args, **kwargs):
        if "step_00000004" in str(f):
            calls["n"] += 1
            Path(f).write_bytes(b"half a checkpoint")  # a partial file, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_on_the_second_checkpoint)
    with pytest.raises(CheckpointError, match=r"disk is full.*'step_00000002' is intact"):
        run(tmp_path, "full_disk", "checkpoint.every=2", "train.max_steps=6")
    assert calls["n"] == 1
    checkpoints = tmp_path / "full_disk" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000002"
    assert not (checkpoints / "step_00000004").exists()
    monkeypatch.undo()
    resumed = run(tmp_path, "full_disk", "checkpoint.every=2", "train.max_steps=6", "resume=true")
    assert resumed.steps == 6 and len(resumed.losses) == 4


def test_keeps_the_last_k_and_the_best(tmp_path):
    class Evaluator:  # a fake metric that peaks at step 2
        def generate(self, model, processor, *, split, max_examples, rank, world_size):
            return {}

        def score(self, texts, *, split, max_examples):
            self.calls = getattr(self, "calls", 0) + 1
            return {f"colors/{split}/acc": [0.2, 0.9, 0.5, 0.4, 0.3, 0.1][self.calls - 1]}

    config = load_config(
        None,
        [
            "data.tasks={colors: 1}",
            TINY,
            "train.global_batch_size=4",
            "train.micro_batch_size=4",
            "train.max_steps=6",
            "eval.every=1",
            "eval.final_splits=[]",
            "checkpoint.every=1",
            "checkpoint.keep_last=2",
            "checkpoint.best_metric=colors/val/acc",
            f"output_dir={tmp_path / 'best'}",
        ],
    )
    train(config, TrainData(DATA, make_example), evaluator=Evaluator())
    checkpoints = tmp_path / "best" / "checkpoints"
    kept = sorted(p.name for p in checkpoints.iterdir() if p.is_dir())
    assert kept == ["step_00000002", "step_00000005", "step_00000006"]
    assert json.loads((checkpoints / "index.json").read_text())["best"] == {
        "tag": "step_00000002",
        "metric": "colors/val/acc",
        "value": 0.9,
    }
    # The best checkpoint is exported next to the final model.
    best, last = _weights(tmp_path / "best" / "model-best"), _weights(tmp_path / "best" / "model")
    assert not torch.equal(best["type_embed"], last["type_embed"])
    with pytest.raises(CheckpointError, match="has no checkpoint 'step_00000001'; it has: step_00000002"):
        export_checkpoint(tmp_path / "best", tmp_path / "x", tag="step_00000001")


class _PeakingEvaluator:
    """A fake validation metric that peaks at the third validation; remembers the weights each split saw."""

    VALUES = [0.2, 0.5, 0.9, 0.4, 0.3, 0.1]

    def __init__(self):
        self.seen: list[tuple[str, dict[str, torch.Tensor]]] = []

    def generate(self, model, processor, *, split, max_examples, rank, world_size, **keep):
        self.seen.append((split, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return {}

    def score(self, texts, *, split, max_examples, **written):
        if split == "test":
            return {"colors/test/acc": 0.0}
        return {"colors/val/acc": self.VALUES[sum(s == "val" for s, _ in self.seen) - 1]}


def test_final_weights_best_evaluates_and_exports_the_best_validations_weights(tmp_path, monkeypatch, capsys):
    args = [
        "data.tasks={colors: 1}",
        TINY,
        "train.global_batch_size=4",
        "train.micro_batch_size=4",
        "train.max_steps=6",
        "train.num_threads=1",
        "eval.every=1",
        "eval.final_splits=[test]",
        "eval.final_weights=best",
        "checkpoint.every=2",
        "checkpoint.best_metric=colors/val/acc",
    ]

    def fit(name: str, evaluator, *more: str):
        config = load_config(None, [*args, f"output_dir={tmp_path / name}", *more])
        return train(config, TrainData(DATA, make_example), evaluator=evaluator)

    evaluator = _PeakingEvaluator()
    result = fit("full", evaluator)
    splits = [split for split, _ in evaluator.seen]
    assert splits == ["val"] * 6 + ["test"]  # steps 1-5, the last step, then the final evaluation
    third, last, tested = evaluator.seen[2][1], evaluator.seen[5][1], evaluator.seen[6][1]
    exported = _weights(result.model_dir)
    moved = 0
    for key, value in third.items():
        torch.testing.assert_close(tested[key], value, rtol=0, atol=0, msg=key)  # test saw step 3's weights
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0, msg=key)  # and so does the model folder
        moved += not torch.equal(value, last[key])
    assert moved > 10  # step 3's weights are not the last step's
    assert "use the weights of step 3 (colors/val/acc = 0.9000, best of 6)" in capsys.readouterr().out
    # The last checkpoint holds the last step's weights (to go on training), not the best.
    at_6 = _weights(export_checkpoint(result.run_dir, tmp_path / "raw6", tag="step_00000006"))
    assert all(torch.equal(at_6[key], last[key]) for key in last)

    # Killed after the checkpoint of step 4 and resumed: the best (step 3) is carried by the checkpoint.
    real_next_step = mixture.MixtureSampler.next_step

    def killed_at_step_4(self):
        if self.step == 4:
            raise KeyboardInterrupt("killed")
        return real_next_step(self)

    evaluator = _PeakingEvaluator()
    monkeypatch.setattr(mixture.MixtureSampler, "next_step", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        fit("part", evaluator)
    monkeypatch.undo()
    resumed = fit("part", evaluator, "resume=true")
    assert [split for split, _ in evaluator.seen] == ["val"] * 6 + ["test"]
    again = _weights(resumed.model_dir)
    for key, value in exported.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=1e-6, msg=key)

    class Elsewhere(_PeakingEvaluator):
        def score(self, texts, *, split, max_examples, **written):
            return {f"shapes/{split}/acc": 0.5}

    with pytest.raises(
        ValueError, match=r"compares 'colors/val/acc', which the validation did not report .*shapes/val"
    ):
        fit("other", Elsewhere())


def test_final_weights_best_needs_validations_and_is_alone_in_choosing(tmp_path):
    base = ["data.tasks={colors: 1}", "eval.final_weights=best"]
    with pytest.raises(ConfigError, match=r"set eval.every > 0 and eval.splits \(now every=0"):
        load_config(None, base)
    with pytest.raises(ConfigError, match="eval.final_weights=best and train.ema_decay both choose"):
        load_config(None, [*base, "eval.every=5", "train.ema_decay=0.9"])
    with pytest.raises(ConfigError, match="ZeRO-3 shards them"):
        load_config(None, [*base, "eval.every=5", "train.zero_stage=3"])
    with pytest.raises(ConfigError, match="expected one of 'last', 'best'"):
        load_config(None, ["data.tasks={colors: 1}", "eval.final_weights=first"])
    with pytest.raises(ConfigError, match="this run has no evaluator"):
        run(tmp_path, "no-eval", "eval.final_weights=best", "eval.every=2")


def test_freeze_and_few_shot(tmp_path):
    seen = set()

    def recording(task, record, rng):
        seen.add((task, record["word"], int(record["image"].sum())))
        return make_example(task, record, rng)

    result = run(
        tmp_path,
        "frozen",
        "train.freeze=[visual]",
        "data.shots=3",
        "train.max_steps=4",
        data=TrainData(DATA, recording),
    )
    assert len(seen) == 6  # 3 shots of each task, nothing else
    from unified_vl.engine.trainer import build_model_and_processor

    torch.manual_seed(0)
    initial, _ = build_model_and_processor(load_config(None, ["data.tasks={colors: 1}", TINY]))
    trained = _weights(result.model_dir)
    for key, value in initial.state_dict().items():
        if key.startswith("visual."):
            torch.testing.assert_close(trained[key], value, msg=key)
    assert not torch.equal(trained["type_embed"], initial.state_dict()["type_embed"])


def test_bf16_on_cpu_trains_and_exports_float32(tmp_path):
    result = run(tmp_path, "bf16", "train.precision=bf16", "train.zero_stage=2", "train.max_steps=2")
    assert all(np.isfinite(result.losses))
    assert all(v.dtype == torch.float32 for v in _weights(result.model_dir).values())


@pytest.mark.parametrize("extra", [[], ["train.ema_decay=0.9"]], ids=["weights", "float32-average-of-bf16"])
def test_bf16_on_cpu_trains_a_batch_norm_stem(tmp_path, extra):
    # DeepSpeed casts parameters to bf16 but not buffers; BatchNorm needs both in one dtype.
    result = run(
        tmp_path, "bf16bn", "train.precision=bf16", "model.overrides.vision_stem=conv-deep", "train.max_steps=2", *extra
    )
    assert all(np.isfinite(result.losses))
    weights = _weights(result.model_dir)
    stats = [v for k, v in weights.items() if k.endswith("running_var")]
    assert len(stats) == 5  # 8-pixel patches: three strided conv-BN-ReLU blocks and two stride-1 ones
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    assert any(not torch.allclose(v, torch.ones_like(v)) for v in stats)  # training moved the statistics


# -- bad input: a clear error before any training ---------------------------------------------


def test_weight_average_is_a_plain_average_until_its_cap():
    from unified_vl.engine.averaging import WeightAverage

    layer = torch.nn.Linear(1, 1, bias=False)
    average = WeightAverage(layer, decay=0.6)
    assert [average.decay_at(t) for t in (1, 2, 3)] == [0.0, 0.5, 0.6]  # min(cap, (t - 1) / t)
    for step, value in enumerate((4.0, 2.0, 9.0), start=1):
        with torch.no_grad():
            layer.weight.fill_(value)
        average.update(layer, step)
        if step == 2:
            torch.testing.assert_close(average.state_dict()["weight"], torch.tensor([[3.0]]))  # (4 + 2) / 2
    # then exponential: 0.6 * 3 + 0.4 * 9; the layer itself is untouched until copy_to
    torch.testing.assert_close(average.state_dict()["weight"], torch.tensor([[5.4]]))
    assert layer.weight.item() == 9.0
    average.copy_to(layer)
    assert layer.weight.item() == pytest.approx(5.4)


def test_ema_exports_the_average_of_the_steps_weights_and_resumes_with_it(tmp_path, monkeypatch):
    args = ["train.max_steps=2", "checkpoint.every=1", "checkpoint.keep_last=3", "train.ema_decay=0.9"]
    result = run(tmp_path, "ema", *args)
    # the raw weights after steps 1 and 2 (the checkpoints) against the exported model: their mean
    raw = [_weights(export_checkpoint(result.run_dir, tmp_path / f"raw{s}", tag=f"step_0000000{s}")) for s in (1, 2)]
    exported = _weights(result.model_dir)
    moved = 0
    for key, value in exported.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (raw[0][key] + raw[1][key]) / 2, msg=key)
            moved += not torch.equal(raw[0][key], raw[1][key])
    assert moved > 10  # the steps changed the weights, so the mean is neither of them

    # A run killed after its checkpoint at step 10 and resumed exports what the whole run does.
    args = ["train.max_steps=12", "checkpoint.every=10", "train.ema_decay=0.8"]
    full = run(tmp_path, "full", *args)
    real_next_step = mixture.MixtureSampler.next_step

    def killed_at_step_10(self):
        if self.step == 10:
            raise KeyboardInterrupt("killed")
        return real_next_step(self)

    monkeypatch.setattr(mixture.MixtureSampler, "next_step", killed_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "part", *args)
    monkeypatch.undo()
    resumed = run(tmp_path, "part", *args, "resume=true")
    reference, again = _weights(full.model_dir), _weights(resumed.model_dir)
    for key in reference:
        torch.testing.assert_close(again[key], reference[key], rtol=0, atol=1e-6, msg=key)
    # A checkpoint without an average cannot resume a run that keeps one.
    run(tmp_path, "plain", "train.max_steps=1", "checkpoint.export=false")
    with pytest.raises(CheckpointError, match="holds no weight average .* resume it without train.ema_decay"):
        run(tmp_path, "plain", "train.max_steps=2", "train.ema_decay=0.8", "resume=true")


def test_global_batch_not_divisible_fails_before_anything(tmp_path):
    with pytest.raises(ConfigError, match="global_batch_size=10 is not divisible"):
        run(tmp_path, "bad", "train.global_batch_size=10")
    with pytest.raises(
        ConfigError, match=r"data.shots=20 but these tasks have fewer training examples: \{'shapes': 18\}"
    ):
        run(tmp_path, "bad", "data.shots=20")
    assert not (tmp_path / "bad").exists()


def test_fp16_on_cpu_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 runs on a GPU")
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        run(tmp_path, "fp16", "train.precision=fp16")


@pytest.mark.parametrize(
    ("field", "value", "default"), [("vision_pooled_token", True, False), ("relation_tokens", 2, 0)]
)
def test_a_checkpoint_from_before_a_field_resumes_as_the_fields_default(tmp_path, field, value, default):
    from unified_vl.config import UnifiedVLConfig
    from unified_vl.engine.trainer import architecture, check_architecture

    plain, other = UnifiedVLConfig.from_preset("uvl-tiny"), UnifiedVLConfig.from_preset("uvl-tiny", **{field: value})
    older = {k: v for k, v in architecture(plain).items() if k != field}  # saved before the field
    check_architecture(older, plain, tmp_path)  # no error: it had the default
    with pytest.raises(CheckpointError, match=f"{field}: checkpoint {default} vs now {value}"):
        check_architecture(older, other, tmp_path)


def test_checkpoint_of_another_architecture(stage0, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(stage0.run_dir, copy)
    other = TINY.replace("d_model: 32", "d_model: 48")
    with pytest.raises(CheckpointError, match=r"(?s)another architecture.*d_model: checkpoint 32 vs now 48"):
        train(
            load_config(
                None,
                [
                    "data.tasks={colors: 1, shapes: 1}",
                    other,
                    "train.global_batch_size=8",
                    "train.micro_batch_size=4",
                    f"output_dir={copy}",
                    "resume=true",
                ],
            ),
            TrainData(DATA, make_example),
        )
    foreign = tmp_path / "t5"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "t5"}))
    config = load_config(None, ["data.tasks={colors: 1}", f"model.init={foreign}", f"output_dir={tmp_path / 'init'}"])
    with pytest.raises(CheckpointError, match="holds a 't5' model"):
        train(config, TrainData(DATA, make_example))


def test_existing_run_needs_resume_and_freeze_must_match(stage0, tmp_path):
    with pytest.raises(CheckpointError, match="already holds a run's checkpoints; pass --resume"):
        train(
            load_config(None, ["data.tasks={colors: 1}", TINY, f"output_dir={stage0.run_dir}"]),
            TrainData(DATA, make_example),
        )
    with pytest.raises(ConfigError, match="train.freeze: 'vision' matches no parameter"):
        run(tmp_path, "freeze", "train.freeze=[vision]")
    with pytest.raises(ConfigError, match=r"names \['missing'\] but no training records"):
        run(tmp_path, "missing", "data.tasks={colors: 1, missing: 1}")


# -- several processes ---------------------------------------------------------------------------

TWO_PROCESS_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import torch.distributed as dist
from test_engine import run
from test_engine import NO_DROPOUT
result = run(Path({tmp!r}), "two", "train.max_steps=4", NO_DROPOUT)
if dist.get_rank() == 0:
    Path({out!r}).write_text(json.dumps(result.losses))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, stage0):
    script = tmp_path / "two.py"
    out = tmp_path / "losses.json"
    script.write_text(TWO_PROCESS_SCRIPT.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), out=str(out)))
    one = run(tmp_path, "one", "train.max_steps=4", NO_DROPOUT).losses
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(script)]
    subprocess.run(cmd, check=True, timeout=600, cwd=tmp_path)
    # Dropout off: each rank has its own dropout stream. 1 process: micro batches of 4 with 2 accumulation steps; 2 processes: one each, same examples.
    np.testing.assert_allclose(json.loads(out.read_text()), one, rtol=1e-5)


def _average_batch_norm_on_rank(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from unified_vl.engine.distributed import average_batch_norm_statistics

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # the convolution's weights differ between the ranks
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    model[1].running_mean.copy_(torch.tensor([1.0, -2.0]) * (rank + 1))
    model[1].running_var.fill_(2.0 * (rank + 1))
    conv = model[0].weight.detach().clone()
    average_batch_norm_statistics(model)
    torch.save(
        {"mean": model[1].running_mean, "var": model[1].running_var, "conv_kept": torch.equal(conv, model[0].weight)},
        f"{out}.{rank}",
    )
    dist.destroy_process_group()


@pytest.mark.slow  # two processes importing the package: about 20 s
def test_batch_norm_statistics_are_averaged_over_the_ranks_and_nothing_else(tmp_path):
    torch.multiprocessing.spawn(
        _average_batch_norm_on_rank, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True
    )
    for rank in (0, 1):
        got = torch.load(tmp_path / f"out.{rank}")
        torch.testing.assert_close(got["mean"], torch.tensor([1.5, -3.0]))  # ([1, -2] + [2, -4]) / 2
        torch.testing.assert_close(got["var"], torch.tensor([3.0, 3.0]))
        assert got["conv_kept"]  # the weights are DeepSpeed's to keep in step, not averaged here
    # One process (no process group): nothing to average, nothing changes.
    model = torch.nn.BatchNorm1d(2)
    model.running_mean.fill_(5.0)
    from unified_vl.engine.distributed import average_batch_norm_statistics

    average_batch_norm_statistics(model)
    assert model.running_mean.tolist() == [5.0, 5.0]


BATCH_NORM_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import torch.distributed as dist
from unified_vl.engine.config import load_config
from unified_vl.engine.trainer import TrainData, train
from test_engine import DATA, TINY, _BatchNormRecorder, make_example
recorder = _BatchNormRecorder()
args = ["data.tasks={{colors: 1}}", TINY, "model.overrides.vision_stem=conv", "train.global_batch_size=8",
        "train.micro_batch_size=4", "train.max_steps=4", "train.num_threads=1", "eval.every=2",
        "eval.final_splits=[test]", "output_dir={tmp}/bn"]
result = train(load_config(None, args), TrainData(DATA, make_example), evaluator=recorder)
Path("{tmp}/seen.{{}}.json".format(dist.get_rank())).write_text(json.dumps(recorder.seen))
"""


class _BatchNormRecorder:
    """Remembers BatchNorm's running statistics in the model each evaluation of this rank ran with."""

    def __init__(self):
        self.seen: list[dict[str, list[float]]] = []

    def generate(self, model, processor, *, split, max_examples, rank, world_size, **keep):
        self.seen.append(
            {k: v.tolist() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}
        )
        return {}

    def score(self, texts, *, split, max_examples, **written):
        return {f"colors/{split}/acc": 0.0}


@pytest.mark.slow
def test_every_rank_evaluates_and_rank_0_exports_the_same_batch_norm_statistics(tmp_path):
    # Each rank's BatchNorm layers keep running statistics of that rank's micro batches (DeepSpeed syncs
    # gradients, not buffers): without averaging them, rank 1 would score its share of a split with
    # another model than the one rank 0 exports.
    script = tmp_path / "bn.py"
    script.write_text(BATCH_NORM_SCRIPT.format(tests=str(Path(__file__).parent), tmp=str(tmp_path)))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        str(script),
    ]
    subprocess.run(cmd, check=True, timeout=600, cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"seen.{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # steps 2 and 4, then the final evaluation
    assert len(ranks[0][0]) >= 2  # the conv stem's BatchNorm layers
    assert any(np.any(np.asarray(v) != 0) for k, v in ranks[0][0].items() if k.endswith("mean"))  # they moved
    for at_0, at_1 in zip(*ranks, strict=True):
        for key, value in at_0.items():
            np.testing.assert_allclose(at_1[key], value, rtol=1e-6, err_msg=key)
    exported = _weights(tmp_path / "bn" / "model")
    for key, value in ranks[0][-1].items():
        np.testing.assert_allclose(exported[key].numpy(), value, rtol=1e-6, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["train.zero_stage=2"], ["train.zero_stage=3", "train.offload_params=true"]])
def test_zero_offload_trains_and_exports(extra, tmp_path):
    # DeepSpeedCPUAdam is JIT-built on its first use (about two minutes, then cached).
    result = run(tmp_path, "offload", *extra, "train.offload_optimizer=true", "train.max_steps=3")
    assert result.losses[-1] < result.losses[0]
    assert _weights(result.model_dir)["type_embed"].shape[0] == 2


def test_sample_mean_loss_weighs_examples_not_tokens(tmp_path):
    def long_and_short(task, record, rng):  # targets of 1 to 7 words: the two means differ
        return Example(record["image"], f"{task}: name it", " ".join([record["word"]] * (1 + len(record["word"]) % 7)))

    data = TrainData(DATA, long_and_short)
    token = run(tmp_path, "token", "checkpoint.export=false", "train.max_steps=3", data=data).losses
    sample = run(
        tmp_path, "sample", "train.loss_reduction=sample", "checkpoint.export=false", "train.max_steps=3", data=data
    )
    assert all(np.isfinite(sample.losses)) and sample.losses != pytest.approx(token, rel=1e-4)


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_engine import run
resume = ["resume=true"] if Path({latest!r}).exists() else []
run(Path({tmp!r}), "killed", "train.max_steps=100000", "checkpoint.every=1", "checkpoint.keep_last=1", *resume)
"""


CHECKPOINT_WAIT_S = 120  # a step of TINY takes milliseconds; the first one waits for imports and DeepSpeed


def _wait_for_new_checkpoint(proc: subprocess.Popen, latest: Path, before: str, log: Path) -> None:
    """Returns once ``latest`` names a checkpoint other than ``before``; fails at once if the process ends."""
    import time

    deadline = time.monotonic() + CHECKPOINT_WAIT_S
    while not latest.exists() or latest.read_text() == before:
        if proc.poll() is not None:
            pytest.fail(
                f"the training process exited with {proc.returncode} before a new checkpoint:\n{log.read_text()}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"no new checkpoint within {CHECKPOINT_WAIT_S} s; the process wrote:\n{log.read_text()}")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(tmp_path):
    import os
    import signal
    import time

    latest = tmp_path / "killed" / "checkpoints" / "latest"
    script = tmp_path / "killed.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), latest=str(latest)))
    rng = random.Random(0)
    for attempt in range(3):  # killed three times at random moments; a checkpoint is being written most of the time
        before = latest.read_text() if latest.exists() else ""
        log = tmp_path / f"killed-{attempt}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, str(script)], stdout=out, stderr=subprocess.STDOUT)
        _wait_for_new_checkpoint(proc, latest, before, log)
        time.sleep(rng.uniform(0.0, 1.0))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    step = int(latest.read_text().split("_")[1])
    result = run(tmp_path, "killed", f"train.max_steps={step + 2}", "resume=true")
    assert result.steps == step + 2 and len(result.losses) == 2


def test_export_command(stage0, tmp_path, capsys):
    from unified_vl.engine.export import main

    assert main([str(stage0.run_dir), "--out", str(tmp_path / "m")]) == 0
    assert _weights(tmp_path / "m").keys() == _weights(stage0.model_dir).keys()
    assert main([str(stage0.run_dir), "--tag", "best", "--out", str(tmp_path / "b")]) == 1
    assert "has no best checkpoint" in capsys.readouterr().err


def test_location_smoothing_trains_on_box_targets(tmp_path):
    def box(task, record, rng):
        a, b = sorted(rng.sample(range(1000), 2))
        return Example(record["image"], f"{task}: where is it?", f"<loc_{a}><loc_{a}><loc_{b}><loc_{b}>")

    result = run(
        tmp_path, "loc", "train.loc_sigma=10", "train.max_steps=2", "checkpoint.export=false", data=TrainData(DATA, box)
    )
    # At initialisation the soft targets cost more than the entropy of a Gaussian of 10 bins.
    assert all(np.isfinite(result.losses)) and result.losses[0] > 0.5 * np.log(2 * np.pi * np.e * 10**2)


def test_a_run_leaves_no_launcher_variables_for_child_processes(stage0):
    import os

    # stage0 trained in this process; a process started now must not inherit a MASTER_PORT this one holds.
    assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} & set(os.environ)


def test_incomplete_launcher_variables_are_refused(monkeypatch):
    from unified_vl.engine.distributed import DistributedSetupError, launched

    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedSetupError, match="^WORLD_SIZE are set but RANK, MASTER_ADDR, MASTER_PORT are not"):
        launched()


def test_inherited_launcher_variables_of_another_job_give_a_clear_error(tmp_path):
    # A job started from a shell that carries another job's launcher variables (its MASTER_PORT busy).
    import os

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        env = {
            **os.environ,
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(held.getsockname()[1]),
        }
        code = "from unified_vl.engine.distributed import init_distributed; init_distributed()"
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "DistributedSetupError: could not join the process group" in proc.stderr
    assert f"MASTER_PORT={env['MASTER_PORT']}" in proc.stderr and "unset RANK WORLD_SIZE" in proc.stderr


def test_progress_bar_updates_a_few_times_a_minute_in_a_log_file(tmp_path):
    import io

    from unified_vl.engine.monitor import LOG_INTERVAL_S, progress_interval

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert progress_interval(Terminal()) == 0.1
    assert progress_interval(io.StringIO()) == LOG_INTERVAL_S >= 10
    from unified_vl.engine.monitor import Monitor

    log = tmp_path / "stderr.log"
    with open(log, "w") as stream, pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stderr", stream)
        monitor = Monitor(tmp_path, enabled=True, total_steps=500)
        for step in range(1, 501):
            monitor.step(step, {"train/loss": 1.0, "train/lr": 1e-3, "train/samples_per_s": 100.0}, log=step % 10 == 0)
        monitor.close()
    updates = log.read_text().replace("\r", "\n").strip().splitlines()
    assert 1 <= len(updates) <= 4, updates  # the first and last state, not one line per step
