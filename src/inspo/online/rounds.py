"""The iterative loop: round after round, the policy samples, a judge labels, pairs train it.

Round r starts with the batch of its first optimiser step (:meth:`Rounds.batch`):
    1. :class:`~inspo.online.builder.RoundBuilder` builds it: the pairs carried in from the
       last round first, then prompts from the run's seeded prompt stream, sampled by the live
       policy, judged, paired and encoded, until the round has ``steps_per_round ×`` global
       batch pairs;
    2. :func:`~inspo.online.carry.carry_forward` keeps what the next round may train on of
       the pairs it had beyond those (``iterate.max_staleness``), and the others are counted;
    3. :class:`~inspo.online.store.RoundStore` writes its folder (samples, pairs, reports);
then ``steps_per_round`` optimiser steps train on its pairs, and at its end (:meth:`Rounds.end`,
called by :class:`RoundEnd`) the policy is evaluated and ``iterate.json`` updated. Online mode
is the same loop with one step per round: fresh samples from the live policy every step.

A killed run resumes with ``ckpt_path=last``: finished rounds are skipped, a round in progress
reloads its pairs from its folder (generation and judging are not redone), and a round not yet
started samples exactly as the uninterrupted run would (its noise depends on its position in
the prompt stream, the weights come from the checkpoint, and so do the pairs carried into it
and the pair yield that sizes its decoding pass).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import lightning as L
import torch

from inspo.data.collate import PreferenceCollator
from inspo.names import PLAIN
from inspo.online import processes
from inspo.online.builder import RoundBuilder, RoundError
from inspo.online.carry import (
    PairYield,
    carries,
    carry_forward,
    pair_counts,
    staleness_metrics,
)
from inspo.online.records import PlainReference, Round, TrainingPair
from inspo.online.store import RoundStore, pair_from_state, pair_state
from inspo.settings import IterateConfig

__all__ = ["IterateConfig", "RoundEnd", "RoundError", "Rounds"]


class Rounds:
    """The loop's state: which round a step belongs to, building or reloading it, its end, and
    what a checkpoint keeps to resume; see the module docstring."""

    def __init__(
        self,
        icfg: IterateConfig,
        builder: RoundBuilder,
        store: RoundStore,
        *,
        batch_size: int,
        pad_id: int,
        evaluate: Callable[[Any, Path | None], dict[str, float]] | None = None,
        reference_sync: Callable[[int, Any], None] | None = None,
    ) -> None:
        self.icfg, self.builder, self.store = icfg, builder, store
        self.batch_size, self.evaluate = batch_size, evaluate
        # A synced reference's update owed before a step is made before its batch is built,
        # so a round scores its samples with the reference its steps train with.
        self.reference_sync = reference_sync
        self.collate = PreferenceCollator(pad_id, builder.views)
        self.current: Round | None = None
        self.cursor = 0  # where the next round starts in the prompt stream
        self.carry: list[TrainingPair] = []  # what the current round passes to the next
        self.yields = PairYield()  # pairs per prompt so far: sizes a round's decoding pass
        self.history: list[dict[str, Any]] = []
        self.timer: dict[str, float] = {}

    @property
    def total_steps(self) -> int:
        return self.icfg.rounds * self.icfg.steps_per_round

    def batch(self, step: int, module: Any) -> dict[str, Any]:
        """The batch of optimiser step ``step`` (global), building its round when it starts."""
        index, s = divmod(step, self.icfg.steps_per_round)
        if self.reference_sync is not None:
            self.reference_sync(step, module)
        if self.current is None or self.current.index != index:
            self.start(index, module)
        size, rank = processes.world()
        per_step = self.batch_size * size
        pairs = self.current.pairs[s * per_step : (s + 1) * per_step][rank::size]
        batch = self.collate([{**p.tokens, "index": 0} for p in pairs])
        # Pairs whose plain view is not exactly their sampled tokens (truncation) carry none:
        # the batch then runs the reference forward.
        if pairs and all(p.reference is not None for p in pairs):
            batch["reference_scores"] = {
                PLAIN: {
                    f.name: torch.tensor([getattr(p.reference, f.name) for p in pairs])
                    for f in fields(PlainReference)
                }
            }
        return batch

    def start(self, index: int, module: Any) -> None:
        """Round ``index``: reloaded from its folder when it was built before a restart, else
        built (and saved)."""
        self.timer = {"start": time.perf_counter()}
        if self.store.saved(index):
            # With what it passes on and the yield after it: the checkpoint may predate it.
            self.current = self.store.load(index, self.builder.tokens)
        else:
            size, rank = processes.world()
            per_step, spr = self.batch_size * size, self.icfg.steps_per_round
            plan = self.yields.plan if carries(self.icfg.max_staleness, spr) else None
            r = self.builder.build(index, self.cursor, spr * per_step, module, self.carry, plan)
            r.carry = carry_forward(
                r, steps_per_round=spr, per_step=per_step, max_staleness=self.icfg.max_staleness
            )
            self.yields.add(pair_counts([*r.pairs, *r.surplus], r.index, r.start, r.end))
            r.pair_yield = asdict(self.yields)
            r.metrics.update(staleness_metrics(r, spr, per_step))
            self.current = r
            if rank == 0 and self.icfg.save_rounds:
                self.store.write(self.current)
            processes.barrier()
        self.carry, self.yields = self.current.carry, PairYield(**self.current.pair_yield)
        self.cursor = self.current.end
        self.timer["built"] = time.perf_counter()

    def end(self, index: int, module: Any) -> dict[str, float]:
        """After the round's last step: evaluate (when due), record, return the metrics."""
        now = time.perf_counter()
        metrics = {"round": float(index), **self.current.metrics}
        metrics["time/training_seconds"] = now - self.timer.get("built", now)
        last = index + 1 == self.icfg.rounds
        every = self.icfg.eval_every
        if self.evaluate is not None and (last or (every and (index + 1) % every == 0)):
            t = time.perf_counter()
            out = self.store.folder(index) / "eval" if self.icfg.save_rounds else None
            metrics.update(self.evaluate(module.policy, out))
            metrics["time/evaluation_seconds"] = time.perf_counter() - t
        total = sum(
            v for k, v in metrics.items() if k.startswith("time/") and k.endswith("seconds")
        )
        for k in ("generation", "judging", "training"):
            metrics[f"time/{k}_share"] = metrics.get(f"time/{k}_seconds", 0.0) / max(total, 1e-9)
        self.history = [h for h in self.history if h["round"] != index] + [metrics]
        if processes.world()[1] == 0:
            self.store.finish(self.current, metrics, self.history)
        return metrics

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Where the current round lies in the prompt stream, the rounds' metrics so far, and
        what the next round starts from: the pairs the current round carries on, and the
        yield estimate after it."""
        cur = self.current
        index, start, end = (-1, self.cursor, self.cursor) if cur is None else (
            cur.index, cur.start, cur.end
        )  # fmt: skip
        return {
            "round": index,
            "start": start,
            "end": end,
            "history": self.history,
            "carry": [pair_state(p) for p in self.carry],
            "yield": asdict(self.yields),
        }

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        """Continue where a checkpoint at global ``step`` left off."""
        self.history = list(state.get("history", []))
        self.carry = [pair_from_state(p, self.builder.tokens) for p in state.get("carry", [])]
        self.yields = PairYield(**state.get("yield", {}))
        index = step // self.icfg.steps_per_round
        if index == state["round"]:  # in the middle of a round: its pairs must be on disk
            if not self.store.saved(index):
                raise RoundError(
                    f"cannot resume in the middle of round {index} without its saved pairs "
                    f"({self.store.folder(index)}); keep iterate.save_rounds=true"
                )
            self.cursor = state["start"]
        else:  # at a round boundary: the next round starts where the last one ended
            self.cursor = state["end"]


class RoundEnd(L.Callback):
    """Ends a round after its last optimiser step: evaluation, ``iterate.json``, and the
    round's metrics logged as one point of each series over rounds."""

    def __init__(self, rounds: Rounds) -> None:
        self.rounds = rounds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        per_round = self.rounds.icfg.steps_per_round
        if trainer.global_step % per_round == 0:
            metrics = self.rounds.end(trainer.global_step // per_round - 1, pl_module)
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)
