"""Carrying surplus pairs into the next round: staleness, what is kept or dropped (counted),
and the sizing of a round's decoding pass so that it rarely falls short."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from inspo.names import PAIR_STALENESS, PAIR_STALENESS_MAX
from inspo.online.carry import PairYield, carries, carry_forward, staleness, staleness_metrics
from inspo.online.records import Round, RoundReport


def pairs(*rounds):
    return [
        SimpleNamespace(record=SimpleNamespace(round=r, position=k)) for k, r in enumerate(rounds)
    ]


def a_round(index, trained, surplus):
    report = RoundReport(prompts=0, samples=0, pairs=len(trained), dropped={"tie": 3}, truncated=0)
    return Round(index, 0, 0, trained, {}, report, surplus=surplus)


def test_staleness_counts_optimiser_steps_since_the_pair_was_sampled():
    # A round's own pairs: 0 at its first step, 1 at its second (2 pairs a step).
    assert [staleness(5, 5, k, 3, 2) for k in range(6)] == [0, 0, 1, 1, 2, 2]
    assert staleness(4, 5, 0, 3, 2) == 3  # carried from the round before: its 3 steps older
    assert staleness(4, 5, 0, 1, 8) == 1  # online mode: one step a round
    assert carries(1, 1) and not carries(0, 1) and not carries(49, 50) and carries(50, 50)


def test_a_round_carries_in_order_what_stays_fresh_enough_and_counts_the_rest():
    """Online mode (one step of 2 pairs a round), max staleness 1: of round 7's surplus, the
    pair carried in from round 6 would be 2 steps old (stale), its own first two fill the next
    step, and the third would wait 2 steps (unused)."""
    old, *own = pairs(6, 7, 7, 7)
    r = a_round(7, pairs(6, 7), [old, *own])
    kept = carry_forward(r, steps_per_round=1, per_step=2, max_staleness=1)
    assert kept == own[:2]
    assert r.report.dropped == {"stale": 1, "tie": 3, "unused_surplus": 1}
    assert r.report.carried_out == 2
    # Without carrying, every surplus pair is dropped and counted.
    r = a_round(7, pairs(7, 7), list(own))
    assert carry_forward(r, steps_per_round=1, per_step=2, max_staleness=0) == []
    assert r.report.dropped == {"tie": 3, "unused_surplus": 3} and r.report.carried_out == 0


def test_staleness_metrics_are_the_mean_and_max_over_the_trained_pairs():
    r = a_round(3, pairs(2, 3, 3, 3), [])
    assert staleness_metrics(r, 1, 4) == {PAIR_STALENESS: 0.25, PAIR_STALENESS_MAX: 1.0}
    assert staleness_metrics(a_round(3, [], []), 1, 4) == {}


def test_without_an_estimate_a_round_draws_a_prompt_per_missing_pair():
    assert PairYield().prompts_for(8) == 8
    y = PairYield()
    y.add([0, 0, 0])
    assert y.prompts_for(8) == 8
    y = PairYield()
    y.add([1] * 16)  # every prompt gave a pair: no spread, no margin
    assert y.prompts_for(8) == 8


@pytest.mark.parametrize("tie_rate", [0.1, 0.4, 0.75])
def test_the_first_pass_rarely_falls_short(tie_rate):
    """Prompts give a pair unless tied: sized by the running yield, a round's single pass has
    its 8 pairs in at least 90 % of rounds (drawing a prompt per missing pair: about half
    as often at a 10 % tie rate, almost never at 40 %), and draws no more than about the
    pairs needed over the yield plus a few standard deviations."""
    rng = random.Random(0)
    y, short, drawn = PairYield(), 0, []
    for _ in range(400):
        n = y.prompts_for(8)
        counts = [int(rng.random() > tie_rate) for _ in range(n)]
        y.add(counts)
        short += sum(counts) < 8
        drawn.append(n)
    assert short / 400 < 0.1
    mean = 1 - tie_rate
    assert sum(drawn[50:]) / len(drawn[50:]) < (8 + 3 * (8 * (1 - mean)) ** 0.5 + 1) / mean


def test_a_round_sizes_its_next_pass_by_what_its_first_gave():
    """Without an estimate from earlier rounds, a pass after one in which half the prompts
    tied draws about twice the missing pairs; what was drawn counts only for the plan."""
    y = PairYield()
    assert y.plan(8) == y.prompts_for(8) == 8
    assert y.plan(4, [1, 0] * 4) > 8
    assert y == PairYield()
    y.add([1] * 8)
    assert y.plan(4, [1] * 8) == 4 and y.plan(4) == 4
