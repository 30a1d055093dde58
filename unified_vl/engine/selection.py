"""Early stopping by the validation metric (``eval.final_weights: best``).

The weights of the best validation so far are kept (a float32 copy on the CPU) and put back into the
model before the final evaluation and the export: the run's result is the weights a user would pick
by looking at the validation curve, not those of the last step. This is how the benchmark's plain
baselines choose their test weights (``unified_vl.app.baselines``; "early stopping", Prechelt 1998,
"Early Stopping - But When?": train to the budget, keep the best-on-validation weights).

Kept in memory rather than as DeepSpeed checkpoints: a validation every few hundred steps would
otherwise write the optimizer's state each time. The copy rides in every checkpoint's client state,
so a resumed run keeps comparing with the best validation before it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def higher_is_better(metric: str) -> bool:
    """A loss is better lower, every other metric higher (``checkpoint.best_metric``'s rule)."""
    return "loss" not in metric


class BestWeights:
    """The model's weights at its best value of ``metric`` (whole weights: ZeRO stages 0-2)."""

    def __init__(self, metric: str):
        self.metric = metric
        self.step: int | None = None
        self.value: float | None = None
        self.weights: dict[str, torch.Tensor] | None = None
        self.validations = 0

    def offer(self, model: torch.nn.Module, step: int, metrics: Mapping[str, float]) -> bool:
        """Keeps ``model``'s weights if ``metrics[self.metric]`` beats the best so far; True if kept.

        Ties keep the earlier weights. Every rank sees the same metrics (the trainer broadcasts them),
        so every rank keeps the same step.

        Raises:
            ValueError: the metrics hold no ``self.metric`` (it names the keys they hold).
        """
        if self.metric not in metrics:
            raise ValueError(
                f"eval.final_weights=best compares {self.metric!r}, which the validation did not report "
                f"(it reported {sorted(metrics)}); set checkpoint.best_metric to one of them"
            )
        value = float(metrics[self.metric])
        self.validations += 1
        better = self.value is None or (value > self.value if higher_is_better(self.metric) else value < self.value)
        if better:
            with torch.no_grad():
                self.weights = {
                    k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype, copy=True)
                    for k, v in model.state_dict().items()
                }
            self.step, self.value = step, value
        return better

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Puts the kept weights into ``model`` (cast to each weight's dtype and device).

        Raises:
            RuntimeError: nothing was kept (no validation ran).
        """
        if self.weights is None:
            raise RuntimeError(
                f"eval.final_weights=best: no validation ran, so there are no best weights ({self.metric})"
            )
        model.load_state_dict(self.weights)

    def describe(self) -> str:
        return f"the weights of step {self.step} ({self.metric} = {self.value:.4f}, best of {self.validations})"

    def state_dict(self) -> dict:
        return {
            "metric": self.metric,
            "step": self.step,
            "value": self.value,
            "validations": self.validations,
            "weights": self.weights,
        }

    def load_state_dict(self, state: Mapping | None) -> None:
        """Restores what a checkpoint carried; None (a checkpoint from a run without it): start afresh."""
        if not state:
            return
        if state["metric"] != self.metric:
            return  # another metric's best says nothing about this one's: compare afresh
        self.step, self.value, self.validations = state["step"], state["value"], state["validations"]
        self.weights = state["weights"]
