"""Who this process is within its cell (rank, world, the tracker rank 0 writes with), and the one collective every
job of a worker uses."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from workflows.tracking import Tracker


@dataclass
class Worker:
    rank: int
    world: int
    tracker: Tracker | None  # rank 0 only
    run_id: str


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks. NCCL reduces device tensors only: a host tensor goes there and back."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" and not t.is_cuda:
            return all_reduce_sum(t.cuda()).to(t.device)
        dist.all_reduce(t)
    return t
