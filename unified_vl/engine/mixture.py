"""The multi-task mixture: which (task, example) pairs fill each optimizer step, on which rank.

Sampling is a pure function of the seed and the step:

* the task of each of the ``G`` slots of step ``s`` is drawn i.i.d. from the mixture weights with
  ``numpy.random.default_rng([seed, s])``;
* each task reads its examples in epochs, each epoch a permutation drawn from
  ``default_rng([seed, task index, epoch])``; a task's position is the number of its examples drawn
  so far, so a resumed run continues mid-epoch where the killed one stopped;
* the step's ``G`` examples are cut into micro batches; micro batch ``k`` goes to rank ``k % W`` as
  its accumulation step ``k // W``. Ranks never overlap, and one process with accumulation ``A x W``
  sees the same micro batches as ``W`` processes with accumulation ``A``.

No torch here: the sampler is plain numpy, testable on its own.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def mixture_probabilities(
    sizes: Mapping[str, int], weights: Mapping[str, float], *, weighting: str, temperature: float = 1.0
) -> dict[str, float]:
    """Sampling probability of each task.

    Args:
        sizes: training examples per task.
        weights: the configured weight per task (used by ``explicit``).
        weighting: ``explicit`` (the weights), ``size`` (proportional to the number of examples) or
            ``temperature`` (proportional to ``n ** (1 / temperature)``, Raffel et al. 2020 §3.5.2).
        temperature: see ``weighting``; 1 equals ``size``, large values approach uniform.
    """
    if weighting == "explicit":
        raw = {t: float(weights[t]) for t in weights}
    elif weighting == "size":
        raw = {t: float(sizes[t]) for t in weights}
    elif weighting == "temperature":
        raw = {t: float(sizes[t]) ** (1.0 / temperature) for t in weights}
    else:
        raise ValueError(f"weighting must be 'explicit', 'size' or 'temperature', got {weighting!r}")
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"mixture weights sum to {total}; give at least one task a positive weight: {raw}")
    return {t: w / total for t, w in raw.items()}


def few_shot_indices(num_examples: int, shots: int, *, seed: int, task: str) -> list[int]:
    """``shots`` example indices out of ``num_examples``, reproducible from the seed and the task name (sorted).

    Raises:
        ValueError: fewer examples than shots.
    """
    if shots > num_examples:
        raise ValueError(f"{task}: asked for {shots} shots but the training split has only {num_examples} examples")
    rng = np.random.default_rng([seed, 0x5107, *task.encode()])
    return sorted(int(i) for i in rng.choice(num_examples, size=shots, replace=False))


class MixtureSampler:
    """Deterministic, resumable, rank-sharded draws from a task mixture.

    Args:
        sizes: examples per task (the tasks' order here is part of the seed: keep it fixed).
        probabilities: sampling probability per task (`mixture_probabilities`).
        seed: the run's seed.
        global_batch_size: examples per optimizer step over all ranks.
    """

    def __init__(
        self, sizes: Mapping[str, int], probabilities: Mapping[str, float], *, seed: int, global_batch_size: int
    ):
        self.tasks = list(sizes)
        self.sizes = np.array([int(sizes[t]) for t in self.tasks])
        empty = [t for t, n in zip(self.tasks, self.sizes, strict=True) if n <= 0]
        if empty:
            raise ValueError(f"tasks {empty} have no training examples")
        self.probs = np.array([probabilities[t] for t in self.tasks], dtype=np.float64)
        self.probs = self.probs / self.probs.sum()
        self.seed = int(seed)
        self.global_batch_size = int(global_batch_size)
        self.step = 0  # the next step to draw
        self.counts = np.zeros(len(self.tasks), dtype=np.int64)  # examples drawn so far, per task
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    def _slot_tasks(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.choice(len(self.tasks), size=self.global_batch_size, p=self.probs)  # (G,)

    def _permutation(self, task: int, epoch: int) -> np.ndarray:
        key = (task, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 4 * len(self.tasks):
                self._perm_cache.clear()
            self._perm_cache[key] = np.random.default_rng([self.seed, task, epoch]).permutation(self.sizes[task])
        return self._perm_cache[key]

    def next_step(self) -> list[tuple[str, int]]:
        """The ``G`` (task, example index) pairs of the next optimizer step, over all ranks."""
        out = []
        for t in self._slot_tasks(self.step):
            epoch, position = divmod(int(self.counts[t]), int(self.sizes[t]))
            out.append((self.tasks[t], int(self._permutation(int(t), epoch)[position])))
            self.counts[t] += 1
        self.step += 1
        return out

    def fast_forward(self, step: int) -> None:
        """Moves to ``step`` from scratch (the pure-function definition; `load_state_dict` is the shortcut)."""
        self.step, self.counts = 0, np.zeros(len(self.tasks), dtype=np.int64)
        for s in range(step):
            self.counts += np.bincount(self._slot_tasks(s), minlength=len(self.tasks))
        self.step = step

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "counts": {t: int(c) for t, c in zip(self.tasks, self.counts, strict=True)},
            "seed": self.seed,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restores the position; the task list and seed must match the run that saved it."""
        if list(state["counts"]) != self.tasks or state["seed"] != self.seed:
            raise ValueError(
                f"the checkpoint's data position is for tasks {list(state['counts'])} with seed {state['seed']}; "
                f"this run has tasks {self.tasks} with seed {self.seed}"
            )
        self.step = int(state["step"])
        self.counts = np.array([state["counts"][t] for t in self.tasks], dtype=np.int64)


def shard(examples: list, *, rank: int, world_size: int, micro_batch_size: int) -> list[list]:
    """This rank's micro batches of one step: micro batch ``k`` of the step goes to rank ``k % world_size``."""
    chunks = [examples[i : i + micro_batch_size] for i in range(0, len(examples), micro_batch_size)]
    return chunks[rank::world_size]
