"""The run config (layers, errors, derived values) and the mixture sampler; no DeepSpeed run here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from unified_vl.engine.config import ConfigError, RunConfig, deepspeed_config, derive, dump_yaml, load_config
from unified_vl.engine.mixture import MixtureSampler, few_shot_indices, mixture_probabilities, shard

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["data.tasks={vqa: 1}"]


def test_layers_and_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": "1e-3"}, "data": {"tasks": {"vqa": 1, "rec": 2}}}))
    config = load_config(
        path,
        [
            "optim.lr=3e-4",
            "data.tasks.rec=5",
            "model.overrides.text_config.d_model=64",
            "train.freeze=visual,type_embed",
        ],
        defaults={"train": {"max_steps": 7}},
    )
    assert config.optim.lr == 3e-4  # the command line wins over the file ...
    assert config.data.tasks == {"vqa": 1.0, "rec": 5.0}
    assert config.train.max_steps == 7  # ... and the file leaves the job defaults it does not name
    assert config.model.overrides == {"text_config": {"d_model": 64}}
    assert config.train.freeze == ["visual", "type_embed"]
    # The saved resolved config loads back to the same thing.
    again = tmp_path / "resolved.yaml"
    again.write_text(dump_yaml(config))
    assert load_config(again) == config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["optim.lrr=1"], "allowed there: lr, weight_decay"),
        (["trian.max_steps=1"], "unknown config key 'trian'"),
        (["optim.lr=fast"], "optim.lr: expected float, got str 'fast'"),
        (["train.max_steps=1.5"], "train.max_steps: expected int"),
        (["train.zero_stage=4"], "expected one of 0, 1, 2, 3"),
        (["train.precision=fp8"], "expected one of 'fp32', 'bf16', 'fp16'"),
        (["train.offload_params=true"], "needs train.zero_stage=3"),
        (
            ["model.overrides.depth=3"],
            "model.overrides: unknown field 'depth'; allowed: image_position_std, image_size",
        ),
        (["model.overrides.text_config.layers=3"], "unknown T5Config field 'layers'"),
        (["model.init=/x", "model.preset=uvl-tiny"], "model.init fixes the architecture"),
        (["model.preset=uvl-huge"], "unknown preset 'uvl-huge'; known: uvl-tiny"),
        (["optim.lr"], "is not KEY=VALUE"),
        (["optim.lr.x=1"], "optim.lr is a float, it has no sub-keys"),
        (["checkpoint.best_metric=accuracy"], "must be a metric key 'task/split/metric'"),
        (["optim.lr_scale={visual: 0}"], "optim.lr_scale['visual'] must be a number > 0, got 0"),
        (["optim.lr_scale={visual: fast}"], "optim.lr_scale.visual: expected float"),
        (["train.label_smoothing=1.0"], "train.label_smoothing must be a number in [0, 1), got 1.0"),
        (["train.label_smoothing=-0.1"], "train.label_smoothing must be a number in [0, 1), got -0.1"),
        (["train.ema_decay=1.0"], "train.ema_decay must be a number in [0, 1), got 1.0"),
        (["train.answer_weight=0"], "train.answer_weight must be a number in (0, 100], got 0"),
        (["train.ema_decay=0.99", "train.zero_stage=3"], "train.ema_decay needs whole weights on every rank"),
    ],
)
def test_bad_keys_and_types_say_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, [*TASKS, *overrides])
    assert message in str(info.value)


def test_wrong_type_in_a_file_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  global_batch_size: lots\n")
    with pytest.raises(ConfigError, match="train.global_batch_size: expected int, got str 'lots'"):
        load_config(path, TASKS)
    path.write_text("train:\n  batch: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.batch'"):
        load_config(path, TASKS)


def test_no_tasks_is_an_error():
    with pytest.raises(ConfigError, match="data.tasks is empty"):
        load_config(None, [])


def test_gradient_accumulation_is_derived_and_checked():
    config = load_config(None, [*TASKS, "train.global_batch_size=64", "train.micro_batch_size=8"])
    assert derive(config, 1).gradient_accumulation_steps == 8
    assert derive(config, 4).gradient_accumulation_steps == 2
    ds = deepspeed_config(config, derive(config, 4))
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        64,
        8,
        2,
    )
    with pytest.raises(
        ConfigError, match=r"global_batch_size=64 is not divisible by .* 8 x 3 = 24; use a multiple of 24"
    ):
        derive(config, 3)


def test_deepspeed_config_follows_precision_zero_and_clipping():
    config = load_config(
        None,
        [*TASKS, "train.zero_stage=3", "train.offload_optimizer=true", "train.precision=bf16", "optim.grad_clip=0"],
    )
    ds = deepspeed_config(config, derive(config, 1))
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert "gradient_clipping" not in ds


def test_zero3_buffers_scale_with_the_model_and_zero_options_come_last():
    config = load_config(None, [*TASKS, "train.zero_stage=3", "train.zero_options.stage3_max_reuse_distance=1000"])
    zero = deepspeed_config(config, derive(config, 1), hidden_size=512)["zero_optimization"]
    # memory first, sized to d = 512: nothing near DeepSpeed's 1e9 / 5e8 defaults
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 512 * 512
    assert zero["stage3_max_live_parameters"] == zero["sub_group_size"] == 20 * 512 * 512
    assert zero["stage3_param_persistence_threshold"] == 5120
    assert zero["stage3_max_reuse_distance"] == 1000  # the user's value wins
    stage2 = load_config(None, [*TASKS, "train.zero_stage=2"])
    assert set(deepspeed_config(stage2, derive(stage2, 1), hidden_size=512)["zero_optimization"]) == {"stage"}


def test_unknown_or_mistyped_zero_options_are_config_errors():
    with pytest.raises(ConfigError, match=r"train.zero_options.stage3_max_live_parameterz: Extra inputs"):
        load_config(None, [*TASKS, "train.zero_stage=3", "train.zero_options.stage3_max_live_parameterz=5"])
    with pytest.raises(ConfigError, match=r"train.zero_options.sub_group_size: .*integer"):
        load_config(None, [*TASKS, "train.zero_stage=3", "train.zero_options.sub_group_size=lots"])


def test_every_config_file_loads_and_starts_with_its_command():
    files = sorted((ROOT / "scripts" / "configs").glob("*.yaml"))
    assert files
    for path in files:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and ("unified-vl" in first or "scripts/" in first), path.name
        assert "expect" in path.read_text().lower(), f"{path.name} should say what it reaches"
        if "scripts/bench_" in first:
            continue  # a benchmark's own settings, not a run config: tests/test_adapters.py loads them
        assert isinstance(load_config(path, [] if "tasks" in path.read_text() else TASKS), RunConfig)


def test_main_job_file_equals_the_builtin_main_job():
    from unified_vl.app.jobs.pretrain import MAIN_JOB

    assert load_config(ROOT / "scripts" / "configs" / "pretrain_tiny.yaml") == load_config(None, defaults=MAIN_JOB)


# -- the mixture -------------------------------------------------------------------------------


def test_mixture_weightings():
    sizes = {"a": 100, "b": 400}
    assert mixture_probabilities(sizes, {"a": 3, "b": 1}, weighting="explicit") == {"a": 0.75, "b": 0.25}
    assert mixture_probabilities(sizes, {"a": 1, "b": 1}, weighting="size") == {"a": 0.2, "b": 0.8}
    temp = mixture_probabilities(sizes, {"a": 1, "b": 1}, weighting="temperature", temperature=2.0)
    assert temp["a"] == pytest.approx(10 / 30) and temp["b"] == pytest.approx(20 / 30)


def _sampler(**kw):
    sizes = kw.pop("sizes", {"a": 7, "b": 5})
    return MixtureSampler(sizes, {"a": 0.5, "b": 0.5}, seed=kw.pop("seed", 3), global_batch_size=8)


def test_sampler_is_deterministic_and_covers_epochs():
    one, two = _sampler(), _sampler()
    steps = [one.next_step() for _ in range(20)]
    assert steps == [two.next_step() for _ in range(20)]
    assert steps != [_sampler(seed=4).next_step() for _ in range(20)]
    drawn = [x for s in steps for x in s]
    # Each task walks through permutations: its first len(task) draws are every example once.
    first_a = [i for t, i in drawn if t == "a"][:7]
    assert sorted(first_a) == list(range(7))


def test_sampler_resumes_mid_epoch():
    full = _sampler()
    reference = [full.next_step() for _ in range(9)]
    part = _sampler()
    for _ in range(5):
        part.next_step()
    state = part.state_dict()
    resumed = _sampler()
    resumed.load_state_dict(state)
    assert [resumed.next_step() for _ in range(4)] == reference[5:]
    replayed = _sampler()
    replayed.fast_forward(5)  # the pure-function definition agrees with the saved position
    assert replayed.state_dict() == state
    with pytest.raises(ValueError, match="seed"):
        _sampler(seed=9).load_state_dict(state)


def test_shards_do_not_overlap_and_match_one_process():
    step = list(range(16))
    ranks = [shard(step, rank=r, world_size=2, micro_batch_size=4) for r in range(2)]
    assert ranks == [[[0, 1, 2, 3], [8, 9, 10, 11]], [[4, 5, 6, 7], [12, 13, 14, 15]]]
    one = shard(step, rank=0, world_size=1, micro_batch_size=4)
    # The micro batches of one process are those of the ranks, interleaved.
    assert sorted(map(tuple, one)) == sorted(tuple(m) for r in ranks for m in r)


def test_few_shot_is_reproducible():
    a = few_shot_indices(100, 8, seed=1, task="vqa")
    assert a == few_shot_indices(100, 8, seed=1, task="vqa") and len(set(a)) == 8
    assert a != few_shot_indices(100, 8, seed=2, task="vqa") and a != few_shot_indices(100, 8, seed=1, task="rec")
    with pytest.raises(ValueError, match="vqa: asked for 8 shots but the training split has only 5"):
        few_shot_indices(5, 8, seed=1, task="vqa")
    assert np.all(np.diff(a) > 0)


def test_time_budget_fits_the_schedule_to_the_measured_speed():
    from unified_vl.engine.trainer import TimeBudget

    budget = TimeBudget(100 / 60, max_steps=1000, skip=5, window=20)  # 100 s
    horizons = {}
    for step in range(1, 61):
        seconds = step * 1.0 if step <= 25 else 25 + (step - 25) * 2.0  # 1 s/step, then 2 s/step
        horizon = budget.update(step, step, seconds)
        if horizon is not None:
            horizons[step] = horizon
    assert horizons[25] == 100  # 25 s spent, 75 s left at 1 s/step
    assert horizons[45] == 45 + int((100 - 65) / 1.5)  # re-measured: 1.5 s/step on average since step 5
    capped = TimeBudget(100, max_steps=30, skip=1, window=1)
    assert capped.update(1, 1, 1.0) is None and capped.update(2, 2, 2.0) == 30  # never beyond max_steps


def test_location_label_smoothing():
    import torch
    import torch.nn.functional as F

    from unified_vl.engine.trainer import token_losses

    torch.manual_seed(0)
    vocab, loc_ids = 30, torch.arange(10, 30)  # 20 location bins at ids 10..29
    logits = torch.randn(2, 4, vocab)
    labels = torch.tensor([[3, 15, 22, 1], [5, 1, -100, -100]])
    plain, count = token_losses(logits, labels)
    reference = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none").sum(1)
    torch.testing.assert_close(plain, reference)
    assert count.tolist() == [4, 2]
    # A tiny sigma is one-hot again; the second row has no location token and never changes.
    sharp, _ = token_losses(logits, labels, loc_ids=loc_ids, loc_sigma=1e-3)
    torch.testing.assert_close(sharp, reference)
    wide, _ = token_losses(logits, labels, loc_ids=loc_ids, loc_sigma=1e3)
    logp = logits.log_softmax(-1)
    uniform = -logp[0, 1, 10:].mean() - logp[0, 2, 10:].mean()  # soft target ~ uniform over the bins
    torch.testing.assert_close(wide[0], -logp[0, 0, 3] - logp[0, 3, 1] + uniform, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(wide[1], reference[1])


def test_label_smoothing_is_torchs_label_smoothed_cross_entropy():
    import torch
    import torch.nn.functional as F

    from unified_vl.engine.trainer import token_losses

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 30)
    labels = torch.tensor([[3, 15, 22, 1], [5, 1, -100, -100]])
    smooth, count = token_losses(logits, labels, label_smoothing=0.1)
    reference = F.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=-100, reduction="none", label_smoothing=0.1
    ).sum(1)
    torch.testing.assert_close(smooth, reference)
    assert count.tolist() == [4, 2]


def test_lr_scale_splits_the_optimizer_groups_by_longest_module_prefix():
    import torch

    from unified_vl.engine.trainer import param_groups

    model = torch.nn.ModuleDict(
        {
            "visual": torch.nn.ModuleDict({"stem": torch.nn.Linear(2, 3), "blocks": torch.nn.Linear(3, 3)}),
            "visual_extra": torch.nn.Linear(3, 1),  # "visual" is a module path: this is not under it
            "text": torch.nn.Linear(3, 4),
        }
    )
    model["text"].bias.requires_grad_(False)
    groups = param_groups(model, 0.01, 1e-3, {"visual": 2.0, "visual.stem": 8.0})
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert by_id[id(model["visual"]["stem"].weight)] == (8e-3, 0.01)  # the longest prefix wins
    assert by_id[id(model["visual"]["stem"].bias)] == (8e-3, 0.0)  # no decay on 1-D parameters
    assert by_id[id(model["visual"]["blocks"].weight)] == (2e-3, 0.01)
    assert by_id[id(model["visual_extra"].weight)] == (1e-3, 0.01)
    assert by_id[id(model["text"].weight)] == (1e-3, 0.01)
    assert id(model["text"].bias) not in by_id  # frozen parameters are in no group
    assert groups[0]["lr"] == 1e-3 and groups[0]["weight_decay"] == 0.01  # the base group first (logged lr)
    assert len(by_id) == sum(len(g["params"]) for g in groups) == 7
    # Without multipliers: one decayed and one undecayed group at the base rate.
    plain = param_groups(model, 0.01, 1e-3)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in plain] == [(1e-3, 0.01, 4), (1e-3, 0.0, 3)]
    slower = param_groups(model, 0.01, 1e-3, {"visual": 0.5})
    assert (slower[0]["lr"], slower[0]["weight_decay"]) == (1e-3, 0.01)  # base first even below it
    with pytest.raises(ConfigError, match="no trainable parameter's name starts with 'vision'"):
        param_groups(model, 0.01, 1e-3, {"vision": 2.0})
