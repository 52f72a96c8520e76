"""Pairing: best-worst, random, all pairs; margins; every dropped candidate counted."""

from __future__ import annotations

import random
from collections import Counter

from inspo.online.pairing import AllPairs, BestWorst, Candidate, Random

C = Candidate


def test_best_worst_pairs_the_extremes():
    group = [C("a", 0.2, True), C("b", 0.9, True), C("c", -0.4, True)]
    (pair,) = BestWorst().pairs(group, random.Random(0), Counter())
    assert (pair[0].text, pair[1].text) == ("b", "c")


def test_drops_are_counted_by_reason():
    dropped = Counter()
    group = [C("a", 1.0, True), C("a", 1.0, True), C("", 3.0, True), C("b", 1.0, False)]
    assert BestWorst().pairs(group, random.Random(0), dropped) == []
    # "a" twice (one identical), an empty response, an unfinished one (kept), then a tie
    assert dropped == Counter(identical_responses=1, empty_response=1, unfinished=1, tie=1)
    dropped = Counter()
    assert BestWorst(drop_unfinished=True).pairs(group, random.Random(0), dropped) == []
    assert dropped["too_few_responses"] == 1
    dropped = Counter()
    pairs = BestWorst(min_margin=0.5).pairs([C("a", 1.0, True), C("b", 1.2, True)], None, dropped)
    assert pairs == [] and dropped == Counter(below_min_margin=1)


def test_all_pairs_and_random():
    group = [C("a", 1.0, True), C("b", 2.0, True), C("c", 2.0, True), C("d", 0.0, True)]
    dropped = Counter()
    pairs = AllPairs().pairs(group, random.Random(0), dropped)
    assert len(pairs) == 5 and dropped == Counter(tie=1)  # 6 pairs, b–c tie
    assert all(hi.score > lo.score for hi, lo in pairs)
    seen = {tuple(p.text for p in Random().pairs(group, random.Random(s), Counter())[0])
            for s in range(40) if Random().pairs(group, random.Random(s), Counter())}  # fmt: skip
    assert len(seen) > 2 and all(a != b for a, b in seen)
