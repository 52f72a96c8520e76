"""Carrying a round's surplus pairs into the next round, and sizing its decoding pass.

A round draws prompts until it has its pairs. Ties and other unusable samples make the number
of pairs a prompt gives uncertain, so a round that draws exactly as many prompts as it lacks
pairs often falls short, and decodes a second pass for the few it still lacks: on a CPU, or
with a small batch, that pass costs almost as much as the first (a decoding step costs about
the same for 2 rows as for 16).

With carrying on (``iterate.max_staleness`` ≥ ``iterate.steps_per_round``), a round draws enough
prompts in its first pass that it rarely falls short (:meth:`PairYield.prompts_for`: about 2 %
of rounds at the pair yield measured so far; a pass that does fall short, or the first round's,
sizes the next by what the round's passes gave: :meth:`PairYield.plan`), and the pairs beyond
what it trains on train first in the next round (:func:`carry_forward`), in order, as long as
each is at most ``max_staleness`` optimiser steps older than the policy that trains on it
(:func:`staleness`);
a pair that would be older is dropped and counted (``stale``; a round's own surplus that cannot
be carried at all is ``unused_surplus``, as without carrying). ``max_staleness=0`` is the loop
without carrying: each round draws as many prompts as it lacks pairs and trains on its own.

What a carried pair holds stays valid: its token ids and judge scores do not change, and the
reference's scores of its samples (which a round shares with training) are only ever taken
while the reference is fixed (a synced reference, ``iterate.reference=previous``, shares none:
its training steps score every pair, carried or not, with the reference of the moment). A
resumed run carries the same pairs (they are part of the loop's checkpointed state, with the
yield estimate), so it trains on what the uninterrupted run trained on.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from inspo.names import PAIR_STALENESS, PAIR_STALENESS_MAX
from inspo.online.records import Round, TrainingPair

#: A round's first pass falls short of its pairs with about this normal quantile's tail
#: probability (2: about 2 %), under the yield's running mean and variance.
SHORTFALL_Z = 2.0
#: Each round's weight in the yield estimate, relative to the next one's: recent rounds count
#: most, as the policy's tie rate moves while it trains (about the last 10 rounds).
DECAY = 0.9

STALE, UNUSED_SURPLUS = "stale", "unused_surplus"


def carries(max_staleness: int, steps_per_round: int) -> bool:
    """Whether any pair can be carried: one trains in the next round at the earliest, at least
    ``steps_per_round`` steps after its own round was sampled."""
    return max_staleness >= steps_per_round


def staleness(sampled: int, round_: int, slot: int, steps_per_round: int, per_step: int) -> int:
    """Optimiser steps between the policy that sampled a pair (at the start of round
    ``sampled``) and the step that trains on it (slot ``slot`` of round ``round_``, which trains
    ``per_step`` pairs a step). A round's own pairs have 0 .. ``steps_per_round`` − 1: that is
    what training on a round's samples for several steps means."""
    return (round_ - sampled) * steps_per_round + slot // per_step


def staleness_metrics(r: Round, steps_per_round: int, per_step: int) -> dict[str, float]:
    """Mean and largest staleness (:func:`staleness`) of the pairs a round trains on."""
    ages = [
        staleness(p.record.round, r.index, k, steps_per_round, per_step)
        for k, p in enumerate(r.pairs)
    ]
    if not ages:
        return {}
    return {PAIR_STALENESS: sum(ages) / len(ages), PAIR_STALENESS_MAX: float(max(ages))}


def pair_counts(pairs: Sequence[TrainingPair], index: int, start: int, end: int) -> list[int]:
    """How many of ``pairs`` each prompt of round ``index`` at stream positions ``start`` to
    one past ``end`` gave, in stream order (pairs of earlier rounds are not counted)."""
    own = Counter(p.record.position for p in pairs if p.record.round == index)
    return [own[k] for k in range(start, end)]


def carry_forward(
    r: Round, *, steps_per_round: int, per_step: int, max_staleness: int
) -> list[TrainingPair]:
    """The pairs of ``r.surplus`` the next round takes, in order: each while it would train
    at most ``max_staleness`` steps after it was sampled. The others are dropped, counted in
    ``r.report``: ``unused_surplus`` (the round's own) or ``stale`` (carried in from earlier)."""
    kept: list[TrainingPair] = []
    dropped = dict(r.report.dropped)
    dropped.setdefault(UNUSED_SURPLUS, 0)
    for p in r.surplus:
        age = staleness(p.record.round, r.index + 1, len(kept), steps_per_round, per_step)
        if age <= max_staleness:
            kept.append(p)
        else:
            reason = UNUSED_SURPLUS if p.record.round == r.index else STALE
            dropped[reason] = dropped.get(reason, 0) + 1
    r.report.dropped = dict(sorted(dropped.items()))
    r.report.carried_out = len(kept)
    return kept


@dataclass
class PairYield:
    """Usable pairs per prompt, weighted over rounds (:data:`DECAY`): the sums of the prompt
    count, the pairs and the squared pairs per prompt. Part of the loop's checkpointed state."""

    prompts: float = 0.0
    pairs: float = 0.0
    squares: float = 0.0

    def add(self, counts: Sequence[int]) -> None:
        """A round's prompts, by how many pairs each gave."""
        self.prompts = DECAY * self.prompts + len(counts)
        self.pairs = DECAY * self.pairs + sum(counts)
        self.squares = DECAY * self.squares + sum(c * c for c in counts)

    def plan(self, missing: int, drawn: Sequence[int] = ()) -> int:
        """:meth:`prompts_for` with the pairs per prompt of the round's passes so far
        (``drawn``) counted in: a round that falls short sizes its next pass, and the first
        round its second, by what it has seen."""
        if not drawn:
            return self.prompts_for(missing)
        seen = PairYield(self.prompts, self.pairs, self.squares)
        seen.add(drawn)
        return seen.prompts_for(missing)

    def prompts_for(self, missing: int) -> int:
        """Prompts to draw for ``missing`` pairs: the smallest n with n·mean − z·√(n·var) ≥
        ``missing`` (a normal approximation of the sum of n prompts' pairs). Before any
        prompt, or while none gave a pair, as many prompts as pairs are missing."""
        if self.prompts <= 0 or self.pairs <= 0:
            return missing
        mean = self.pairs / self.prompts
        var = max(self.squares / self.prompts - mean * mean, 0.0)
        spread = SHORTFALL_Z * math.sqrt(var)
        root = (spread + math.sqrt(spread * spread + 4 * mean * missing)) / (2 * mean)
        return max(1, math.ceil(root * root - 1e-9))  # not one more for a rounding error
