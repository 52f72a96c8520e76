"""Building a round: prompts from the stream → samples → judged → paired → encoded.

:meth:`RoundBuilder.build` draws prompts from the run's seeded prompt stream until the round
has its pairs. Each chunk of prompts is shared out among the processes; each samples
``samples_per_prompt`` responses of its share from the live policy (:meth:`~RoundBuilder.sample`),
has the judge score them (:meth:`~RoundBuilder.judge_groups`), scores them under the reference
(:meth:`~RoundBuilder.reference_logps`: the round's KL, and training's reference scores where
they can be shared), pairs each prompt's responses (:meth:`~RoundBuilder.pair`) and encodes
the pairs into the views training needs (:meth:`~RoundBuilder.encode`); the pairs of every
process are then gathered, in stream order. A round trains first on the pairs carried into it
from earlier rounds, then on its own; what it has beyond what it needs is its ``surplus``, which
the loop carries into the next round or drops, counted (:mod:`inspo.online.carry`).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from inspo.data.encode import Encoder
from inspo.evaluation.metrics import grouped_response_logps
from inspo.models.sampling import Sample
from inspo.names import EOS_RATE, PLAIN, SAMPLE_ENTROPY, SAMPLE_KL, SCORES, SCORES_MARGIN
from inspo.online import processes
from inspo.online.carry import pair_counts
from inspo.online.generation import Backend
from inspo.online.judges import Group, Judge, JudgeError
from inspo.online.pairing import Candidate, Pairing
from inspo.online.prompts import Prompt, stream
from inspo.online.records import (
    Pair,
    PairRecord,
    PairTokens,
    PlainReference,
    Response,
    Round,
    RoundReport,
    SampleRecord,
    TrainingPair,
)
from inspo.training.guards import RunFailure


class RoundError(RuntimeError):
    """A round that cannot be built (a failing judge, too few pairs)."""


class TooFewPairs(RoundError, RunFailure):
    """The policy's samples no longer give pairs (almost every prompt a tie: a collapsed
    policy): the run fails as a diverged one does, with its summary."""


@dataclass
class Chunk:
    """What one process built from its share of a chunk of prompts."""

    pairs: list[TrainingPair]
    samples: list[SampleRecord]
    dropped: Counter


class RoundBuilder:
    """Builds rounds from the prompt pool; see the module docstring.

    ``share_reference``: the reference's scores of the samples, taken for the round's KL, are
    also the plain view's reference scores in training (see
    :func:`inspo.online.run.shares_reference_scores`): one reference forward per sample, not a
    second one per trained pair.
    """

    def __init__(
        self,
        pool: Sequence[Prompt],
        backend: Backend,
        judge: Judge,
        pairing: Pairing,
        encoder: Encoder,
        views: tuple[str, ...],
        *,
        samples_per_prompt: int,
        max_prompts_factor: int,
        seed: int,
        share_reference: bool = False,
    ) -> None:
        self.pool, self.backend, self.judge, self.pairing = pool, backend, judge, pairing
        self.encoder, self.views = encoder, views
        self.samples_per_prompt = samples_per_prompt
        self.max_prompts_factor = max_prompts_factor
        self.seed = seed
        self.share_reference = share_reference

    # ------------------------------------------------------------------ a round
    def build(
        self,
        index: int,
        start: int,
        needed: int,
        module: Any,
        carried: Sequence[TrainingPair] = (),
        plan: Callable[[int, list[int]], int] | None = None,
    ) -> Round:
        """Round ``index``: the ``carried`` pairs first, then prompts from position ``start`` of
        the stream, sampled, judged and paired until it has ``needed`` pairs.
        ``plan(missing, counts)``: how many prompts to draw for ``missing`` pairs, given how many
        pairs each prompt drawn so far in this round gave (None: as many as are missing)."""
        size = processes.world()[0]
        cursor = start
        pairs: list[TrainingPair] = list(carried)
        samples: list[SampleRecord] = []
        dropped: Counter = Counter()
        seconds: Counter = Counter()
        if len(pairs) < needed:
            self.backend.sync(module.policy)
        while len(pairs) < needed:
            if cursor - start > self.max_prompts_factor * needed:
                raise TooFewPairs(
                    f"round {index} found {len(pairs) - len(carried)} of its "
                    f"{needed - len(carried)} pairs in {cursor - start} prompts; "
                    f"dropped: {dict(dropped)}"
                )
            missing = needed - len(pairs)
            if plan is None:
                count = missing
            else:
                drawn = pair_counts(pairs[len(carried) :], index, start, cursor)
                count = min(plan(missing, drawn), self.max_prompts_factor * needed)
            prompts = stream(self.pool, self.seed, cursor, max(count, size))
            # Every process ends with the same lists, in stream order.
            parts = processes.gather(self.chunk(index, prompts, cursor, module, seconds))
            pairs += sorted((p for c in parts for p in c.pairs), key=lambda p: p.record.position)
            samples += sorted((s for c in parts for s in c.samples), key=lambda s: s.position)
            for part in parts:
                dropped.update(part.dropped)
            cursor += len(prompts)
        pairs, surplus = pairs[:needed], pairs[needed:]
        metrics = round_metrics(samples, [p.record for p in pairs])
        metrics.update({f"time/{k}_seconds": v for k, v in seconds.items()})
        report = RoundReport(
            prompts=cursor - start,
            samples=len(samples),
            pairs=len(pairs),
            dropped=dict(sorted(dropped.items())),
            truncated=sum(p.tokens["truncated"] for p in pairs),
            carried_in=len(carried),
        )
        return Round(index, start, cursor, pairs, metrics, report, samples, surplus)

    def chunk(
        self, index: int, prompts: list[Prompt], at: int, module: Any, seconds: Counter
    ) -> Chunk:
        """This process's share of ``prompts`` (position ``at`` of the stream onwards):
        sampled, judged, scored by the reference, paired and encoded."""
        size, rank = processes.world()
        mine = list(range(rank, len(prompts), size))
        groups = self.sample([p.ids for p in prompts], mine, at, module, seconds)
        scores = self.judge_groups(index, [prompts[i] for i in mine], groups, seconds)
        ref = self.reference_logps(module, [prompts[i].ids for i in mine], groups)
        rng = random.Random(stream_seed(self.seed, at, rank, PAIRING))
        dropped: Counter = Counter()
        pairs: list[Pair] = []
        samples: list[SampleRecord] = []
        for i, group, sc, lp in zip(mine, groups, scores, ref, strict=True):
            responses = [Response(s, v, r) for s, v, r in zip(group, sc, lp, strict=True)]
            samples += [sample_record(prompts[i].text, at + i, r) for r in responses]
            pairs += self.pair(at + i, prompts[i], responses, rng, dropped)
        return Chunk(self.encode(index, pairs, dropped), samples, dropped)

    # ------------------------------------------------------------------ its steps
    def sample(
        self,
        prompts: list[tuple[int, ...]],
        mine: list[int],
        at: int,
        module: Any,
        seconds: Counter,
    ) -> list[list[Sample]]:
        """``samples_per_prompt`` samples of each of this process's prompts (``mine``)."""
        size, rank = processes.world()
        # Every process decodes as many prompts (a sharded policy needs equal forwards).
        ids = [prompts[i] for i in mine] or [prompts[0]]
        ids += [ids[-1]] * (-(-len(prompts) // size) - len(ids))
        t = time.perf_counter()
        seed = stream_seed(self.seed, at, rank)
        device = next(module.policy.parameters()).device
        n = self.samples_per_prompt
        groups = self.backend.generate(ids, n, seed, processes.all_done(device))
        seconds["generation"] += time.perf_counter() - t
        return groups[: len(mine)]

    def judge_groups(
        self, index: int, prompts: list[Prompt], groups: list[list[Sample]], seconds: Counter
    ) -> list[list[float]]:
        """The judge's score of every sample, per prompt."""
        t = time.perf_counter()
        judged = [
            Group(p.text, [s.text for s in g], [s.finished for s in g])
            for p, g in zip(prompts, groups, strict=True)
        ]
        try:
            scores = self.judge.judge(judged) if judged else []
        except Exception as e:
            raise JudgeError(f"judge {self.judge!r} failed in round {index}: {e}") from e
        seconds["judging"] += time.perf_counter() - t
        return scores

    def pair(
        self,
        position: int,
        prompt: Prompt,
        responses: list[Response],
        rng: random.Random,
        dropped: Counter,
    ) -> list[Pair]:
        """The pairs of one prompt's responses (drops counted in ``dropped``)."""
        candidates = [
            Candidate(r.sample.text, r.score, r.sample.finished, j) for j, r in enumerate(responses)
        ]
        return [
            Pair(position, prompt, responses[hi.index], responses[lo.index])
            for hi, lo in self.pairing.pairs(candidates, rng, dropped)
        ]

    def encode(self, index: int, pairs: list[Pair], dropped: Counter) -> list[TrainingPair]:
        """The pairs as training takes them: the token rows of the views it needs, built from
        the sampled ids (never from their decoded text, which need not tokenise back to them);
        a pair identical after truncation is dropped (counted)."""
        out = []
        v = self.views[0]
        for p in pairs:
            record = PairRecord(
                prompt=p.prompt.text,
                chosen=p.chosen.sample.text,
                rejected=p.rejected.sample.text,
                chosen_score=p.chosen.score,
                rejected_score=p.rejected.score,
                position=p.position,
                round=index,
            )
            sampled = PairTokens(
                list(p.prompt.ids), p.prompt.chat, p.chosen.sample.ids, p.rejected.sample.ids
            )
            tokens = self.tokens(sampled)
            if (
                tokens[f"{v}_chosen"][tokens[f"{v}_chosen_start"] :]
                == tokens[f"{v}_rejected"][tokens[f"{v}_rejected_start"] :]
            ):
                dropped["identical_after_truncation"] += 1
                continue
            out.append(TrainingPair(record, sampled, tokens, self.plain_reference(tokens, p)))
        return out

    def tokens(self, sampled: PairTokens) -> dict[str, Any]:
        """The views' token rows of a pair's sampled ids: the prompt as it was sampled on, each
        response as it was sampled (an EOS it ended with kept once; none added to a response
        that ran out of tokens)."""
        enc, eos = self.encoder, self.encoder.eos
        x = (
            sampled.prompt[len(enc.bos) :]
            if sampled.prompt[: len(enc.bos)] == enc.bos
            else sampled.prompt
        )
        ended = [bool(eos) and y[-len(eos) :] == eos for y in (sampled.chosen, sampled.rejected)]
        y_w, y_l = (
            y[: len(y) - len(eos)] if e else y
            for y, e in zip((sampled.chosen, sampled.rejected), ended, strict=True)
        )
        return enc.encode_ids(x, y_w, y_l, self.views, sampled.chat or None, eos=tuple(ended))

    def plain_reference(self, tokens: dict[str, Any], pair: Pair) -> PlainReference | None:
        """The reference's scores of the pair's plain view, from its samples' scores, when the
        view holds exactly the sampled tokens after the prompt (not truncated); else None."""
        if not self.share_reference:
            return None
        prompt = list(pair.prompt.ids)
        responses = (pair.chosen, pair.rejected)
        for side, r in zip(("chosen", "rejected"), responses, strict=True):
            if tokens.get(f"{PLAIN}_{side}") != prompt + r.sample.ids:
                return None
            if tokens[f"{PLAIN}_{side}_start"] != len(prompt):
                return None
        chosen, rejected = responses
        return PlainReference(
            chosen.reference_logp,
            rejected.reference_logp,
            len(chosen.sample.ids),
            len(rejected.sample.ids),
        )

    @torch.no_grad()
    def reference_logps(
        self, module: Any, prompts: list[tuple[int, ...]], groups: list[list[Sample]]
    ) -> list[list[float]]:
        """log π_ref of each sample's tokens after its prompt, per prompt (NaN without a
        reference), ``backend.batch_size`` rows per forward, a prompt's samples two at a time
        over one pass of the prompt, as training scores pairs: the KL term of the round's
        metrics, and with ``share_reference`` the plain view's reference score in training
        (which scores exactly these tokens)."""
        if not module.objective.requires_reference or not groups:
            return [[float("nan")] * len(g) for g in groups]
        responses = [[s.ids for s in g] for g in groups]
        pad = self.backend.tokenizer.pad_token_id
        pad = pad if pad is not None else self.encoder.eos[0] if self.encoder.eos else 0
        with module.reference_model() as reference:
            return grouped_response_logps(
                reference, prompts, responses, pad, module.scoring, self.backend.batch_size
            )


#: Tags the pairing draws' seeds apart from the sampling noise's.
PAIRING = 1


def stream_seed(seed: int, position: int, rank: int, *tag: int) -> int:
    """The seed of what a process draws for the chunk at ``position`` of the prompt stream in
    the run seeded ``seed``: nearby arguments give unrelated streams, and a resumed run draws
    the same."""
    return int(np.random.SeedSequence([seed, position, rank, *tag]).generate_state(1)[0] >> 1)


def sample_record(prompt: str, position: int, r: Response) -> SampleRecord:
    s = r.sample
    return SampleRecord(
        position=position,
        prompt=prompt,
        response=s.text,
        score=r.score,
        finished=s.finished,
        tokens=len(s.ids),
        logp=s.logp,
        sampler_logp=s.sampler_logp,
        reference_logp=r.reference_logp,
    )


def round_metrics(samples: list[SampleRecord], pairs: list[PairRecord]) -> dict[str, float]:
    """The round's samples and pairs under TRL's online names (a round that sampled nothing,
    training on carried pairs only, has no sample metrics)."""
    margin = sum(p.chosen_score - p.rejected_score for p in pairs) / max(len(pairs), 1)
    if not samples:
        return {SCORES_MARGIN: margin, "objective/pairs": float(len(pairs))}
    n = len(samples)
    kl = [s.logp - s.reference_logp for s in samples]
    out = {
        SCORES: sum(s.score for s in samples) / n,
        SCORES_MARGIN: margin,
        SAMPLE_ENTROPY: -sum(s.logp for s in samples) / n,
        EOS_RATE: sum(s.finished for s in samples) / n,
        "objective/length": sum(len(s.response.encode()) for s in samples) / n,
        "objective/pairs": float(len(pairs)),
    }
    if all(v == v for v in kl):  # NaN without a reference
        out[SAMPLE_KL] = sum(kl) / n
    return out
