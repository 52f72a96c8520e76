"""Supervised fine-tuning: the NLL of the chosen response, alone or as a term (RPO, SLiC)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from inspo.objectives.base import Objective, ObjectiveOutput, PairScores, Score, nll_mean
from inspo.settings import SettingError


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
            raise SettingError("scalarization", f"SFT takes none (got {self.scalarization!r})")
        if self.token_mean not in ("pair", "batch"):
            raise SettingError("token_mean", f"must be 'pair' or 'batch', got {self.token_mean!r}")

    def loss(self, s: PairScores) -> ObjectiveOutput:
        nll = nll_mean(s)
        losses = nll
        if self.token_mean == "batch":
            tokens = s.chosen_length.sum().clamp(min=1).to(s.policy_chosen.dtype)
            losses = -s.policy_chosen * s.policy_chosen.shape[0] / tokens
        zero = torch.zeros_like(nll)
        return ObjectiveOutput(losses, (-nll).detach(), zero, {"nll": nll.detach()})
