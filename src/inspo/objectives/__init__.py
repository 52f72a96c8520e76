"""Preference objectives: each a small typed class mapping per-pair sequence scores to per-pair
losses, grouped by family.

- :mod:`~inspo.objectives.base`: :class:`PairScores` in, :class:`ObjectiveOutput` (per-pair
  losses) out, the :class:`Objective` base class and the families;
- :mod:`~inspo.objectives.scalarizations`: the Ψ of the GPO family;
- :mod:`~inspo.objectives.margin`: L = Ψ(β·h − γ) and its variants (DPO, cDPO, robust DPO, IPO,
  SLiC, SimPO, R-DPO, length-normalised DPO);
- :mod:`~inspo.objectives.psi`: Ψ of another quantity (ORPO, AOT, pairwise BCO);
- :mod:`~inspo.objectives.fixed`: fixed-form losses (EXO, NCA, SPPO, APO, DiscoPOP);
- :mod:`~inspo.objectives.sft` and :mod:`~inspo.objectives.combo`: SFT, and weighted sums (RPO);
- :mod:`~inspo.objectives.reward`: a reward model's losses (Bradley–Terry), not a policy's.

Every class is importable from here (``inspo.objectives.DPO``), which is what the ``_target_``
of ``conf/objective/*.yaml`` names.
"""

from __future__ import annotations

from inspo.objectives.base import (
    FixedFormObjective,
    MarginObjective,
    Objective,
    ObjectiveOutput,
    PairScores,
    PsiObjective,
    Score,
    nll_mean,
)
from inspo.objectives.combo import Combo
from inspo.objectives.fixed import APODown, APOZero, DiscoPOP, EXOPair, NCAPair, SPPOHard
from inspo.objectives.margin import CDPO, DPO, IPO, RDPO, Robust, SigmoidNorm, SimPO, SLiC
from inspo.objectives.psi import AOT, ORPO, BCOPair
from inspo.objectives.reward import BradleyTerry, RewardObjective
from inspo.objectives.scalarizations import (
    SCALARIZATIONS,
    check_scalarization,
    log1mexp,
    scalarize,
)
from inspo.objectives.sft import SFT

__all__ = [
    "AOT", "CDPO", "DPO", "IPO", "ORPO", "PSI_OBJECTIVES", "RDPO", "SCALARIZATIONS", "SFT",
    "APODown", "APOZero", "BCOPair", "BradleyTerry", "Combo", "DiscoPOP", "EXOPair",
    "FixedFormObjective", "MarginObjective", "NCAPair", "Objective", "ObjectiveOutput",
    "PairScores", "PsiObjective", "RewardObjective", "Robust", "SLiC", "SPPOHard", "Score",
    "SigmoidNorm", "SimPO", "check_scalarization", "log1mexp", "nll_mean", "scalarize",
]  # fmt: skip


def _concrete(cls: type) -> list[type]:
    """``cls``'s subclasses defined in this package, families (``base``) left out."""
    out = [] if vars(cls).get("base") else [cls]
    for sub in cls.__subclasses__():
        if sub.__module__.startswith(__name__ + "."):
            out += _concrete(sub)
    return out


#: The objectives whose ``scalarization`` may be any name of ``SCALARIZATIONS``.
PSI_OBJECTIVES: frozenset[str] = frozenset(c.__name__ for c in _concrete(PsiObjective))
