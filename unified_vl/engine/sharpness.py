"""Sharpness-aware minimisation's weight perturbation (``train.sam_rho``; the baseline's ``--sam``).

SAM (Foret et al. 2021, "Sharpness-Aware Minimization for Efficiently Improving Generalization",
Algorithm 1) takes each step's gradient at the worst nearby weights rather than at the weights
themselves: first ``e = rho g / ||g||`` from the batch's gradient ``g``, then the gradient at
``w + e``, then ``w`` is restored and the optimizer steps with that second gradient. Chen et al. 2022
("When Vision Transformers Outperform ResNets without Pretraining or Strong Data Augmentations")
find transformers trained from scratch on little data converge to far sharper minima than CNNs and
gain much more from SAM than ResNets do (their abstract: +5.3 top-1 on ImageNet for ViT-B/16 and +11.0
for Mixer-B/16). Our model reads a small CNN's 16 tokens with transformer layers; the baseline is a CNN.

Hand-written (a dozen lines) rather than a package: SAM is distributed as an optimizer wrapper
(e.g. github.com/davda54/sam), which would sit between DeepSpeed and its optimizer and run its own
backward; here the perturbation is computed with ``torch.autograd.grad`` on one rank's micro batch
(no all-reduce: Foret et al.'s "m-sharpness", §4.1, where a per-device perturbation generalised
better than a global one), and DeepSpeed's own backward and step are left exactly as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def batch_norm_statistics_kept(module: torch.nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise by the batch but leave their running statistics as they are.

    SAM's first forward pass is an extra look at the same batch; counting it would move the running
    statistics twice per step (davda54/sam does the same with its ``disable_running_stats``).
    """
    saved = []
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            saved.append((m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None))
            m.momentum = 0.0  # running = (1 - 0) running + 0 batch
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def ascend(parameters: list[torch.nn.Parameter], loss: torch.Tensor, rho: float) -> list[torch.Tensor]:
    """Moves the weights to ``w + rho g / ||g||`` (g: ``loss``'s gradient) and returns each step ``e``.

    Parameters the loss does not reach are not moved (their ``e`` is zero). The gradient is taken with
    ``torch.autograd.grad``, so nothing is accumulated into ``.grad`` and no training hook fires.
    """
    if not rho > 0:
        raise ValueError(f"SAM's rho must be positive, got {rho!r}")
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    present = [g.detach().float().norm() for g in grads if g is not None]
    norm = torch.linalg.vector_norm(torch.stack(present)) if present else torch.tensor(0.0)
    scale = rho / (float(norm) + 1e-12)
    steps = []
    with torch.no_grad():
        for p, g in zip(parameters, grads, strict=True):
            e = torch.zeros_like(p) if g is None else (g * scale).to(p.dtype)
            p.add_(e)
            steps.append(e)
    return steps


def descend_back(parameters: list[torch.nn.Parameter], steps: list[torch.Tensor]) -> None:
    """Undoes :func:`ascend`: the optimizer then steps from the original weights."""
    with torch.no_grad():
        for p, e in zip(parameters, steps, strict=True):
            p.sub_(e)
