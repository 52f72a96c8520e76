"""The processes of a data-parallel or sharded loop: which one this is, gathering what each
built, and decoding in lockstep. One process (no ``torch.distributed``) is a world of one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(number of processes, this one's rank)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process."""
    size, _ = world()
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world()[0] > 1:
        dist.barrier()


def all_done(device: torch.device) -> Callable[[bool], bool] | None:
    """Decoding stops when every process is done (sharded policies decode in lockstep)."""
    if world()[0] == 1:
        return None

    def done_everywhere(local: bool) -> bool:
        flag = torch.tensor([0.0 if local else 1.0], device=device)
        dist.all_reduce(flag)
        return flag.item() == 0

    return done_everywhere
