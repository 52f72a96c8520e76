"""Preference objectives: each a small class mapping per-pair sequence scores to per-pair losses.

An objective sees only numbers: the policy's and the reference's summed log-probabilities of
the chosen and the rejected response, and their lengths. It does not know in which context the
responses were scored. InSPO is therefore a property of the batch, not of the loss:
the same class trains the standard form (context = prompt) and the reflective form (context =
prompt + the other response).

Conventions:
    S      summed log-prob of a response; S̄ = S / |y| when ``score == "mean"``
    r(y)   = S_θ(y) − S_ref(y)           (S_ref = 0 for reference-free objectives)
    h      = r(y_w) − r(y_l)
    L      = Ψ(β·h − γ) (+ extras),   Ψ a scalarization from ``SCALARIZATIONS``
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Score = Literal["sum", "mean"]


# --------------------------------------------------------------------------- scalarizations
# Ψ(z) for z = β·h − γ. Each is convex and decreasing around the origin, so minimising it pushes
# the margin up. Written with softplus/clamp so they are finite for large |z|.
SCALARIZATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "logistic": lambda z: F.softplus(-z),  # −log σ(z): DPO
    "hinge": lambda z: torch.relu(1 - z),  # SLiC
    "squared": lambda z: (1 - z) ** 2,  # IPO-like
    "exponential": lambda z: torch.exp(-z),
    "truncated_quadratic": lambda z: torch.relu(1 - z) ** 2,
    "savage": lambda z: torch.sigmoid(-z) ** 2,  # 1 / (1 + e^z)²
}


def check_scalarization(name: str) -> str:
    """Return ``name`` if it is a known scalarization, else raise a ValueError listing the valid."""
    if name not in SCALARIZATIONS:
        raise ValueError(f"unknown scalarization {name!r}; valid: {', '.join(SCALARIZATIONS)}")
    return name


def scalarize(name: str, z: Tensor) -> Tensor:
    """Apply the scalarization ``name`` elementwise; unknown names list the valid ones."""
    return SCALARIZATIONS[check_scalarization(name)](z)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x < 0, stable on both sides of −log 2 (Mächler 2012; as TRL's ORPO)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


# --------------------------------------------------------------------------- typed I/O
@dataclass
class PairScores:
    """Per-pair inputs to an objective; every tensor has shape [B].

    ``policy_*`` and ``reference_*`` are *summed* token log-probabilities of the response given
    its context; ``*_length`` is the number of scored tokens. The reference tensors are zeros
    for reference-free objectives (no reference forward is run for them).
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    reference_chosen: Tensor
    reference_rejected: Tensor
    chosen_length: Tensor
    rejected_length: Tensor


@dataclass
class ObjectiveOutput:
    """Per-pair losses (differentiable) and detached per-pair rewards.

    ``chosen_rewards``/``rejected_rewards`` follow TRL: β·(score_θ − score_ref) under the
    objective's own score. ``metrics`` holds extra detached per-pair values, logged by name.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Objective:
    """Base class. Subclasses set the class flags and implement :meth:`loss`.

    Flags:
        requires_reference: False for reference-free objectives (SimPO, ORPO, SFT); the module
            then skips the reference forward and passes zeros (which are ignored anyway).
        pairwise: False when the rejected response is not used (SFT); the module then scores
            only the chosen sequences.
        score: "sum" or "mean" (length-normalised: the sum over |y|).
    """

    requires_reference: ClassVar[bool] = True
    pairwise: ClassVar[bool] = True
    score: Score = "sum"
    beta: float = 1.0
    scalarization: str | None = None

    def __call__(self, s: PairScores) -> ObjectiveOutput:
        return self.loss(s)

    # State that training carries (BCO-pair's running reward mean): kept in checkpoints, and
    # averaged over data-parallel processes through ``all_mean``, which the training module
    # binds to its strategy (identity on one process).
    all_mean: Callable[[Tensor], Tensor] = staticmethod(lambda t: t)

    def state_dict(self) -> dict[str, float]:
        return {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")

    def loss(self, s: PairScores) -> ObjectiveOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    # Helpers shared by most objectives -------------------------------------------------
    def scores(self, s: PairScores) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(policy_w, policy_l, ref_w, ref_l) under this objective's score (sum or mean).

        Reference-free objectives get zeros for the reference, whatever the batch holds.
        """
        rw, rl = s.reference_chosen, s.reference_rejected
        if not self.requires_reference:
            rw, rl = torch.zeros_like(s.policy_chosen), torch.zeros_like(s.policy_rejected)
        if self.score == "sum":
            return s.policy_chosen, s.policy_rejected, rw, rl
        lw, ll = s.chosen_length.clamp(min=1), s.rejected_length.clamp(min=1)
        return s.policy_chosen / lw, s.policy_rejected / ll, rw / lw, rl / ll

    def log_ratios(self, s: PairScores) -> tuple[Tensor, Tensor]:
        """r(y_w), r(y_l): the implicit rewards before β."""
        pw, pl, rw, rl = self.scores(s)
        return pw - rw, pl - rl

    def output(self, losses: Tensor, s: PairScores, **metrics: Tensor) -> ObjectiveOutput:
        """Wrap per-pair ``losses`` with the TRL-style rewards β·r(y) and detached metrics."""
        rw, rl = self.log_ratios(s)
        detached = {k: v.detach() for k, v in metrics.items()}
        return ObjectiveOutput(
            losses, (self.beta * rw).detach(), (self.beta * rl).detach(), detached
        )

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


@dataclass(eq=False)  # objectives compare by identity, as plain objects
class PsiObjective(Objective):
    """An objective of the form Ψ(·): it accepts every scalarization Ψ (``SCALARIZATIONS``),
    ``default_scalarization`` being its classic one."""

    beta: float = 0.1
    scalarization: str | None = None
    default_scalarization: ClassVar[str] = "logistic"
    base: ClassVar[bool] = True  # an abstract family, not an objective to train

    def __post_init__(self) -> None:
        self.scalarization = check_scalarization(self.scalarization or self.default_scalarization)

    def psi(self, z: Tensor) -> Tensor:
        return scalarize(self.scalarization, z)


@dataclass(eq=False)
class MarginObjective(PsiObjective):
    """L = Ψ(β·h − γ): the GPO family (Tang et al., "Generalized Preference Optimization", 2024).

    Subclasses change the defaults (``default_scalarization``, ``score``) or add terms.
    """

    gamma: float = 0.0
    base: ClassVar[bool] = True

    def margin(self, s: PairScores) -> Tensor:
        """z = β·h − γ, the argument of Ψ."""
        rw, rl = self.log_ratios(s)
        return self.beta * (rw - rl) - self.gamma

    def loss(self, s: PairScores) -> ObjectiveOutput:
        z = self.margin(s)
        return self.output(self.psi(z), s, z=z)


@dataclass(eq=False)
class FixedFormObjective(Objective):
    """An objective whose loss is not Ψ(margin): only ``scalarization=None`` is accepted.

    The argument exists so that a sweep over ``objective.scalarization`` fails loudly (ValueError)
    instead of silently training the same loss under another name.
    """

    beta: float = 0.1
    scalarization: str | None = None

    def __post_init__(self) -> None:
        if self.scalarization is not None:
            raise ValueError(
                f"{type(self).__name__} is not of the form Ψ(margin) and takes no scalarization "
                f"(got {self.scalarization!r}); only scalarization=None is valid. Objectives "
                f"that accept one of {', '.join(SCALARIZATIONS)}: "
                f"{', '.join(sorted(PSI_OBJECTIVES))}"
            )


# --------------------------------------------------------------------------- Ψ(margin) family
class DPO(MarginObjective):
    """Direct Preference Optimization: L = −log σ(β·h).

    Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward
    Model", NeurIPS 2023. TRL: ``loss_type="sigmoid"``.
    """


@dataclass(eq=False)
class CDPO(MarginObjective):
    """Conservative DPO (label smoothing ε): L = (1−ε)·Ψ(z) + ε·Ψ(−z), z = β·h − γ.

    Mitchell, "A note on DPO with noisy preferences & relationship to IPO", 2023. TRL ≤ 0.x
    had this as ``loss_type="sigmoid"`` with ``label_smoothing``; TRL 1.16's ``sigmoid`` ignores ε,
    so there is no TRL 1.16 equivalent (ε = 0 is DPO).
    """

    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")

    def loss(self, s: PairScores) -> ObjectiveOutput:
        z, eps = self.margin(s), self.label_smoothing
        return self.output((1 - eps) * self.psi(z) + eps * self.psi(-z), s, z=z)


class Robust(CDPO):
    """Robust DPO: L = [(1−ε)·Ψ(z) − ε·Ψ(−z)] / (1 − 2ε), an unbiased loss under label flips.

    Chowdhury et al., "Provably Robust DPO: Aligning Language Models with Noisy Feedback",
    ICML 2024. TRL: ``loss_type="robust"`` (``label_smoothing`` = ε, in [0, 0.5)).
    """

    def loss(self, s: PairScores) -> ObjectiveOutput:
        z, eps = self.margin(s), self.label_smoothing
        losses = ((1 - eps) * self.psi(z) - eps * self.psi(-z)) / (1 - 2 * eps)
        return self.output(losses, s, z=z)


class IPO(MarginObjective):
    """Identity Preference Optimisation: L = (h̄ − 1/(2τ))², τ = β, token-mean score.

    Azar et al., "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    AISTATS 2024 (eq. 17). TRL: ``loss_type="ipo"`` (which normalises by length, as here).

    Since (h̄ − 1/(2τ))² = (1 − 2τ·h̄)² / (4τ²), IPO is Ψ(z)/(4τ²) with z = 2τ·h̄ − γ and the
    classic Ψ = squared. Any other Ψ is applied the same way: L = Ψ(2τ·h̄ − γ)/(4τ²).
    """

    default_scalarization: ClassVar[str] = "squared"
    score: ClassVar[Score] = "mean"

    def margin(self, s: PairScores) -> Tensor:
        rw, rl = self.log_ratios(s)
        return 2 * self.beta * (rw - rl) - self.gamma

    def loss(self, s: PairScores) -> ObjectiveOutput:
        z = self.margin(s)
        return self.output(self.psi(z) / (4 * self.beta**2), s, z=z)


@dataclass(eq=False)
class SLiC(MarginObjective):
    """SLiC-HF: L = max(0, 1 − β·h) + λ·NLL_mean(y_w).

    Zhao et al., "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", 2023. TRL:
    ``loss_type="hinge"`` (λ = 0). The NLL term is token-mean, as :class:`SFT`.
    """

    nll_weight: float = 0.0
    default_scalarization: ClassVar[str] = "hinge"

    def loss(self, s: PairScores) -> ObjectiveOutput:
        z, nll = self.margin(s), _nll_mean(s)
        return self.output(self.psi(z) + self.nll_weight * nll, s, z=z, nll=nll)


@dataclass(eq=False)
class SimPO(MarginObjective):
    """SimPO: L = −log σ(β·(S̄(y_w) − S̄(y_l)) − γ), reference-free, token-mean score.

    Meng et al., "SimPO: Simple Preference Optimization with a Reference-Free Reward", NeurIPS
    2024 (defaults β = 2, γ = 1: γ/β = 0.5). TRL: ``CPOTrainer(loss_type="simpo")`` with
    ``simpo_gamma`` = γ and ``cpo_alpha = 0``.
    """

    beta: float = 2.0
    gamma: float = 1.0
    requires_reference: ClassVar[bool] = False
    score: ClassVar[Score] = "mean"


@dataclass(eq=False)
class RDPO(MarginObjective):
    """R-DPO: L = −log σ(β·h + α·(|y_w| − |y_l|)), so the policy does not learn length.

    Park et al., "Disentangling Length from Quality in Direct Preference Optimization", 2024.
    From max E[r(x, y)] − α|y| − β·KL, the implicit reward is β·log(π/π_ref) + α|y|. A pair
    whose chosen response is the longer one is then already partly explained by length, so
    it gets a smaller gradient; a pair whose chosen response is shorter gets a larger one.
    Fitted on labels that do not depend on length, the policy's log-ratio comes out with a
    length slope of about −α/β: it penalises length. No TRL equivalent.
    """

    alpha: float = 0.01

    def margin(self, s: PairScores) -> Tensor:
        length_gap = (s.chosen_length - s.rejected_length).to(s.policy_chosen.dtype)
        return super().margin(s) + self.alpha * length_gap


class SigmoidNorm(MarginObjective):
    """Length-normalised DPO: L = −log σ(β·h̄) with the token-mean score.

    TRL: ``loss_type="sigmoid_norm"``.
    """

    score: ClassVar[Score] = "mean"


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


# --------------------------------------------------------------------------- fixed forms
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
            raise ValueError(f"EXO needs label_smoothing in (0, 1), got {self.label_smoothing}")

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

    def loss(self, s: PairScores) -> ObjectiveOutput:
        rw, rl = self.log_ratios(s)
        z = self.beta * (rw - rl)
        w = torch.sigmoid(z / self.tau)
        return self.output((1 - w) * -F.logsigmoid(z) + w * torch.exp(-z), s)


def _nll_mean(s: PairScores) -> Tensor:
    """Token-mean negative log-likelihood of the chosen response, −S(y_w)/|y_w|."""
    return -s.policy_chosen / s.chosen_length.clamp(min=1)


@dataclass(eq=False)
class SFT(Objective):
    """Supervised fine-tuning: the negative log-likelihood of the chosen response.

    Used for the SFT stage and as an auxiliary term (RPO). Reference-free and not pairwise.
    ``token_mean`` says over what the token mean is taken:

    - ``"pair"`` (default): each pair's own token mean, −S(y_w)/|y_w|, so a long and a short
      response weigh the same in the batch mean;
    - ``"batch"``: every chosen token of the batch weighs the same, −Σ S(y_w) / Σ |y_w|, as
      TRL's ``loss_type="sft"`` (per device under data parallelism, as TRL). Its per-pair
      losses are −S_i·B / Σ_j |y_j|, whose mean is that batch value.

    The two agree when all chosen responses have the same length (or B = 1).
    """

    scalarization: str | None = None
    token_mean: Literal["pair", "batch"] = "pair"
    requires_reference: ClassVar[bool] = False
    pairwise: ClassVar[bool] = False
    score: ClassVar[Score] = "mean"

    def __post_init__(self) -> None:
        if self.scalarization is not None:
            raise ValueError(f"SFT takes no scalarization (got {self.scalarization!r})")
        if self.token_mean not in ("pair", "batch"):
            raise ValueError(f"SFT token_mean must be 'pair' or 'batch', got {self.token_mean!r}")

    def loss(self, s: PairScores) -> ObjectiveOutput:
        nll = _nll_mean(s)
        losses = nll
        if self.token_mean == "batch":
            tokens = s.chosen_length.sum().clamp(min=1).to(s.policy_chosen.dtype)
            losses = -s.policy_chosen * s.policy_chosen.shape[0] / tokens
        zero = torch.zeros_like(nll)
        return ObjectiveOutput(losses, (-nll).detach(), zero, {"nll": nll.detach()})


# --------------------------------------------------------------------------- combinations
class Combo(Objective):
    """A weighted sum of objectives, L = Σ_k w_k·L_k, e.g. RPO = DPO + α·NLL.

    Pang et al., "Iterative Reasoning Preference Optimization", 2024 (RPO); TRL:
    ``loss_type=["sigmoid", "sft"]`` with ``loss_weights=[1, α]``.

    ``terms`` is a list of ``{"objective": ..., "weight": float}``; an objective may be given
    instantiated or as a (Dict)Config with ``_target_``, built here. A Combo config sets
    ``_recursive_: false`` so that Hydra hands the terms over as configs: an objective is a
    dataclass, which OmegaConf would turn back into a config inside the list.
    ``requires_reference``/``pairwise`` are true if any term's is; rewards and ``score`` come
    from the first pairwise term. Each term's metrics are logged as ``"{k}/{name}"`` plus
    ``"{k}/loss"``.
    """

    def __init__(self, terms: list) -> None:
        self.terms: list[tuple[Objective, float]] = []
        for term in terms:
            obj, weight = term["objective"], float(term.get("weight", 1.0))
            if not isinstance(obj, Objective):
                from hydra.utils import instantiate

                obj = instantiate(obj)
            self.terms.append((obj, weight))
        if not self.terms:
            raise ValueError("Combo needs at least one term")
        self.requires_reference = any(o.requires_reference for o, _ in self.terms)
        self.pairwise = any(o.pairwise for o, _ in self.terms)
        lead = next((o for o, _ in self.terms if o.pairwise), self.terms[0][0])
        self.score, self.beta, self.scalarization = lead.score, lead.beta, lead.scalarization
        self._lead = lead

    def state_dict(self) -> dict[str, dict]:
        return {str(k): o.state_dict() for k, (o, _) in enumerate(self.terms) if o.state_dict()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for k, (o, _) in enumerate(self.terms):
            o.load_state_dict(state.get(str(k), {}))

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name == "all_mean":  # the terms average over the same processes
            for o, _ in getattr(self, "terms", ()):
                o.all_mean = value

    def loss(self, s: PairScores) -> ObjectiveOutput:
        losses, metrics, lead_out = 0.0, {}, None
        for k, (obj, weight) in enumerate(self.terms):
            out = obj(s)
            losses = losses + weight * out.losses
            metrics[f"{k}/loss"] = out.losses.detach()
            metrics.update({f"{k}/{name}": v for name, v in out.metrics.items()})
            if obj is self._lead and lead_out is None:
                lead_out = out
        assert lead_out is not None
        return ObjectiveOutput(losses, lead_out.chosen_rewards, lead_out.rejected_rewards, metrics)

    def __repr__(self) -> str:
        return f"Combo({', '.join(f'{w}*{o!r}' for o, w in self.terms)})"


def _concrete(cls: type) -> list[type]:
    """``cls``'s subclasses defined here, families (``base``) left out."""
    out = [] if vars(cls).get("base") else [cls]
    for sub in cls.__subclasses__():
        if sub.__module__ == __name__:
            out += _concrete(sub)
    return out


#: The objectives whose ``scalarization`` may be any name of ``SCALARIZATIONS``.
PSI_OBJECTIVES: frozenset[str] = frozenset(c.__name__ for c in _concrete(PsiObjective))


# --------------------------------------------------------------------------- reward models
class RewardObjective:
    """Base class of the losses that train a reward model r(x, y), a scalar per sequence (a
    head on the causal LM's last token: :mod:`inspo.models.reward`), instead of a policy.

    Choosing one (``objective=bradley_terry``) makes ``inspo-train`` train a reward model
    (:mod:`inspo.training.reward`). Like a reference-free objective, it has no reference.
    """

    requires_reference: ClassVar[bool] = False
    pairwise: ClassVar[bool] = True
    scalarization: str | None = None

    def __call__(self, chosen: Tensor, rejected: Tensor, margin: Tensor | None = None) -> Tensor:
        """Per-pair losses from the rewards of the chosen and the rejected rows [B] and the
        data's per-pair margins (None when the data has none)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def state_dict(self) -> dict[str, float]:
        return {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")


@dataclass(eq=False)
class BradleyTerry(RewardObjective):
    """L = −log σ(r(x, y_w) − r(x, y_l) − m) + c·(r(x, y_w) + r(x, y_l))².

    Bradley & Terry, "Rank Analysis of Incomplete Block Designs", 1952; as a reward model's
    loss, Ouyang et al., "Training language models to follow instructions with human
    feedback", 2022 (eq. 1). The margin m is the data's ``margin`` column when it has one
    (Touvron et al., "Llama 2", 2023: a larger margin for a clearer preference), else 0.
    ``center_rewards_coefficient`` c pulls the rewards towards mean zero (Eisenstein et al.,
    "Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking",
    2023, eq. 2); None is 0. TRL: ``RewardTrainer`` (its ``margin`` column and
    ``center_rewards_coefficient``), whose batch loss is the mean of these per-pair losses.
    """

    center_rewards_coefficient: float | None = None

    def __call__(self, chosen: Tensor, rejected: Tensor, margin: Tensor | None = None) -> Tensor:
        z = chosen - rejected
        if margin is not None:
            z = z - margin.to(z.dtype)
        losses = F.softplus(-z)  # −log σ(z), finite for large |z|
        if self.center_rewards_coefficient:
            losses = losses + self.center_rewards_coefficient * (chosen + rejected) ** 2
        return losses
