"""The objectives' shared parts: typed inputs and outputs, the base class, the families.

An objective sees only numbers: the policy's and the reference's summed log-probabilities of
the chosen and the rejected response, and their lengths. It does not know in which context the
responses were scored. InSPO is therefore a property of the batch, not of the loss: the same
class trains the standard form (context = prompt) and the reflective form (context = prompt +
the other response).

Conventions:
    S      summed log-prob of a response; S̄ = S / |y| when ``score == "mean"``
    r(y)   = S_θ(y) − S_ref(y)           (S_ref = 0 for reference-free objectives)
    h      = r(y_w) − r(y_l)
    L      = Ψ(β·h − γ) (+ extras),   Ψ a scalarization from ``SCALARIZATIONS``

A parameter out of range raises :class:`~inspo.settings.SettingError` naming it, when the
objective is built (before any model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from inspo.objectives.scalarizations import SCALARIZATIONS, check_scalarization, scalarize
from inspo.settings import SettingError

Score = Literal["sum", "mean"]


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
    beta_may_be_zero: ClassVar[bool] = False
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
        check_beta(self)
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

    The argument exists so that a sweep over ``objective.scalarization`` fails loudly (a
    SettingError) instead of silently training the same loss under another name.
    """

    beta: float = 0.1
    scalarization: str | None = None

    def __post_init__(self) -> None:
        from inspo.objectives import PSI_OBJECTIVES

        check_beta(self)
        if self.scalarization is not None:
            raise SettingError(
                "scalarization",
                f"{type(self).__name__} is not of the form Ψ(margin) and takes no scalarization "
                f"(got {self.scalarization!r}); only scalarization=None is valid. Objectives "
                f"that accept one of {', '.join(SCALARIZATIONS)}: "
                f"{', '.join(sorted(PSI_OBJECTIVES))}",
            )


def nll_mean(s: PairScores) -> Tensor:
    """Token-mean negative log-likelihood of the chosen response, −S(y_w)/|y_w|."""
    return -s.policy_chosen / s.chosen_length.clamp(min=1)


def check_beta(objective: Objective) -> None:
    """β > 0 (≥ 0 where β weighs a term): a negative β turns the objective around, preferring
    the rejected response."""
    if objective.beta_may_be_zero and objective.beta >= 0:
        return
    if not objective.beta > 0:
        low = "at least 0" if objective.beta_may_be_zero else "> 0"
        raise SettingError("beta", f"must be {low}, got {objective.beta}")
