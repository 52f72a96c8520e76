"""L = Ψ(β·h − γ) and its variants: the GPO family (Tang et al., "Generalized Preference
Optimization", 2024) with DPO, cDPO, robust DPO, IPO, SLiC, SimPO, R-DPO and length-normalised
DPO. Each accepts every Ψ of :data:`~inspo.objectives.scalarizations.SCALARIZATIONS`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from inspo.objectives.base import MarginObjective, ObjectiveOutput, PairScores, Score, nll_mean
from inspo.settings import at_least, within


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
        within("label_smoothing", self.label_smoothing, 0.0, 0.5, "[)")

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

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least("nll_weight", self.nll_weight, 0)

    def loss(self, s: PairScores) -> ObjectiveOutput:
        z, nll = self.margin(s), nll_mean(s)
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

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least("alpha", self.alpha, 0)  # a negative α would reward length

    def margin(self, s: PairScores) -> Tensor:
        length_gap = (s.chosen_length - s.rejected_length).to(s.policy_chosen.dtype)
        return super().margin(s) + self.alpha * length_gap


class SigmoidNorm(MarginObjective):
    """Length-normalised DPO: L = −log σ(β·h̄) with the token-mean score.

    TRL: ``loss_type="sigmoid_norm"``.
    """

    score: ClassVar[Score] = "mean"
