"""An exponential moving average of the weights during training (``train.ema_decay``).

Polyak & Juditsky 1992 ("Acceleration of stochastic approximation by averaging"): the average of the
iterates of a noisy optimizer generalises better than its last iterate. The average itself is timm's
``ModelEmaV3`` (a well-kept implementation: foreach updates, a float32 copy beside bf16 weights,
parameters and buffers both, BatchNorm's running statistics included); this module only fixes its
decay schedule and carries its state through our checkpoints.

The schedule: a plain average of the weights after each optimizer step until the decay reaches its
cap, then an exponential average over about ``1 / (1 - cap)`` steps. That is timm's warm-up with
``inv_gamma = 1, power = 1`` ("implements a simple average", its docstring): the decay at step ``t``
is ``min(cap, (t - 1) / t)``, so the first step's weights replace the random initialisation outright.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from unified_vl.checkpoint import CheckpointError


def _tied_safe_ema_class():
    """timm's ModelEmaV3 with an update that visits each tensor once.

    Its own update walks ``state_dict()``, which lists a tied tensor under every name it has (T5's
    ``shared`` / ``encoder.embed_tokens`` / ``decoder.embed_tokens``), so a tied embedding would be
    interpolated three times per step. ``parameters()`` and ``buffers()`` list each tensor once, and
    the copy (a deepcopy) ties the same tensors as the model, so the two walks line up.
    """
    from timm.utils.model_ema import ModelEmaV3

    class TiedSafeModelEma(ModelEmaV3):
        def apply_update_(self, model, decay: float) -> None:
            pairs = list(
                zip(
                    [*self.module.parameters(), *self.module.buffers()],
                    [*model.parameters(), *model.buffers()],
                    strict=True,
                )
            )
            for ema_v, model_v in pairs:
                if not ema_v.is_floating_point():
                    ema_v.copy_(model_v)  # e.g. BatchNorm's num_batches_tracked
            floats = [(ema_v, model_v) for ema_v, model_v in pairs if ema_v.is_floating_point()]
            self._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], weight=1.0 - decay)

    return TiedSafeModelEma


class WeightAverage:
    """The moving average of one model's weights (whole weights: ZeRO stages 0-2)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"the decay of a weight average must be in (0, 1), got {decay!r}")
        # A float32 copy whatever the training precision: a bf16 average cannot hold a (1 - decay)
        # step of 0.002 (8 bits of mantissa), timm's docstring says as much.
        self.decay = decay
        self.ema = _tied_safe_ema_class()(
            model, decay=decay, use_warmup=True, warmup_gamma=1.0, warmup_power=1.0, dtype=torch.float32
        )

    @classmethod
    def of(cls, model: torch.nn.Module, decay: float) -> WeightAverage | None:
        """The average of ``model`` with this decay cap; None when the cap is 0 (off)."""
        return cls(model, decay) if decay else None

    def decay_at(self, step: int) -> float:
        """The decay applied by the update after optimizer step ``step`` (1-based)."""
        return self.ema.get_decay(step)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Folds ``model``'s weights after optimizer step ``step`` (1-based) into the average."""
        self.ema.update(model, step=step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.ema.module.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor] | None, *, where: str | Path) -> None:
        """Restores the average saved in a checkpoint (``where`` names it in the error)."""
        if state is None:
            raise CheckpointError(
                f"{where}: the checkpoint holds no weight average (it was trained without train.ema_decay); "
                "resume it without train.ema_decay, or start a new run"
            )
        self.ema.module.load_state_dict(state)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Puts the average into ``model`` (cast to each weight's dtype)."""
        model.load_state_dict(self.ema.module.state_dict())
