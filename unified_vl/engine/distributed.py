"""Process group setup: one process without a launcher, or N under ``deepspeed`` / ``torchrun``.

Launchers set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; a
plain ``python`` or ``unified-vl`` process gets them here (world size 1, a free local port). The
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


def single_process_env() -> None:
    """Fills the launcher variables for a lone process (rank 0 of 1) where they are absent."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        missing = [k for k in LAUNCH_ENV if k not in os.environ and k != "LOCAL_RANK"]
        if missing:
            raise RuntimeError(
                f"RANK and WORLD_SIZE are set but {missing} are not; launch with `deepspeed` or `torchrun`"
            )
        os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
        return
    os.environ.update(
        {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
        }
    )


def init_distributed() -> DistInfo:
    """Initialises ``torch.distributed`` through DeepSpeed (idempotent) and returns this rank's place."""
    import torch

    if not torch.cuda.is_available():
        # DeepSpeed picks its accelerator at import; on a CPU machine say so instead of letting it guess.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    single_process_env()
    import deepspeed
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
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
