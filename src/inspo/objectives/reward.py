"""Losses of a reward model r(x, y), a scalar per sequence, instead of a policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from inspo.settings import at_least


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

    def __post_init__(self) -> None:
        at_least("center_rewards_coefficient", self.center_rewards_coefficient, 0)

    def __call__(self, chosen: Tensor, rejected: Tensor, margin: Tensor | None = None) -> Tensor:
        z = chosen - rejected
        if margin is not None:
            z = z - margin.to(z.dtype)
        losses = F.softplus(-z)  # −log σ(z), finite for large |z|
        if self.center_rewards_coefficient:
            losses = losses + self.center_rewards_coefficient * (chosen + rejected) ** 2
        return losses
