"""Data-parallel training with torch.distributed, as launched by torchrun (one process per GPU)."""

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    cpu_group: Any = field(default=None, compare=False)  # gloo group for host-side flags (NCCL is GPU-only)

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, metrics and resume state."""
        return self.rank == 0


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    cpu_group = dist.new_group(backend="gloo") if device_type == "cuda" else None
    return DistInfo(rank, local_rank, world_size, cpu_group)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when `flag` is true on any: a signal reaches the ranks at different steps, and a
    rank that stops alone leaves the others waiting in a collective."""
    if info.world_size == 1:
        return flag
    value = torch.tensor(int(flag))
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=info.cpu_group)
    return bool(value)


def same_on_all_ranks(value: int, info: DistInfo) -> bool:
    """Whether every rank holds the same `value` (the answer is the same on every rank)."""
    if info.world_size == 1:
        return True
    bounds = torch.tensor([value, -value])
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=info.cpu_group)
    return int(bounds[0]) == -int(bounds[1])


def shutdown(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
