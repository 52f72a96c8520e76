"""The optimiser and its learning-rate schedule (the ``optim`` settings)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from inspo.names import Scheduler
from inspo.settings import OptimConfig

__all__ = ["OptimConfig", "build_optimizer", "lr_factor"]


def lr_factor(step: int, total: int, o: OptimConfig) -> float:
    """The multiple of ``o.lr`` at optimiser step ``step`` of ``total``."""
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = min((step - o.warmup_steps) / max(total - o.warmup_steps, 1), 1.0)
    if o.scheduler is Scheduler.cosine:
        return 0.5 * (1 + math.cos(math.pi * progress))
    if o.scheduler is Scheduler.linear:
        return 1.0 - progress
    return 1.0


def build_optimizer(
    params: Iterable[torch.nn.Parameter], o: OptimConfig, total_steps: int
) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer: AdamW and a per-step LambdaLR."""
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
    total = max(int(total_steps), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, o))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
