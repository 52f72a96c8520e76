"""A run's rounds on disk: ``OUT/rounds/NNN/`` per round and ``OUT/iterate.json``.

A round's folder is written whole or not at all (aside, then renamed into place) when the round
is built:

    samples.jsonl     every sample: prompt, response, score, finished, log-probs
    pairs.jsonl       the pairs it trains on, in training order (trainable with
                      ``inspo-train data=jsonl`` as it is)
    tokens.jsonl      line for line, the pairs' sampled token ids (what training scores) and
                      the reference's scores that serve training, as they were taken
    carry.jsonl       the pairs it passes on to the next round (a pairs line and a tokens line
                      each), which train there first
    data_report.json  how its prompts became pairs (dropped, by reason)
    round.json        the report, the round's metrics, its span of the prompt stream and the
                      pair-yield estimate after it

and its ``round.json`` is rewritten with the round's final metrics (its evaluation included)
when the round ends. A run restarted in the middle of a round reloads the round from its folder:
its generation and judging are not redone, and its steps train on the same token ids with the
same reference scores as the uninterrupted run (JSON keeps a float exactly).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from inspo.jsonio import json_line, write_json
from inspo.online.records import (
    PairRecord,
    PairTokens,
    PlainReference,
    Round,
    RoundReport,
    TrainingPair,
)

PAIRS, TOKENS, CARRY = "pairs.jsonl", "tokens.jsonl", "carry.jsonl"


class RoundStore:
    """The round folders under ``out_dir`` (none when ``save`` is false) and ``iterate.json``."""

    def __init__(self, out_dir: Path, save: bool = True) -> None:
        self.out_dir, self.save = out_dir, save

    def folder(self, index: int) -> Path:
        return self.out_dir / "rounds" / f"{index:03d}"

    def saved(self, index: int) -> bool:
        """Whether round ``index`` was built and saved (a restart reloads it)."""
        return all((self.folder(index) / name).exists() for name in (PAIRS, TOKENS))

    def write(self, r: Round) -> None:
        """The round's folder, whole or not at all: written aside, then renamed into place."""
        folder = self.folder(r.index)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_lines(tmp / "samples.jsonl", (asdict(s) for s in r.samples))
        write_lines(tmp / PAIRS, (asdict(p.record) for p in r.pairs))
        write_lines(tmp / TOKENS, (token_line(p) for p in r.pairs))
        write_lines(tmp / CARRY, (pair_state(p) for p in r.carry))
        write_json(tmp / "data_report.json", {"round": r.index, **span(r), **asdict(r.report)})
        write_json(tmp / "round.json", round_json(r, r.metrics))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)

    def load(self, index: int, encode: Callable[[PairTokens], dict[str, Any]]) -> Round:
        """Round ``index`` as it was built (its samples are not reloaded); ``encode`` turns a
        pair's sampled ids into the token rows training takes."""
        folder = self.folder(index)
        saved = json.loads((folder / "round.json").read_text())
        lines = zip(read_lines(folder / PAIRS), read_lines(folder / TOKENS), strict=True)
        pairs = [load_pair(text, ids, encode) for text, ids in lines]
        carry = folder / CARRY
        carried = [pair_from_state(p, encode) for p in read_lines(carry)] if carry.exists() else []
        report = RoundReport(**saved["report"])
        return Round(
            index, saved["start"], saved["end"], pairs, saved["metrics"], report,
            carry=carried, pair_yield=saved.get("pair_yield", {}),
        )  # fmt: skip

    def finish(self, r: Round, metrics: dict[str, float], history: list[dict[str, Any]]) -> None:
        """At the round's end: ``iterate.json`` (every round so far) and the round's
        ``round.json`` with its final metrics."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.out_dir / "iterate.json", {"rounds": history})
        if self.save and self.folder(r.index).exists():
            write_json(self.folder(r.index) / "round.json", round_json(r, metrics))


def span(r: Round) -> dict[str, int]:
    """Where the round's prompts lie in the prompt stream."""
    return {"start": r.start, "end": r.end}


def round_json(r: Round, metrics: dict[str, float]) -> dict[str, Any]:
    return {"report": asdict(r.report), "metrics": metrics, **span(r), "pair_yield": r.pair_yield}


def token_line(p: TrainingPair) -> dict[str, Any]:
    reference = asdict(p.reference) if p.reference is not None else None
    return {**asdict(p.sampled), "reference": reference}


def load_pair(
    text: dict[str, Any], ids: dict[str, Any], encode: Callable[[PairTokens], dict[str, Any]]
) -> TrainingPair:
    """A pair from its ``pairs.jsonl`` and ``tokens.jsonl`` lines (:func:`token_line`)."""
    ids = dict(ids)
    reference = ids.pop("reference")
    sampled = PairTokens(**ids)
    return TrainingPair(
        PairRecord(**text),
        sampled,
        encode(sampled),
        PlainReference(**reference) if reference is not None else None,
    )


def pair_state(p: TrainingPair) -> dict[str, Any]:
    """A pair as a checkpoint keeps it (the pairs a run carries into its next round): its two
    lines, as a round's folder holds them."""
    return {"pair": asdict(p.record), "tokens": token_line(p)}


def pair_from_state(
    state: dict[str, Any], encode: Callable[[PairTokens], dict[str, Any]]
) -> TrainingPair:
    return load_pair(state["pair"], state["tokens"], encode)


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_lines(path: Path, objects: Any) -> None:
    with open(path, "w") as f:
        for obj in objects:
            f.write(json_line(obj))
