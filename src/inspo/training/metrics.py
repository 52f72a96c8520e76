"""The pair metrics a step logs, under TRL's names (defined in :mod:`inspo.names`)."""

from __future__ import annotations

import functools
import operator

from torch import Tensor

from inspo.models.scoring import TokenCount, ViewScores
from inspo.names import (
    LOGPS_CHOSEN,
    LOGPS_REJECTED,
    LOSS,
    REWARDS_ACCURACIES,
    REWARDS_CHOSEN,
    REWARDS_MARGINS,
    REWARDS_REJECTED,
    TOKENS_COMPUTED,
    TOKENS_PADDING_SHARE,
)
from inspo.objectives import ObjectiveOutput

#: Shown in the progress bar.
PROGRESS = (LOSS, REWARDS_ACCURACIES)


def pair_metrics(
    loss: Tensor, out: ObjectiveOutput, policy: ViewScores, extra: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Batch means: the loss, TRL's rewards/* and logps/*, the objective's own per-pair metrics
    and ``extra`` (the loss mix's terms)."""
    margins = out.chosen_rewards - out.rejected_rewards
    return {
        LOSS: loss.detach(),
        REWARDS_CHOSEN: out.chosen_rewards.mean(),
        REWARDS_REJECTED: out.rejected_rewards.mean(),
        REWARDS_MARGINS: margins.mean(),
        REWARDS_ACCURACIES: (margins > 0).float().mean(),
        LOGPS_CHOSEN: policy.chosen.detach().mean(),
        LOGPS_REJECTED: policy.rejected.detach().mean(),
        **{k: v.mean() for k, v in out.metrics.items()},
        **extra,
    }


def token_metrics(tokens: dict[str, TokenCount]) -> dict[str, Tensor]:
    """The step's computed tokens, over every model (``tokens``: per model), and the share of
    them that were padding."""
    if not tokens:
        return {}
    total = functools.reduce(operator.add, tokens.values())
    computed = total.computed.float()
    return {
        TOKENS_COMPUTED: computed,
        TOKENS_PADDING_SHARE: 1 - total.real.float() / computed.clamp(min=1),
    }
