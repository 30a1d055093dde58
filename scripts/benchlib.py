"""What the benchmark scripts share: the machine line, repeated timings, ratios and Markdown tables.

Not a benchmark itself: ``scripts/bench_*.py`` import it (``python scripts/bench_x.py`` puts
``scripts/`` on the import path). Every figure is the median of several repetitions, reported with
its spread (min..max), and every comparison is a ratio of two figures measured in the same run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """CPU model, usable cores, torch version and device: the line every benchmark prints first."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return (
        f"machine: {cpu_model()}, {cores} cores, torch {torch.__version__}, device {device}, "
        f"{torch.get_num_threads()} torch threads"
    )


@dataclass(frozen=True)
class Figure:
    """Repeated measurements of one quantity (seconds, or a rate) with its median and spread."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def rate(self, amount: float) -> Figure:
        """``amount`` per second for each repetition (a time -> a throughput)."""
        return Figure(tuple(amount / v for v in self.values))

    def spread(self, fmt: str = ".3g") -> str:
        return f"{self.median:{fmt}} ({self.low:{fmt}}..{self.high:{fmt}})"


def timed(fn: Callable[[], object], *, repeats: int, warmup: int = 1) -> Figure:
    """Seconds per call of ``fn``: ``warmup`` calls not counted, then ``repeats`` timed ones."""
    for _ in range(warmup):
        fn()
    values = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        values.append(time.perf_counter() - start)
    return Figure(tuple(values))


def paired_ratio(a: Figure, b: Figure) -> Figure:
    """``a / b`` repetition by repetition (both measured alternately in one run, so drift cancels)."""
    return Figure(tuple(x / y for x, y in zip(a.values, b.values, strict=True)))


def alternate(fns: Sequence[Callable[[], object]], *, repeats: int, warmup: int = 1) -> list[Figure]:
    """Times several functions in turn (A B C A B C ...) so that a drifting machine affects all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    values: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            values[i].append(time.perf_counter() - start)
    return [Figure(tuple(v)) for v in values]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(value: float, target: float, *, at_least: bool = True) -> str:
    """``met`` or ``missed`` against a target (``at_least``: the value must reach it, else stay under)."""
    ok = value >= target if at_least else value <= target
    return "met" if ok else "missed"


def report(out: str | os.PathLike | None, text: str, data: dict) -> None:
    """Prints ``text``; with ``out``, writes it to ``out`` (Markdown) and ``data`` beside it as JSON."""
    print(text)
    if out is None:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    path.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")


def prediction_rows(run: str | os.PathLike, split: str, task: str) -> list[dict]:
    """One task's rows of ``RUN/predictions/{split}.jsonl`` (a run's final evaluation), as written."""
    path = Path(run) / "predictions" / f"{split}.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no such predictions file (a run writes it at its final evaluation)")
    rows = (json.loads(line) for line in path.read_text().splitlines())
    return [row for row in rows if row.get("task") == task]


def run_predictions(run: str | os.PathLike, split: str, task: str) -> dict[str, str | None]:
    """Record id -> parsed prediction of one task, from ``RUN/predictions/{split}.jsonl``."""
    return {row["id"]: row.get("prediction") for row in prediction_rows(run, split, task)}
