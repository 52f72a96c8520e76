"""What a round is made of, as it passes from the builder (:mod:`inspo.online.builder`) to the
store (:mod:`inspo.online.store`) and to the training steps (:mod:`inspo.online.rounds`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from inspo.models.sampling import Sample
from inspo.online.prompts import Prompt


@dataclass(frozen=True)
class Response:
    """A sampled response as the loop keeps it: the sample, its judge's score, and the
    reference's log-prob of its tokens after the prompt (NaN without a reference): the KL term
    of the round's metrics, and the reference's score of it in training where training shares
    the samples' scores."""

    sample: Sample
    score: float
    reference_logp: float


@dataclass(frozen=True)
class Pair:
    """A judged pair of one prompt's responses, at ``position`` in the prompt stream."""

    position: int
    prompt: Prompt
    chosen: Response
    rejected: Response


@dataclass(frozen=True)
class SampleRecord:
    """One line of a round's ``samples.jsonl``."""

    position: int
    prompt: str
    response: str
    score: float
    finished: bool
    tokens: int
    logp: float
    sampler_logp: float
    reference_logp: float


@dataclass(frozen=True)
class PairRecord:
    """One line of a round's ``pairs.jsonl`` (trainable with ``inspo-train data=jsonl``)."""

    prompt: str
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float
    position: int
    round: int


@dataclass(frozen=True)
class PlainReference:
    """The reference's scores of a pair's plain view, as a training batch carries them."""

    chosen: float
    rejected: float
    chosen_length: int
    rejected_length: int


@dataclass(frozen=True)
class PairTokens:
    """A pair's token ids as they were sampled, what training scores: the prompt (``[bos] +
    prompt``, as the policy was sampled on), its messages as JSON (for a chat reflective
    template), and each response with its EOS where it ended with one (one that ran out of
    tokens has none). One line of a round's ``tokens.jsonl``, with the reference's scores."""

    prompt: list[int]
    chat: str
    chosen: list[int]
    rejected: list[int]


@dataclass
class TrainingPair:
    """A pair as the training steps take it: its record, its sampled ids, the token sequences
    of the views training needs (:meth:`inspo.data.encode.Encoder.encode_ids`' output), and the
    reference's plain-view scores where the samples' scores serve training (else None: the
    step runs the reference forward)."""

    record: PairRecord
    sampled: PairTokens
    tokens: dict[str, Any]
    reference: PlainReference | None = None


@dataclass
class RoundReport:
    """How a round's prompts became pairs: ``data_report.json`` and ``round.json``'s report.

    ``carried_in``: pairs sampled in earlier rounds that entered this one (the last round's
    ``carried_out``); ``carried_out``: pairs it passes on to the next round, unused (see
    :mod:`inspo.online.carry`). Every pair a round's prompts gave or it was passed is trained
    (``pairs``), carried on, or dropped by a counted reason (``dropped``)."""

    prompts: int
    samples: int
    pairs: int
    dropped: dict[str, int]
    truncated: int
    carried_in: int = 0
    carried_out: int = 0


@dataclass
class Round:
    """A round: where its prompts lie in the prompt stream (``start`` to one past ``end``),
    what its steps train on (``pairs``, in training order: pairs carried in from earlier rounds
    first), what it measured while it was built, its samples (empty for a round reloaded from
    its folder) and the pairs it had beyond what it trains on (``surplus``, in order: carried-in
    pairs it did not need, then its own). Of those, ``carry`` is what the next round takes
    (:func:`inspo.online.carry.carry_forward`), and ``pair_yield`` the loop's estimate of
    pairs per prompt after it (:class:`inspo.online.carry.PairYield`): both are saved with the
    round, so that a run restarted after the round was built goes on as it would have."""

    index: int
    start: int
    end: int
    pairs: list[TrainingPair]
    metrics: dict[str, float]
    report: RoundReport
    samples: list[SampleRecord] = field(default_factory=list)
    surplus: list[TrainingPair] = field(default_factory=list)
    carry: list[TrainingPair] = field(default_factory=list)
    pair_yield: dict[str, float] = field(default_factory=dict)
