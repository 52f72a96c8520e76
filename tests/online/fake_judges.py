"""Judges for the online tests: importable as ``fake_judges.<name>`` (tests/online on the path)."""

from __future__ import annotations

CALLS: list[int] = []


def distinct(prompts, responses):
    """Distinct characters: varied on a random model's samples, so pairs form."""
    return [float(len(set(r))) for r in responses]


def prefers_longer(prompt, a, b):
    return (len(a) > len(b)) - (len(a) < len(b))


def constant(prompts, responses):
    return [1.0] * len(responses)


def broken(prompts, responses):
    raise RuntimeError("the judge's server is down")


def nan(prompts, responses):
    return [float("nan")] * len(responses)


def too_few(prompts, responses):
    return [0.0] * (len(responses) - 1)


def coarse(prompts, responses):
    """Distinct characters in steps of three: often tied, so rounds fall short of pairs."""
    return [float(len(set(r)) // 3) for r in responses]
