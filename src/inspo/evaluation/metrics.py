"""Comparing two policies' scored samples on the same prompts (sampling: :mod:`inspo.models.sampling`).

- ``win_rate``: wins (+½ per tie) of one set of scored samples over another on the same prompts,
  with a Wilson 95% interval.
- ``length_controlled_win_rate``: the win probability with the length difference regressed out
  (a logistic regression of win on Δlength, read at Δlength = 0, in the spirit of AlpacaEval 2),
  flagged as not identified when Δlength does not vary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def score(
    reward: Callable[[str, str], float], prompts: Sequence[str], responses: Sequence[str]
) -> list[float]:
    """``reward(prompt, response)`` for each pair."""
    return [reward(p, r) for p, r in zip(prompts, responses, strict=True)]


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (ties counted as half successes)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class WinRate:
    rate: float
    low: float
    high: float
    n: int
    wins: int
    ties: int


def win_rate(scores: Sequence[float], baseline: Sequence[float]) -> WinRate:
    """P(score > baseline) + ½·P(tie), paired by prompt, with a Wilson 95% interval."""
    if len(scores) != len(baseline) or not scores:
        raise ValueError("win_rate needs two equally long, non-empty lists of scores")
    wins = sum(a > b for a, b in zip(scores, baseline, strict=True))
    ties = sum(a == b for a, b in zip(scores, baseline, strict=True))
    n = len(scores)
    successes = wins + 0.5 * ties
    low, high = wilson_interval(successes, n)
    return WinRate(successes / n, low, high, n, wins, ties)


@dataclass(frozen=True)
class LengthControlled:
    """``rate``: the win probability at zero length difference when ``identified``; when the
    length difference does not vary, length cannot be separated from the policy's effect, and
    ``rate`` is the raw win rate with ``identified`` False."""

    rate: float
    identified: bool


def length_controlled_win_rate(
    scores: Sequence[float],
    baseline: Sequence[float],
    lengths: Sequence[float],
    baseline_lengths: Sequence[float],
    steps: int = 500,
) -> LengthControlled:
    """Win probability at zero length difference.

    Fits P(win) = σ(a + b·Δ), Δ = (len − len_baseline)/sd, by maximum likelihood (ties are
    half wins), and returns σ(a): how often the policy would win if its responses were as long
    as the baseline's. A policy that wins only by being longer (or shorter) loses that edge.
    When Δ is the same for every prompt (a constant gap, or equal lengths), a and b cannot be
    told apart: the result is the raw win rate, flagged ``identified=False``.
    """
    y = torch.tensor(
        [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline, strict=True)],
        dtype=torch.float64,
    )
    f64 = torch.float64
    d = torch.tensor(lengths, dtype=f64) - torch.tensor(baseline_lengths, dtype=f64)
    if len(d) < 2 or bool((d == d[0]).all()):
        return LengthControlled(float(y.mean()), identified=False)
    d = d / d.std()
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = w[0] + w[1] * d
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        loss = bce + 1e-4 * w.pow(2).sum()  # a whisper of L2 keeps separable data finite
        loss.backward()
        return loss

    opt.step(closure)
    return LengthControlled(float(torch.sigmoid(w[0].detach())), identified=True)
