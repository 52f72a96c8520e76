"""The optimiser and its learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch


@dataclass
class OptimConfig:
    """AdamW with linear warm-up, then a constant, cosine or linear schedule (``conf/train.yaml``
    ``optim``)."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    scheduler: Literal["constant", "cosine", "linear"] = "constant"


def lr_factor(step: int, total: int, o: OptimConfig) -> float:
    """The multiple of ``o.lr`` at optimiser step ``step`` of ``total``."""
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = min((step - o.warmup_steps) / max(total - o.warmup_steps, 1), 1.0)
    if o.scheduler == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if o.scheduler == "linear":
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
