"""Data-parallel training when launched by torchrun; a plain single process otherwise.

Under ``torchrun --nproc-per-node N`` the environment carries WORLD_SIZE/RANK; the process group starts with
NCCL when CUDA is there and gloo otherwise. Each rank trains on its slice of every global batch (so the
optimisation matches one process with the same batch size), DDP averages the gradients, and only rank 0
writes files; ``barrier`` keeps the others from reading a run directory before it is written (multi-node runs
need the output on a shared filesystem).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def init_from_env() -> tuple[int, int]:
    """(rank, world size); starts the process group when torchrun launched us with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return rank(), world_size()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module to run forward/backward through: DDP when there are several processes."""
    if world_size() > 1:
        return DistributedDataParallel(model)
    return model
