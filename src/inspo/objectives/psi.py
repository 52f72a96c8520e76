"""Ψ applied to something other than the pair's margin: ORPO (log odds of the policy alone),
AOT (the batch's sorted margins) and pairwise BCO (rewards shifted by their running mean). Each
accepts every Ψ of :data:`~inspo.objectives.scalarizations.SCALARIZATIONS`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from inspo.objectives.base import ObjectiveOutput, PairScores, PsiObjective, Score
from inspo.objectives.scalarizations import log1mexp
from inspo.settings import within


@dataclass(eq=False)
class ORPO(PsiObjective):
    """ORPO: L = NLL_mean(y_w) + λ·Ψ(log odds(y_w) − log odds(y_l)), classic Ψ = logistic.

    Hong et al., "ORPO: Monolithic Preference Optimization without Reference Model", EMNLP 2024.
    odds(y) = p/(1−p) with p = exp(S̄(y)); log odds = S̄ − log(1 − e^S̄), computed with
    :func:`log1mexp`. λ is ``beta`` (TRL ``ORPOConfig.beta``). TRL: ``ORPOTrainer``, whose
    ``odds_ratio_loss`` returns λ·log σ(·) (the negated pairwise term). S̄ is clamped to
    ≤ −1e-6 inside the odds (TRL does not clamp; it returns inf/NaN at S̄ = 0).
    """

    requires_reference: ClassVar[bool] = False
    score: ClassVar[Score] = "mean"
    eps: ClassVar[float] = 1e-6
    beta_may_be_zero: ClassVar[bool] = True  # λ = 0: the NLL term alone

    def loss(self, s: PairScores) -> ObjectiveOutput:
        pw, pl, _, _ = self.scores(s)
        nll = -pw
        # p = 1 exactly (S̄ = 0, e.g. a one-token response in float32) would give infinite odds
        pw, pl = pw.clamp(max=-self.eps), pl.clamp(max=-self.eps)
        log_odds = (pw - pl) - (log1mexp(pw) - log1mexp(pl))
        losses = nll + self.beta * self.psi(log_odds)
        return self.output(losses, s, log_odds=log_odds, nll=nll)


@dataclass(eq=False)
class AOT(PsiObjective):
    """Alignment via Optimal Transport: cDPO's loss on the *sorted* margins of the batch.

    Melnyk et al., "Distributional Preference Alignment of LLMs via Optimal Transport", NeurIPS
    2024. Paired (TRL ``loss_type="aot"``): δ = sort(S_θ(y_w) − S_θ(y_l)) −
    sort(S_ref(y_w) − S_ref(y_l)); unpaired (``"aot_unpaired"``): δ = sort(r(y_w)) − sort(r(y_l)).
    L_i = (1−ε)·Ψ(β·δ_i) + ε·Ψ(−β·δ_i). The i-th loss belongs to the i-th *quantile*, not to
    pair i; only the batch mean is meaningful.
    """

    label_smoothing: float = 0.0
    paired: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        within("label_smoothing", self.label_smoothing, 0.0, 0.5, "[)")

    def loss(self, s: PairScores) -> ObjectiveOutput:
        pw, pl, rw, rl = self.scores(s)
        if self.paired:
            delta = torch.sort(pw - pl, dim=0)[0] - torch.sort(rw - rl, dim=0)[0]
        else:
            delta = torch.sort(pw - rw, dim=0)[0] - torch.sort(pl - rl, dim=0)[0]
        z, eps = self.beta * delta, self.label_smoothing
        return self.output((1 - eps) * self.psi(z) + eps * self.psi(-z), s)


@dataclass(eq=False)
class BCOPair(PsiObjective):
    """Binary Classifier Optimization, pairwise: L = Ψ(β·r(y_w) − δ) + Ψ(−(β·r(y_l) − δ)).

    Jung et al., "Binary Classifier Optimization for Large Language Model Alignment", 2024.
    TRL 1.16: ``loss_type="bco_pair"``, which has **no** reward shift (δ = 0); this is the
    default (``running_mean=False``), so values match TRL 1.16. With ``running_mean=True`` the
    object keeps the paper's shift as state, as TRL ≤ 0.x did with ``RunningMoments``: at each
    call with grad enabled (training), the batch mean of the rewards m = mean(β·r(y_w) ∪
    β·r(y_l)), averaged over data-parallel processes (``all_mean``, as TRL gathers it), updates
    δ ← δ + (m − δ)/n (n = number of updates so far: δ is the running mean of batch means),
    *then* the loss uses the updated δ. Under ``torch.no_grad`` (evaluation) δ is read, not
    updated. δ and n are training state: saved in checkpoints, so a resumed run continues them.
    Classic Ψ = logistic.
    """

    running_mean: bool = False
    delta: float = field(default=0.0, init=False)
    count: int = field(default=0, init=False)

    def loss(self, s: PairScores) -> ObjectiveOutput:
        rw, rl = self.log_ratios(s)
        cw, cl = self.beta * rw, self.beta * rl
        if self.running_mean and torch.is_grad_enabled():
            m = float(self.all_mean(torch.cat([cw, cl]).mean().detach()))
            self.count += 1
            self.delta += (m - self.delta) / self.count
        delta = self.delta if self.running_mean else 0.0
        losses = self.psi(cw - delta) + self.psi(-(cl - delta))
        return self.output(losses, s, delta=torch.full_like(cw, delta))

    def state_dict(self) -> dict[str, float]:
        return {"delta": self.delta, "count": self.count} if self.running_mean else {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.delta = float(state.get("delta", 0.0))
        self.count = int(state.get("count", 0))
