"""DeepSpeed training checkpoints: save, keep the last K and the best, resume (export: `engine.export`).

Layout of ``<run>/checkpoints/``::

    latest                 the tag of the newest complete checkpoint (written last, atomically)
    index.json             [{tag, step, metrics}] of complete checkpoints and the best one
    step_00000100/         DeepSpeed's files (all ranks write theirs) + rng_rank<r>.json per rank

Why a kill or a full disk never corrupts what was saved before: a checkpoint goes into a new
folder; ``latest`` is replaced (temp file, fsync, ``os.replace``) only after every rank finished
writing, and old folders are deleted only after that. A save that fails removes its own partial
folder and leaves ``latest`` on the previous checkpoint. (DeepSpeed's own ``latest`` is written in
place, so we pass ``save_latest=False`` and write it ourselves, in the format its loader reads.)

Weights in these folders are DeepSpeed's (torch pickles of tensors); they are training state,
separate from the exported Hugging Face folder (safetensors), as DESIGN.md §3 asks.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unified_vl.checkpoint import CheckpointError, atomic_write_text
from unified_vl.engine.distributed import DistInfo, all_reduce_sum, average_batch_norm_statistics, barrier
from unified_vl.engine.selection import higher_is_better

LATEST = "latest"  # DeepSpeed's file name, so deepspeed's load_checkpoint(tag=None) reads ours too
INDEX = "index.json"
TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# -- RNG state (JSON, one file per rank: every rank has its own dropout stream) ---------------


def rng_state() -> dict:
    """Python, numpy and torch (CPU and CUDA) random states as JSON-ready lists."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# -- the manager -------------------------------------------------------------------------------


class CheckpointManager:
    """Saves and restores DeepSpeed checkpoints of one run.

    Args:
        directory: ``<run>/checkpoints``.
        dist: this process's rank information.
        keep_last: newest checkpoints to keep.
        best_metric: metric key whose best checkpoint is kept besides the newest (higher is
            better, except for keys containing "loss").
    """

    def __init__(self, directory: str | os.PathLike, *, dist: DistInfo, keep_last: int, best_metric: str | None):
        self.dir = Path(directory)
        self.dist = dist
        self.keep_last = keep_last
        self.best_metric = best_metric
        if dist.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
        barrier()

    # -- reading ----------------------------------------------------------------------------
    def latest_tag(self) -> str | None:
        path = self.dir / LATEST
        if not path.is_file():
            return None
        tag = path.read_text().strip()
        return tag or None

    def index(self) -> dict:
        path = self.dir / INDEX
        if not path.is_file():
            return {"checkpoints": [], "best": None}
        return json.loads(path.read_text())

    # -- saving -----------------------------------------------------------------------------
    def save(self, engine: Any, step: int, client_state: dict, metrics: dict[str, float] | None = None) -> str:
        """Saves a checkpoint on every rank (all ranks must call this) and moves ``latest`` to it.

        Raises:
            CheckpointError: any rank failed to write (e.g. the disk is full); the partial
                folder is removed and ``latest`` still names the previous checkpoint.
        """
        tag = tag_for(step)
        folder = self.dir / tag
        average_batch_norm_statistics(engine.module)  # rank 0 saves the model every rank evaluates
        if self.dist.is_main and folder.exists():  # a partial folder of a killed save, or a re-save
            shutil.rmtree(folder)
        barrier()
        error: BaseException | None = None
        try:
            engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
            atomic_write_text(folder / f"rng_rank{self.dist.rank}.json", json.dumps(rng_state()))
        except Exception as exc:  # noqa: BLE001 - any failure: report it after every rank agrees
            error = exc
        failures = all_reduce_sum([1.0 if error is not None else 0.0])[0]
        if failures:
            if self.dist.is_main:
                shutil.rmtree(folder, ignore_errors=True)
            barrier()
            previous = self.latest_tag()
            intact = f"the previous checkpoint {previous!r} is intact" if previous else "no earlier checkpoint exists"
            reason = (
                "the disk is full"
                if isinstance(error, OSError) and error.errno == errno.ENOSPC
                else f"{type(error).__name__}: {error}"
                if error
                else "another rank failed"
            )
            raise CheckpointError(f"saving checkpoint {tag!r} in {self.dir} failed ({reason}); {intact}") from error
        barrier()
        if self.dist.is_main:
            self._commit(tag, step, metrics or {})
        barrier()
        return tag

    def _is_better(self, value: float, best: float) -> bool:
        return value > best if higher_is_better(self.best_metric or "") else value < best

    def _commit(self, tag: str, step: int, metrics: dict[str, float]) -> None:
        index = self.index()
        entries = [e for e in index["checkpoints"] if e["tag"] != tag]
        entries.append({"tag": tag, "step": step, "metrics": metrics})
        entries.sort(key=lambda e: e["step"])
        best = index.get("best")
        if self.best_metric and self.best_metric in metrics:
            value = metrics[self.best_metric]
            if best is None or self._is_better(value, best["value"]):
                best = {"tag": tag, "metric": self.best_metric, "value": value}
        keep = {e["tag"] for e in entries[-self.keep_last :]} | ({best["tag"]} if best else set())
        entries = [e for e in entries if e["tag"] in keep]
        atomic_write_text(self.dir / INDEX, json.dumps({"checkpoints": entries, "best": best}, indent=2))
        atomic_write_text(self.dir / LATEST, tag)
        # Only now, with `latest` on the new checkpoint, may older folders go (partial ones too).
        for path in self.dir.iterdir():
            if path.is_dir() and TAG_RE.match(path.name) and path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)

    # -- resuming ---------------------------------------------------------------------------
    def load(self, engine: Any) -> dict:
        """Restores model, optimizer, scheduler and this rank's RNG from ``latest``; returns the client state.

        Raises:
            CheckpointError: no checkpoint, or DeepSpeed could not load it.
        """
        tag = self.latest_tag()
        if tag is None:
            raise CheckpointError(f"nothing to resume: {self.dir} has no {LATEST!r} checkpoint pointer")
        if not (self.dir / tag).is_dir():
            raise CheckpointError(f"{self.dir / LATEST} names {tag!r} but that folder is missing")
        path, client_state = engine.load_checkpoint(
            str(self.dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {tag!r} from {self.dir}")
        rng_file = self.dir / tag / f"rng_rank{self.dist.rank}.json"
        if rng_file.is_file():
            set_rng_state(json.loads(rng_file.read_text()))
        return client_state or {}
