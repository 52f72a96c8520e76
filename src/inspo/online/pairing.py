"""Pairing: from the scored responses of each prompt to (chosen, rejected) pairs
(``conf/pairing/``).

Before pairing, a response that cannot be trained on leaves its group, counted by reason: an
empty response (``empty_response``) and a repeat of another response of the same prompt
(``identical_responses``). Responses that ran out of tokens before their EOS are counted
(``unfinished``) and kept unless ``drop_unfinished``. Then:

- ``best_worst``: the highest against the lowest scored response (one pair per prompt);
- ``random``: two responses drawn at random, the higher scored one chosen;
- ``all_pairs``: every two responses with different scores.

A candidate pair whose score gap is 0 is a ``tie``; one below ``min_margin`` is
``below_min_margin``; a prompt left with fewer than two responses gives ``too_few_responses``.
Nothing is dropped without being counted.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass


@dataclass
class Candidate:
    """One sampled response with its score; ``index``: its place among its prompt's samples."""

    text: str
    score: float
    finished: bool
    index: int = -1


@dataclass
class Pairing:
    """Base class; :meth:`candidates` picks the pairs of one prompt's usable responses."""

    min_margin: float = 0.0
    drop_unfinished: bool = False

    def candidates(
        self, group: list[Candidate], rng: random.Random
    ) -> list[tuple[int, int]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def pairs(
        self, group: list[Candidate], rng: random.Random, dropped: Counter
    ) -> list[tuple[Candidate, Candidate]]:
        """(chosen, rejected) pairs of one prompt's responses; drops counted in ``dropped``."""
        usable, seen = [], set()
        for c in group:
            if not c.finished:
                dropped["unfinished"] += 1
                if self.drop_unfinished:
                    continue
            if not c.text.strip():
                dropped["empty_response"] += 1
            elif c.text in seen:
                dropped["identical_responses"] += 1
            else:
                seen.add(c.text)
                usable.append(c)
        if len(usable) < 2:
            dropped["too_few_responses"] += 1
            return []
        out = []
        for i, j in self.candidates(usable, rng):
            hi, lo = (
                (usable[i], usable[j])
                if usable[i].score >= usable[j].score
                else (usable[j], usable[i])
            )
            gap = hi.score - lo.score
            if gap == 0:
                dropped["tie"] += 1
            elif gap < self.min_margin:
                dropped["below_min_margin"] += 1
            else:
                out.append((hi, lo))
        return out


@dataclass
class BestWorst(Pairing):
    """The best against the worst response of each prompt."""

    def candidates(self, group: list[Candidate], rng: random.Random) -> list[tuple[int, int]]:
        order = sorted(range(len(group)), key=lambda k: group[k].score)
        return [(order[-1], order[0])]


@dataclass
class Random(Pairing):
    """Two responses of each prompt drawn at random."""

    def candidates(self, group: list[Candidate], rng: random.Random) -> list[tuple[int, int]]:
        i, j = rng.sample(range(len(group)), 2)
        return [(i, j)]


@dataclass
class AllPairs(Pairing):
    """Every two responses of each prompt."""

    def candidates(self, group: list[Candidate], rng: random.Random) -> list[tuple[int, int]]:
        return list(itertools.combinations(range(len(group)), 2))
