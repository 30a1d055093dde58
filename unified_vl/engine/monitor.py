"""What a run reports: a tqdm bar (loss, lr, samples/s, ETA), TensorBoard events, ``metrics.jsonl``
and, at the end, a PNG of the learning curves. Only rank 0 writes; other ranks hold a silent one.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

# Seconds between progress-bar updates when stderr is a file or a pipe (a log, CI): every update is
# a line there, and tqdm's default of 0.1 s wrote ~6,000 of them in a 15-minute main job.
LOG_INTERVAL_S = 15.0


def progress_interval(stream) -> float:
    """tqdm's ``mininterval`` for ``stream``: its default on a terminal, a few times a minute elsewhere."""
    isatty = getattr(stream, "isatty", None)
    return 0.1 if isatty is not None and isatty() else LOG_INTERVAL_S


class Monitor:
    """Reporting for one run.

    Args:
        run_dir: the run folder (``metrics.jsonl``, ``tb/``, ``curves.png`` go there).
        enabled: False on ranks other than 0.
        total_steps: the planned number of optimizer steps (the bar's total).
        initial_step: where a resumed run starts.
    """

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool, total_steps: int, initial_step: int = 0):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.bar = None
        self.tb = None
        if not enabled:
            return
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in close()
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.run_dir / "tb"))
        self.bar = tqdm(
            total=total_steps,
            initial=initial_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=progress_interval(sys.stderr),
        )

    def set_total(self, total_steps: int) -> None:
        """The plan changed (a time-bounded run measured its speed)."""
        if self.bar is not None:
            self.bar.total = total_steps  # shown at the next update (a forced refresh is a log line)

    def step(self, step: int, values: dict[str, float], *, log: bool) -> None:
        """One optimizer step done; ``log``: also write ``values`` to the files."""
        if not self.enabled:
            return
        self.bar.update(1)
        if not log:
            return
        self.bar.set_postfix(
            loss=f"{values['train/loss']:.4f}",
            lr=f"{values['train/lr']:.2e}",
            sps=f"{values['train/samples_per_s']:.0f}",
            refresh=False,  # shown at the bar's next update, which mininterval paces
        )
        self._write(step, "train", values)

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled or not metrics:
            return
        self._write(step, "eval", metrics)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        self.bar.write(f"step {step}: {shown}")

    def write(self, text: str) -> None:
        """A line that does not break the progress bar."""
        if self.enabled:
            self.bar.write(text)

    def _write(self, step: int, kind: str, values: dict[str, float]) -> None:
        self.jsonl.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.tb.close()
        self.jsonl.close()
        plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")


def plot_curves(metrics_file: str | os.PathLike, out: str | os.PathLike) -> Path | None:
    """Training loss (total and per task), learning rate and evaluation metrics over steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    if not train:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    steps = [r["step"] for r in train]
    loss_keys = sorted({k for r in train for k in r if k.startswith("train/loss")})
    for key in loss_keys:
        pts = [(r["step"], r[key]) for r in train if key in r]
        axes[0].plot(
            *zip(*pts, strict=False), label=key.removeprefix("train/"), linewidth=2 if key == "train/loss" else 1
        )
    axes[0].set(title="training loss", xlabel="step", yscale="log")
    axes[0].legend(fontsize=7)
    axes[1].plot(steps, [r["train/lr"] for r in train])
    axes[1].set(title="learning rate", xlabel="step")
    metric_keys = sorted({k for r in evals for k in r if k not in ("step", "kind")})
    for key in metric_keys:
        pts = [(r["step"], r[key]) for r in evals if key in r]
        axes[2].plot(*zip(*pts, strict=False), marker="o", label=key)
    axes[2].set(title="evaluation", xlabel="step")
    if metric_keys:
        axes[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
