"""train.sam_rho and the baseline's --sam: sharpness-aware minimisation (Foret et al. 2021)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from test_engine import NO_DROPOUT, run

from unified_vl.engine import sharpness
from unified_vl.engine.config import ConfigError, load_config


def _quartic_model():
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.randn(5))
    model.v = torch.nn.Parameter(torch.randn(3, 2))
    model.unused = torch.nn.Parameter(torch.randn(4))
    return model


def _quartic(model) -> torch.Tensor:
    return (model.w**4).sum() / 4 + (model.v**4).sum() / 4  # gradient: w^3, v^3


def test_ascend_moves_the_weights_rho_along_the_normalised_gradient_and_back():
    model = _quartic_model()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    g = [before[0] ** 3, before[1] ** 3]
    norm = torch.sqrt(sum((x**2).sum() for x in g))
    steps = sharpness.ascend(params, _quartic(model), 0.05)
    torch.testing.assert_close(steps[0], 0.05 * g[0] / norm)
    torch.testing.assert_close(steps[1], 0.05 * g[1] / norm)
    assert torch.equal(steps[2], torch.zeros(4))  # a parameter the loss does not reach stays put
    total = torch.sqrt(sum((e**2).sum() for e in steps))
    assert abs(float(total) - 0.05) < 1e-6  # the whole move has length rho
    torch.testing.assert_close(model.w.detach(), before[0] + steps[0])
    assert all(p.grad is None for p in params)  # nothing accumulated where the optimizer would read it
    # The gradient SAM then steps with is the one at w + e: (w + e)^3 here, not w^3.
    _quartic(model).backward()
    torch.testing.assert_close(model.w.grad, (before[0] + steps[0]) ** 3)
    sharpness.descend_back(params, steps)
    for p, b in zip(params, before, strict=True):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-6)  # to rounding
    with pytest.raises(ValueError, match=re.escape("SAM's rho must be positive, got 0.0")):
        sharpness.ascend(params, _quartic(model), 0.0)


def test_the_ascent_normalises_by_the_batch_but_keeps_batch_norm_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.3))
    model.train()
    x = torch.randn(6, 3, 8, 8) * 3 + 1
    bn = model[1]
    mean, var, count = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    with sharpness.batch_norm_statistics_kept(model):
        out = model(x)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert int(bn.num_batches_tracked) == count and bn.momentum == 0.3
    # Normalised by the batch's own statistics (train mode), not by the running ones.
    assert abs(float(out.detach().mean())) < 1e-5
    model(x)  # outside the context the statistics move again
    assert not torch.equal(bn.running_mean, mean) and int(bn.num_batches_tracked) == count + 1


def test_a_run_with_sam_trains_another_model_reproducibly(tmp_path):
    tmp = tmp_path
    args = [NO_DROPOUT, "checkpoint.export=false", "train.max_steps=4", "train.micro_batch_size=8"]
    plain = run(tmp, "plain", *args).losses
    assert run(tmp, "off", *args, "train.sam_rho=0").losses == plain  # off: the same run to the bit
    sam = run(tmp, "sam", *args, "train.sam_rho=0.05").losses
    # The log shows the loss at the weights themselves (not at the perturbed ones): the first step's is
    # the plain run's; the steps after follow SAM's gradients.
    assert sam[0] == pytest.approx(plain[0], rel=1e-6)
    assert all(np.isfinite(sam)) and abs(sam[-1] - plain[-1]) > 1e-4
    assert run(tmp, "again", *args, "train.sam_rho=0.05").losses == sam
    # ZeRO-2's gradient hooks do not fire on the perturbation's gradient: it trains as stage 0 does.
    stage2 = run(tmp, "zero2", *args, "train.sam_rho=0.05", "train.zero_stage=2").losses
    np.testing.assert_allclose(stage2, sam, rtol=1e-5)
    # In bf16 the perturbation moves DeepSpeed's bf16 copy of the weights; the step still comes from fp32 masters.
    bf16 = run(tmp, "bf16", *args, "train.sam_rho=0.05", "train.precision=bf16").losses
    np.testing.assert_allclose(bf16, sam, rtol=0.05)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.sam_rho=-0.1", "train.sam_rho must be a number in [0, 10] (SAM's radius; 0: off), got -0.1"),
        ("train.sam_rho=true", "train.sam_rho: expected float, got str 'true'"),
        (
            "train.zero_stage=3",
            "train.sam_rho needs whole weights on every rank (train.zero_stage 0, 1 or 2); ZeRO-3 shards them",
        ),
    ],
)
def test_bad_sam_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["data.tasks={vqa: 1}", "train.sam_rho=0.05", override])
