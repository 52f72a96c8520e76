"""Losses of a fixed form, not Ψ(margin): EXO, NCA, SPPO, APO and DiscoPOP. Each takes only
``scalarization=None``, so a sweep over Ψ fails loudly on them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inspo.objectives.base import FixedFormObjective, ObjectiveOutput, PairScores
from inspo.settings import SettingError, positive


@dataclass(eq=False)
class EXOPair(FixedFormObjective):
    """EXO (pairwise): L = KL(q ‖ p) over {y_w, y_l}, q = softmax(β·r), p = (1−ε, ε).

    Ji et al., "Towards Efficient Exact Optimization of Language Model Alignment", ICML 2024
    (eq. 16). TRL: ``loss_type="exo_pair"`` with ``label_smoothing`` = ε > 0 (paper: 1e-3).
    """

    label_smoothing: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.label_smoothing < 1.0:
            raise SettingError(
                "label_smoothing", f"EXO needs it in (0, 1), got {self.label_smoothing}"
            )

    def loss(self, s: PairScores) -> ObjectiveOutput:
        rw, rl = self.log_ratios(s)
        z, eps = self.beta * (rw - rl), self.label_smoothing
        log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)
        losses = log_qw.exp() * (log_qw - math.log1p(-eps)) + log_ql.exp() * (
            log_ql - math.log(eps)
        )
        return self.output(losses, s)


class NCAPair(FixedFormObjective):
    """NCA (pairwise): L = −log σ(β·r_w) − ½·log σ(−β·r_w) − ½·log σ(−β·r_l).

    Chen et al., "Noise Contrastive Alignment of Language Models with Explicit Rewards",
    NeurIPS 2024. TRL: ``loss_type="nca_pair"``.
    """

    def loss(self, s: PairScores) -> ObjectiveOutput:
        rw, rl = self.log_ratios(s)
        cw, cl = self.beta * rw, self.beta * rl
        losses = -F.logsigmoid(cw) - 0.5 * F.logsigmoid(-cw) - 0.5 * F.logsigmoid(-cl)
        return self.output(losses, s)


class SPPOHard(FixedFormObjective):
    """SPPO with hard labels: L = (r_w − 1/(2β))² + (r_l + 1/(2β))².

    Wu et al., "Self-Play Preference Optimization for Language Model Alignment", 2024 (eq. 4.7
    with P = 1 for the winner, 0 for the loser). TRL: ``loss_type="sppo_hard"``.
    """

    def loss(self, s: PairScores) -> ObjectiveOutput:
        rw, rl = self.log_ratios(s)
        return self.output((rw - 0.5 / self.beta) ** 2 + (rl + 0.5 / self.beta) ** 2, s)


class APOZero(FixedFormObjective):
    """APO-zero: L = (1 − σ(β·r_w)) + σ(β·r_l): raise the chosen, lower the rejected.

    D'Oosterlinck et al., "Anchored Preference Optimization and Contrastive Revisions", 2024
    (eq. 7). TRL: ``loss_type="apo_zero"``.
    """

    def loss(self, s: PairScores) -> ObjectiveOutput:
        rw, rl = self.log_ratios(s)
        return self.output(1 - torch.sigmoid(self.beta * rw) + torch.sigmoid(self.beta * rl), s)


class APODown(FixedFormObjective):
    """APO-down: L = σ(β·r_w) + (1 − σ(β·(r_w − r_l))): lower both, the rejected more.

    D'Oosterlinck et al., 2024 (eq. 8). TRL: ``loss_type="apo_down"``.
    """

    def loss(self, s: PairScores) -> ObjectiveOutput:
        rw, rl = self.log_ratios(s)
        losses = torch.sigmoid(self.beta * rw) + 1 - torch.sigmoid(self.beta * (rw - rl))
        return self.output(losses, s)


@dataclass(eq=False)
class DiscoPOP(FixedFormObjective):
    """DiscoPOP (log-ratio modulated loss): with z = β·h and w = σ(z/τ),
    L = (1 − w)·(−log σ(z)) + w·e^−z.

    Chris Lu et al., "Discovering Preference Optimization Algorithms with and for Large Language
    Models", NeurIPS 2024 (eq. 5). TRL: ``loss_type="discopop"`` (``discopop_tau`` = τ = 0.05).

    Not monotone: as the paper notes, the loss is non-convex, and for τ = 0.05 its gradient
    pushes the margin *down* for z ∈ (−0.118, 0.072) (a local minimum near z ≈ −0.12); outside
    that band it raises the margin. This is the published loss, identical to TRL's.
    """

    tau: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("tau", self.tau)

    def loss(self, s: PairScores) -> ObjectiveOutput:
        rw, rl = self.log_ratios(s)
        z = self.beta * (rw - rl)
        w = torch.sigmoid(z / self.tau)
        return self.output((1 - w) * -F.logsigmoid(z) + w * torch.exp(-z), s)
