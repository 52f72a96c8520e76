"""The scalarizations Ψ of the GPO family: Ψ(z) for z = β·h − γ.

Each is convex and decreasing around the origin, so minimising it pushes the margin up. Written
with softplus/clamp so they are finite for large |z|.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from inspo.settings import SettingError

SCALARIZATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "logistic": lambda z: F.softplus(-z),  # −log σ(z): DPO
    "hinge": lambda z: torch.relu(1 - z),  # SLiC
    "squared": lambda z: (1 - z) ** 2,  # IPO-like
    "exponential": lambda z: torch.exp(-z),
    "truncated_quadratic": lambda z: torch.relu(1 - z) ** 2,
    "savage": lambda z: torch.sigmoid(-z) ** 2,  # 1 / (1 + e^z)²
}


def check_scalarization(name: str) -> str:
    """Return ``name`` if it is a known scalarization, else raise a SettingError (a ValueError)
    listing the valid."""
    if name not in SCALARIZATIONS:
        valid = ", ".join(SCALARIZATIONS)
        raise SettingError("scalarization", f"unknown scalarization {name!r}; valid: {valid}")
    return name


def scalarize(name: str, z: Tensor) -> Tensor:
    """Apply the scalarization ``name`` elementwise; unknown names list the valid ones."""
    return SCALARIZATIONS[check_scalarization(name)](z)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x < 0, stable on both sides of −log 2 (Mächler 2012; as TRL's ORPO)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))
