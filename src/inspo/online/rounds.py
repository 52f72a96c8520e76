"""The iterative loop: round after round, the policy samples, a judge labels, pairs train it.

Round r (:meth:`Rounds.start`), before its first training step:
    1. prompts come from the run's seeded prompt stream, each process sampling its share
       (``samples_per_prompt`` responses each, from the live policy);
    2. the judge scores every response, pairing turns each prompt's responses into pairs, and
       the pairs of all processes are gathered, until the round has ``steps_per_round ×``
       global batch pairs (more prompts are drawn while pairs are missing);
    3. the round's folder is written: ``samples.jsonl``, ``pairs.jsonl`` (trainable with
       ``inspo-train data=jsonl`` as it is), ``data_report.json``, ``round.json``;
then ``steps_per_round`` optimiser steps train on its pairs, and at its end (:meth:`Rounds.end`)
the policy is evaluated and ``iterate.json`` updated. Online mode is the same loop with one
step per round: fresh samples from the live policy every step.

A killed run resumes with ``ckpt_path=last``: finished rounds are skipped, a round in progress
reloads its pairs from its folder (generation and judging are not redone), and a round not yet
started samples exactly as the uninterrupted run would (its noise depends on its position in
the prompt stream, and the weights come from the checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from inspo.data.collate import PreferenceCollator, pad_rows
from inspo.data.encode import Encoder
from inspo.evaluation.metrics import ONE_BY_ONE
from inspo.jsonio import json_line, write_json
from inspo.models.sampling import Sample
from inspo.models.scoring import scored_token_logps
from inspo.names import EOS_RATE, PLAIN, SAMPLE_ENTROPY, SAMPLE_KL, SCORES, SCORES_MARGIN
from inspo.online.generation import Backend
from inspo.online.judges import Group, Judge, JudgeError
from inspo.online.pairing import Candidate, Pairing
from inspo.online.prompts import Prompt, stream
from inspo.settings import IterateConfig
from inspo.training.reference import adapter_disabled

log = logging.getLogger(__name__)


class RoundError(RuntimeError):
    """A round that cannot be built (a failing judge, too few pairs)."""


@dataclass
class RoundData:
    """What a round trains on and what it measured while it was built."""

    index: int
    start: int  # its first and one-past-last position in the prompt stream
    end: int
    rows: list[dict]  # encoded pairs, in training order
    metrics: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


class Rounds:
    """The loop's state and its work; see the module docstring."""

    def __init__(
        self,
        icfg: IterateConfig,
        pool: Sequence[Prompt],
        backend: Backend,
        judge: Judge,
        pairing: Pairing,
        encoder: Encoder,
        views: tuple[str, ...],
        pad_id: int,
        batch_size: int,
        seed: int,
        out_dir: Path,
        evaluate: Callable[[Any, Path | None], dict[str, float]] | None = None,
        share_reference: bool = False,
    ) -> None:
        self.icfg, self.pool, self.backend, self.judge, self.pairing = (
            icfg,
            pool,
            backend,
            judge,
            pairing,
        )
        self.encoder, self.views, self.collate = encoder, views, PreferenceCollator(pad_id, views)
        self.batch_size, self.seed, self.out_dir, self.evaluate = (
            batch_size,
            seed,
            out_dir,
            evaluate,
        )
        self.current: RoundData | None = None
        self.cursor = 0  # where the next round starts in the prompt stream
        self.history: list[dict[str, Any]] = []
        self.pending: dict[str, float] = {}  # the finished round's metrics, for the logger
        self.timer: dict[str, float] = {}
        # The reference's scores of the samples, taken for the round's KL, are also the plain
        # view's reference scores in training (see online.run.shares_reference_scores): one
        # reference forward per sample, not a second one per trained pair.
        self.share_reference = share_reference

    # ------------------------------------------------------------------ steps
    @property
    def total_steps(self) -> int:
        return self.icfg.rounds * self.icfg.steps_per_round

    def batch(self, step: int, module: Any) -> dict[str, Any]:
        """The batch of optimiser step ``step`` (global), building its round when it starts."""
        index, s = divmod(step, self.icfg.steps_per_round)
        if self.current is None or self.current.index != index:
            self.start(index, module)
        world, rank = _world()
        per_step = self.batch_size * world
        rows = self.current.rows[s * per_step : (s + 1) * per_step][rank::world]
        batch = self.collate([{**row, "index": 0} for row in rows])
        # Rows whose tokens are not the sampled ones (re-encoding, truncation), or reloaded
        # from a round's folder, carry none: the batch then runs the reference forward.
        if self.share_reference and rows and all(REFERENCE in row for row in rows):
            columns = zip(*(row[REFERENCE] for row in rows), strict=True)
            fields = ("chosen", "rejected", "chosen_length", "rejected_length")
            batch["reference_scores"] = {
                PLAIN: {f: torch.tensor(c) for f, c in zip(fields, columns, strict=True)}
            }
        return batch

    # ------------------------------------------------------------------ a round
    def start(self, index: int, module: Any) -> None:
        self.timer = {"start": time.perf_counter()}
        folder = self.folder(index)
        if (folder / "pairs.jsonl").exists():  # built before a restart: not redone
            self.current = self.load(index, folder)
        else:
            self.current = self.build(index, module)
            if _world()[1] == 0 and self.icfg.save_rounds:
                self.write(self.current, folder)
            _barrier()
        self.cursor = self.current.end
        self.timer["built"] = time.perf_counter()

    def build(self, index: int, module: Any) -> RoundData:
        """Sample, judge and pair prompts from the stream until the round has its pairs."""
        needed = self.icfg.steps_per_round * self.batch_size * _world()[0]
        start, cursor = self.cursor, self.cursor
        rows: list[dict] = []
        samples: list[dict] = []
        dropped: Counter = Counter()
        seconds = Counter()
        self.backend.sync(module.policy)
        while len(rows) < needed:
            if cursor - start > self.icfg.max_prompts_factor * needed:
                raise RoundError(
                    f"round {index} found {len(rows)} of its {needed} pairs in "
                    f"{cursor - start} prompts; dropped: {dict(dropped)}"
                )
            chunk = stream(self.pool, self.seed, cursor, max(needed - len(rows), _world()[0]))
            got = self.chunk(index, chunk, cursor, module, seconds)
            parts = _gather(got)  # every process ends with the same list, in stream order
            rows += sorted((r for p in parts for r in p["rows"]), key=lambda r: r["position"])
            samples += sorted((x for p in parts for x in p["samples"]), key=lambda x: x["position"])
            for part in parts:
                dropped.update(part["dropped"])
            cursor += len(chunk)
        dropped["unused_surplus"] += len(rows) - needed
        rows = rows[:needed]
        metrics = round_metrics(samples, rows)
        metrics.update({f"time/{k}_seconds": v for k, v in seconds.items()})
        report = {
            "prompts": cursor - start,
            "samples": len(samples),
            "pairs": len(rows),
            "dropped": dict(sorted(dropped.items())),
            "truncated": sum(r["truncated"] for r in rows),
        }
        return RoundData(index, start, cursor, rows, metrics, report | {"samples_": samples})

    def chunk(
        self, index: int, chunk: list[Prompt], at: int, module: Any, seconds: Counter
    ) -> dict[str, Any]:
        """This process's share of a chunk of prompts: sampled, judged, paired, encoded."""
        world, rank = _world()
        mine = list(range(rank, len(chunk), world))
        # Every process decodes as many prompts (a sharded policy needs equal forwards).
        ids = [chunk[i].ids for i in mine] or [chunk[0].ids]
        ids += [ids[-1]] * (-(-len(chunk) // world) - len(ids))
        t = time.perf_counter()
        seed = int(np.random.SeedSequence([self.seed, at, rank]).generate_state(1)[0] >> 1)
        device = next(module.policy.parameters()).device
        groups = self.backend.generate(ids, self.icfg.samples_per_prompt, seed, _all_done(device))
        groups = groups[: len(mine)]
        seconds["generation"] += time.perf_counter() - t
        t = time.perf_counter()
        judged = [
            Group(chunk[i].text, [s.text for s in g], [s.finished for s in g])
            for i, g in zip(mine, groups, strict=True)
        ]
        try:
            scores = self.judge.judge(judged) if judged else []
        except Exception as e:
            raise JudgeError(f"judge {self.judge!r} failed in round {index}: {e}") from e
        seconds["judging"] += time.perf_counter() - t
        ref, trained = self.reference_logps(module, [chunk[i].ids for i in mine], groups)
        rng = random.Random(at * 1_000_003 + rank)
        dropped, pairs, samples = Counter(), [], []
        for k, (i, g, sc) in enumerate(zip(mine, groups, scores, strict=True)):
            cands = [Candidate(s.text, v, s.finished) for s, v in zip(g, sc, strict=True)]
            for s, v, r in zip(g, sc, ref[k], strict=True):
                samples.append(sample_row(chunk[i].text, at + i, s, v, r))
            for hi, lo in self.pairing.pairs(cands, rng, dropped):
                shared = None
                if trained is not None:  # the samples behind the pair, and their scores
                    a, b = (next(j for j, c in enumerate(cands) if c is x) for x in (hi, lo))
                    shared = (chunk[i].ids, g[a], g[b], trained[k][a], trained[k][b])
                pairs.append((at + i, chunk[i].text, hi, lo, shared))
        return {"rows": self.encode(index, pairs, dropped), "samples": samples, "dropped": dropped}

    def encode(self, index: int, pairs: list, dropped: Counter) -> list[dict]:
        """Token rows of the views training needs; a pair identical after truncation is
        dropped (counted)."""
        if not pairs:
            return []
        text = {
            "prompt": [p[1] for p in pairs],
            "chosen": [p[2].text for p in pairs],
            "rejected": [p[3].text for p in pairs],
        }
        enc = self.encoder.encode_batch(text, self.views)
        rows = []
        v = self.views[0]
        for k, (position, prompt, hi, lo, shared) in enumerate(pairs):
            row = {key: values[k] for key, values in enc.items()}
            if (
                row[f"{v}_chosen"][row[f"{v}_chosen_start"] :]
                == row[f"{v}_rejected"][row[f"{v}_rejected_start"] :]
            ):
                dropped["identical_after_truncation"] += 1
                continue
            row.update(
                prompt=prompt,
                chosen=hi.text,
                rejected=lo.text,
                chosen_score=hi.score,
                rejected_score=lo.score,
                position=position,
                round=index,
            )
            scores = self.trained_scores(row, shared) if shared is not None else None
            if scores is not None:
                row[REFERENCE] = scores
            rows.append(row)
        return rows

    def trained_scores(self, row: dict, shared: tuple) -> list | None:
        """[chosen, rejected, chosen length, rejected length] of the reference on the row's plain
        view, from the samples' scores, when the view holds exactly the sampled tokens (and the
        EOS that training appends to a sample that ran out of tokens); else None."""
        prompt, *samples = shared[:3]
        for side, s in zip(("chosen", "rejected"), samples, strict=True):
            tokens = list(prompt) + s.ids + ([] if s.finished else self.encoder.eos)
            if row[f"{PLAIN}_{side}"] != tokens or row[f"{PLAIN}_{side}_start"] != len(prompt):
                return None
        (chosen, n_chosen), (rejected, n_rejected) = shared[3:]
        return [chosen, rejected, n_chosen, n_rejected]

    @torch.no_grad()
    def reference_logps(
        self, module: Any, prompts: list[tuple[int, ...]], groups: list[list[Sample]]
    ) -> tuple[list[list[float]], list[list[tuple[float, int]]] | None]:
        """log π_ref of each sample after its prompt (NaN without a reference): the KL term of
        the round's metrics; and, with ``share_reference``, each sample's reference score as
        training scores it, (sum, scored tokens): its tokens and the EOS that training appends
        to a sample that ran out of tokens (one forward for both)."""
        if not module.objective.requires_reference or not groups:
            return [[float("nan")] * len(g) for g in groups], None
        eos = self.encoder.eos if self.share_reference else []
        seqs = [(list(p), s) for p, g in zip(prompts, groups, strict=True) for s in g]
        rows = [p + s.ids + ([] if s.finished else eos) for p, s in seqs]
        starts = torch.tensor([len(p) for p, _ in seqs])[:, None]
        ends = torch.tensor([len(p) + len(s.ids) for p, s in seqs])[:, None]  # the KL's part
        pad = self.backend.tokenizer.pad_token_id
        ids, att = pad_rows(rows, pad if pad is not None else 0)
        cols = torch.arange(ids.shape[1])
        view = {"input_ids": ids, "attention_mask": att, "loss_mask": (cols >= starts) & att.bool()}
        device = next(module.policy.parameters()).device
        view = {k: v.to(device) for k, v in view.items()}
        if module.hparams.adapter_reference:
            with adapter_disabled(module.policy) as base:
                tokens = scored_token_logps(base, view, ONE_BY_ONE)
        else:
            tokens = scored_token_logps(module.reference.eval(), view, ONE_BY_ONE)
        tokens = tokens.float().cpu()  # column t scores token t + 1
        kl = iter(torch.where(cols[1:] < ends, tokens, 0.0).sum(-1).tolist())
        out = [[next(kl) for _ in g] for g in groups]
        if not self.share_reference:
            return out, None
        sums, counts = tokens.sum(-1).tolist(), view["loss_mask"].sum(-1).tolist()
        scored = iter(zip(sums, counts, strict=True))
        return out, [[next(scored) for _ in g] for g in groups]

    def end(self, index: int, module: Any) -> dict[str, float]:
        """After the round's last step: evaluate (when due), record, return the metrics."""
        now = time.perf_counter()
        data = self.current
        metrics = {"round": float(index), **data.metrics}
        metrics["time/training_seconds"] = now - self.timer.get("built", now)
        last = index + 1 == self.icfg.rounds
        every = self.icfg.eval_every
        if self.evaluate is not None and (last or (every and (index + 1) % every == 0)):
            t = time.perf_counter()
            out = self.folder(index) / "eval" if self.icfg.save_rounds else None
            metrics.update(self.evaluate(module.policy, out))
            metrics["time/evaluation_seconds"] = time.perf_counter() - t
        total = sum(
            v for k, v in metrics.items() if k.startswith("time/") and k.endswith("seconds")
        )
        for k in ("generation", "judging", "training"):
            metrics[f"time/{k}_share"] = metrics.get(f"time/{k}_seconds", 0.0) / max(total, 1e-9)
        self.history = [h for h in self.history if h["round"] != index] + [metrics]
        if _world()[1] == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.out_dir / "iterate.json", {"rounds": self.history})
            if self.icfg.save_rounds and self.folder(index).exists():
                saved = {"report": _public(data.report), "metrics": metrics}
                write_json(self.folder(index) / "round.json", saved | self.span(data))
        self.pending = metrics
        return metrics

    # ------------------------------------------------------------------ files
    def folder(self, index: int) -> Path:
        return self.out_dir / "rounds" / f"{index:03d}"

    def write(self, data: RoundData, folder: Path) -> None:
        """The round's folder, whole or not at all: written aside, then renamed into place."""
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with open(tmp / "samples.jsonl", "w") as f:
            for row in data.report["samples_"]:
                f.write(json_line(row))
        keep = (
            "prompt",
            "chosen",
            "rejected",
            "chosen_score",
            "rejected_score",
            "position",
            "round",
        )
        with open(tmp / "pairs.jsonl", "w") as f:
            for row in data.rows:
                f.write(json_line({k: row[k] for k in keep}))
        report = {"round": data.index, **self.span(data), **_public(data.report)}
        write_json(tmp / "data_report.json", report)
        saved = {"report": _public(data.report), "metrics": data.metrics}
        write_json(tmp / "round.json", saved | self.span(data))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)

    @staticmethod
    def span(data: RoundData) -> dict[str, int]:
        """Where the round's prompts lie in the prompt stream."""
        return {"start": data.start, "end": data.end}

    def load(self, index: int, folder: Path) -> RoundData:
        saved = json.loads((folder / "round.json").read_text())
        pairs = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
        text = {k: [p[k] for p in pairs] for k in ("prompt", "chosen", "rejected")}
        enc = self.encoder.encode_batch(text, self.views)
        rows = [{**{k: v[i] for k, v in enc.items()}, **pairs[i]} for i in range(len(pairs))]
        return RoundData(
            index, saved["start"], saved["end"], rows, saved["metrics"], saved["report"]
        )

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        cur = self.current
        if cur is None:
            return {"round": -1, "start": self.cursor, "end": self.cursor, "history": self.history}
        return {"round": cur.index, **self.span(cur), "history": self.history}

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        """Continue where a checkpoint at global ``step`` left off."""
        self.history = list(state.get("history", []))
        index = step // self.icfg.steps_per_round
        if index == state["round"]:  # in the middle of a round: its pairs must be on disk
            if not (self.folder(index) / "pairs.jsonl").exists():
                raise RoundError(
                    f"cannot resume in the middle of round {index} without its saved pairs "
                    f"({self.folder(index)}); keep iterate.save_rounds=true"
                )
            self.cursor = state["start"]
        else:  # at a round boundary: the next round starts where the last one ended
            self.cursor = state["end"]


#: A row's reference scores from its samples (:meth:`Rounds.trained_scores`).
REFERENCE = "reference_plain"


def sample_row(prompt: str, position: int, s: Sample, score: float, ref_logp: float) -> dict:
    """One line of ``samples.jsonl``."""
    return {
        "position": position,
        "prompt": prompt,
        "response": s.text,
        "score": score,
        "finished": s.finished,
        "tokens": len(s.ids),
        "logp": s.logp,
        "sampler_logp": s.sampler_logp,
        "reference_logp": ref_logp,
    }


def round_metrics(samples: list[dict], rows: list[dict]) -> dict[str, float]:
    """The round's samples and pairs under TRL's online names."""
    n = max(len(samples), 1)
    kl = [s["logp"] - s["reference_logp"] for s in samples]
    out = {
        SCORES: sum(s["score"] for s in samples) / n,
        SCORES_MARGIN: sum(r["chosen_score"] - r["rejected_score"] for r in rows)
        / max(len(rows), 1),
        SAMPLE_ENTROPY: -sum(s["logp"] for s in samples) / n,
        EOS_RATE: sum(s["finished"] for s in samples) / n,
        "objective/length": sum(len(s["response"].encode()) for s in samples) / n,
        "objective/pairs": float(len(rows)),
    }
    if samples and all(v == v for v in kl):  # NaN without a reference
        out[SAMPLE_KL] = sum(kl) / n
    return out


def _public(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if not k.endswith("_")}


# --------------------------------------------------------------------------- processes
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _gather(obj: Any) -> list[Any]:
    world, _ = _world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if _world()[0] > 1:
        dist.barrier()


def _all_done(device: torch.device) -> Callable[[bool], bool] | None:
    """Decoding stops when every process is done (sharded policies decode in lockstep)."""
    if _world()[0] == 1:
        return None

    def all_done(local: bool) -> bool:
        flag = torch.tensor([0.0 if local else 1.0], device=device)
        dist.all_reduce(flag)
        return flag.item() == 0

    return all_done


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
