"""Judges: who says which sampled response is better (``conf/judge/``).

A judge scores the K responses of each prompt as a group, so that scalar judges (a reward model,
the gold reward, a Python function) and pairwise ones (a callable that prefers one of two) share
one interface (a language model that compares two responses: :mod:`inspo.online.llm_judge`).
Optional penalties follow iterative length-regularised DPO: ``missing_eos_penalty``
is subtracted from a response that ran out of tokens before its EOS, ``length_penalty`` times
its length in bytes from every response. :class:`Weighted` sums judges.
"""

from __future__ import annotations

import importlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from inspo.evaluation.scorers import RewardModelScorer, make_scorer
from inspo.names import GOLD


@dataclass
class Group:
    """One prompt's sampled responses, as the judge sees them."""

    prompt: str
    responses: list[str]
    finished: list[bool]  # ended with EOS (False: the token budget ran out)


class JudgeError(RuntimeError):
    """A judge raised, or returned NaN or the wrong number of scores."""


@dataclass
class Judge:
    """Base class: :meth:`judge` scores each group; subclasses implement :meth:`raw`."""

    missing_eos_penalty: float = 0.0
    length_penalty: float = 0.0

    def raw(self, groups: Sequence[Group]) -> list[list[float]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def judge(self, groups: Sequence[Group]) -> list[list[float]]:
        """Scores per group and response, penalties applied; checked for count and NaN."""
        scores = self.raw(groups)
        if len(scores) != len(groups) or any(
            len(s) != len(g.responses) for s, g in zip(scores, groups, strict=True)
        ):
            raise JudgeError(f"{self!r} returned scores of the wrong shape")
        out = []
        for g, group_scores in zip(groups, scores, strict=True):
            row = []
            for response, done, score in zip(g.responses, g.finished, group_scores, strict=True):
                score = float(score)
                if math.isnan(score):
                    raise JudgeError(f"{self!r} returned NaN for prompt {g.prompt!r}")
                score -= self.length_penalty * len(response.encode())
                row.append(score - (0.0 if done else self.missing_eos_penalty))
            out.append(row)
        return out


@dataclass
class ScalarJudge(Judge):
    """A judge from a per-response scorer ``(prompts, responses) -> scores``."""

    def scorer(self) -> Callable[[Sequence[str], Sequence[str]], list[float]]:
        raise NotImplementedError  # pragma: no cover - abstract

    def raw(self, groups: Sequence[Group]) -> list[list[float]]:
        prompts = [g.prompt for g in groups for _ in g.responses]
        flat = list(self.scorer()(prompts, [r for g in groups for r in g.responses]))
        if len(flat) != len(prompts):
            raise JudgeError(f"{self!r} returned {len(flat)} scores for {len(prompts)} responses")
        it = iter(flat)
        return [[next(it) for _ in g.responses] for g in groups]


@dataclass
class Gold(ScalarJudge):
    """The built-in task's gold reward."""

    def scorer(self) -> Callable[[Sequence[str], Sequence[str]], list[float]]:
        return make_scorer(GOLD)


@dataclass
class RewardModel(ScalarJudge):
    """Any ``AutoModelForSequenceClassification`` (logit 0) on prompt + response."""

    name_or_path: str = "???"
    batch_size: int = 32
    _model: Any = field(default=None, init=False, repr=False)

    def scorer(self) -> Callable[[Sequence[str], Sequence[str]], list[float]]:
        if self._model is None:  # loaded once, on first use
            self._model = RewardModelScorer(self.name_or_path, batch_size=self.batch_size)
        return self._model


def load_function(path: str) -> Callable[..., Any]:
    """``package.module.function`` → the function."""
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"judge function must be module.function, got {path!r}")
    return getattr(importlib.import_module(module), name)


@dataclass
class Python(ScalarJudge):
    """Your ``module.function(prompts, responses) -> scores`` (one float per response)."""

    function: str = "???"

    def scorer(self) -> Callable[[Sequence[str], Sequence[str]], list[float]]:
        return load_function(self.function)


@dataclass
class Pairwise(Judge):
    """Your ``module.function(prompt, a, b) -> 1 | 0 | -1`` (a better, a tie, b better).

    Every two responses of a group are compared; a response's score is its Copeland score,
    wins + ½ ties, so that with K = 2 the preferred response scores 1, the other 0, and a tie
    0.5 each.
    """

    function: str = "???"

    def raw(self, groups: Sequence[Group]) -> list[list[float]]:
        compare = load_function(self.function)
        out = []
        for g in groups:
            verdicts = {}
            for i, j in itertools.combinations(range(len(g.responses)), 2):
                verdict = compare(g.prompt, g.responses[i], g.responses[j])
                if verdict not in (1, 0, -1):
                    raise JudgeError(f"{self!r} returned {verdict!r}; expected 1, 0 or -1")
                verdicts[i, j] = verdict
            out.append(copeland(len(g.responses), verdicts))
        return out


def copeland(n: int, verdicts: dict[tuple[int, int], int]) -> list[float]:
    """Scores of ``n`` responses from pairwise verdicts ``{(i, j): 1 | 0 | -1}`` (i better, a
    tie, j better): each response's wins + ½ ties."""
    score = [0.0] * n
    for (i, j), verdict in verdicts.items():
        score[i] += (verdict + 1) / 2
        score[j] += (1 - verdict) / 2
    return score


@dataclass
class Weighted(Judge):
    """Σ_k w_k · judge_k: ``judges`` is a list of ``{"judge": Judge or its config, "weight":
    float}``. A config of it sets ``_recursive_: false``: judges are dataclasses, which OmegaConf
    would turn back into configs inside the list, so they are built here."""

    judges: list = field(default_factory=list)

    def __post_init__(self) -> None:
        from hydra.utils import instantiate

        if not self.judges:
            raise ValueError("a Weighted judge needs at least one judge")
        self.judges = [
            {
                "judge": t["judge"] if isinstance(t["judge"], Judge) else instantiate(t["judge"]),
                "weight": float(t.get("weight", 1.0)),
            }
            for t in self.judges
        ]

    def raw(self, groups: Sequence[Group]) -> list[list[float]]:
        total = [[0.0] * len(g.responses) for g in groups]
        for term in self.judges:
            scores = term["judge"].judge(groups)
            for row, add in zip(total, scores, strict=True):
                for k, v in enumerate(add):
                    row[k] += term["weight"] * v
        return total
