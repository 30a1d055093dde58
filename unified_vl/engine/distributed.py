"""Process group setup: one process without a launcher, or N under ``deepspeed`` / ``torchrun``.

Launchers set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; a
plain ``python`` or ``unified-vl`` process forms a group of one on a free loopback port without
writing them into its environment (its child processes must not inherit a port it holds). The
backend is NCCL when CUDA is available, gloo on the CPU (DeepSpeed's "cpu" accelerator).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands."""

    rank: int
    world_size: int
    local_rank: int
    backend: str  # "gloo" (CPU) or "nccl" (GPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched() -> bool:
    """Whether a launcher started this process (``RANK`` and ``WORLD_SIZE`` are in the environment).

    Raises:
        DistributedSetupError: only some of the launcher variables are set.
    """
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return False
    missing = [k for k in LAUNCH_ENV if k not in os.environ and k != "LOCAL_RANK"]
    if missing:
        raise DistributedSetupError(
            f"{', '.join(k for k in LAUNCH_ENV if k in os.environ)} are set but {', '.join(missing)} are not; "
            "launch with `deepspeed` or `torchrun`, or unset them to run as one process"
        )
    return True


class DistributedSetupError(RuntimeError):
    """The process group could not be joined; the message names the environment it read."""


def _launch_env() -> str:
    return ", ".join(f"{k}={os.environ[k]}" for k in LAUNCH_ENV if k in os.environ)


def init_distributed(*, timeout_minutes: float | None = None) -> DistInfo:
    """Initialises ``torch.distributed`` through DeepSpeed (idempotent) and returns this rank's place.

    A process without a launcher joins a group of its own over a free loopback port, passed to
    DeepSpeed directly: nothing but ``LOCAL_RANK`` (which DeepSpeed's engine reads) goes into
    ``os.environ``, so a process it starts later (a test's subprocess, a launcher) inherits no
    ``MASTER_PORT`` of a port this process holds.

    Args:
        timeout_minutes: how long to wait for the other ranks; None: DeepSpeed's default (10 minutes,
            or ``DEEPSPEED_TIMEOUT``).

    Raises:
        DistributedSetupError: the launcher variables are incomplete, or joining failed (a port in
            use, ranks that never came); the message names the variables, which a process started
            from another launcher's shell inherits by mistake.
    """
    import datetime

    import torch

    if not torch.cuda.is_available():
        # DeepSpeed picks its accelerator at import; on a CPU machine say so instead of letting it guess.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"dist_backend": backend, "auto_mpi_discovery": False}
        if timeout_minutes is not None:
            kwargs["timeout"] = datetime.timedelta(minutes=timeout_minutes)
        if launched():
            where = f"the launcher's environment ({_launch_env()})"
        else:
            os.environ["LOCAL_RANK"] = "0"
            kwargs.update(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
            where = "a group of one process on loopback"
        try:
            deepspeed.init_distributed(**kwargs)
        except (RuntimeError, ValueError, TimeoutError) as exc:  # DistNetworkError and DistStoreError are RuntimeErrors
            raise DistributedSetupError(
                f"could not join the process group from {where}: {type(exc).__name__}: {str(exc).strip()[:300]}\n"
                "RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are set by launchers (torchrun, deepspeed); a job "
                "started from a shell that inherited them from another job tries to join that job. Unset them "
                "(unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT) to run as one process."
            ) from exc
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, backend=backend)


def world_size_from_env() -> int:
    """The world size a launcher announced (1 without one), readable before initialisation."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64 so that sums of losses stay exact enough)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def average_batch_norm_statistics(model: Any) -> None:
    """Averages BatchNorm's running statistics over the ranks (all ranks must call this), in place.

    Each rank's BatchNorm layers (a convolutional stem, a timm CNN backbone) keep statistics of that
    rank's micro batches only: DeepSpeed averages gradients, not buffers. Called before every
    evaluation, checkpoint and export, so that every rank scores its share of a split with the model
    rank 0 saves. timm's ``distribute_bn`` with ``reduce=True``, as timm's train.py runs it before each
    evaluation (the mean of the ranks' variances, not the pooled variance: the per-rank means differ
    little once the ranks have seen thousands of batches).
    """
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    from timm.utils import distribute_bn

    distribute_bn(model, dist.get_world_size(), reduce=True)
