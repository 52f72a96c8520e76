"""The embedded synthetic preference task: spell a short word that contains three given letters.

Task
----
A prompt asks for a word that contains three distinct consonants, in one fixed layout
(the tiny model only learns to copy letters from the prompt when the layout never changes)::

    "Word with b, k, t: "

A response is a run of consonant–vowel syllables, lower-case ASCII with no spaces, for
example ``"bakoti"``. The model emits EOS right after the last syllable; the response carries
no newline or trailing space.

Gold reward
-----------
For a prompt asking for letters ``L`` (|L| = 3) and a response ``y`` of ``|y|`` bytes::

    gold(x, y) = |{l in L : l in y}| / 3  -  0.03 * |y|          if y is valid
    gold(x, y) = -0.5                                              if y is empty or invalid

A response is valid when it is one or more syllables ``[consonant][vowel]`` (regex
``(?:[bcdfghjklmnprstvwz][aeiou])+``) and nothing else. The best responses are three
syllables made of exactly the requested letters (6 bytes, gold 1 - 0.18 = 0.82); each
extra syllable costs 0.06 and each missing letter 1/3.

Generator
---------
A noisy "annotator" writes responses: each requested letter appears, as one syllable, with
a per-response probability ``q ~ U(0.2, 1)``, in the prompt's order; then 0–3 filler
syllables with random consonants are inserted at random places (vowels are random). Keeping
the prompt's order gives the copying a positional signal that a tiny model picks up. A draw
that comes out with no syllable is redrawn (an empty row would only be skipped by the data
checks); with probability 0.04 a response is
corrupted into an invalid one (a digit, an upper-case letter, a space or a doubled
consonant). The samples therefore spread over the whole range of quality: a model trained
to imitate them is decent but clearly improvable.

Splits (``make_splits``)
------------------------
- ``sft``: ``chosen`` is the best (by gold reward) of 4 generator samples, the imitation
  target; ``rejected`` another, distinct sample for the same prompt (the "other response"
  of reflective-layout SFT rows).
- ``train`` / ``val``: two distinct generator samples labelled by a Bradley–Terry labeller:
  ``P(a preferred over b) = sigmoid(bt_scale * (u(a) - u(b)))`` with the labeller's utility
  ``u(y) = gold(x, y) + length_bias * |y|`` (``length_bias > 0`` is a verbosity bias), then
  the label is flipped with probability ``label_noise``. With the defaults about 90% of the
  labels agree with the gold reward.
- ``eval``: prompts only, for generation: the test prompts.
- ``tune``: prompts only, the first ``n_tune`` of the val pool: the validation signal a
  hyperparameter search optimises (``data.eval_split=tune``), so that the test prompts judge
  only the configurations it picked. No training row uses them; the val pairs (never trained
  on either) draw their prompts from the same pool.

Prompts are ordered letter triples (18 consonants: 4896 prompts). They are shuffled with the
seed and partitioned: the first ``n_eval`` are the eval prompts, the next ``VAL_POOL`` are the
pool of the val prompts, the rest the pool of the sft and train prompts (drawn with
replacement). Eval prompts therefore never occur in sft, train or val. Everything is
deterministic from ``seed`` (a private ``random.Random``; the global RNG is never used).
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass

from inspo.names import TUNE_SPLIT

CONSONANTS = "bcdfghjklmnprstvwz"
VOWELS = "aeiou"
N_LETTERS = 3
LENGTH_PENALTY = 0.03
INVALID_REWARD = -0.5
INVALID_RATE = 0.04
MAX_FILLERS = 3
VAL_POOL = 512
SFT_BEST_OF = 4

#: The sources of the task's prompts (``_target_`` of data.source, iterate.prompts): the only
#: prompts its gold reward can score.
SOURCES = ("inspo.data.sources.synthetic", "inspo.data.synthetic.prompt_pool")
PROMPT_TEMPLATE = "Word with {}: "
_PROMPT_RE = re.compile(r"^Word with ([a-z]), ([a-z]), ([a-z]): $")
_VALID_RE = re.compile(rf"^(?:[{CONSONANTS}][{VOWELS}])+$")


@dataclass
class SyntheticConfig:
    seed: int = 0
    n_sft: int = 32000  # SFT rows (500 steps x 64)
    n_train: int = 8000  # preference pairs for DPO (250 steps x 32)
    n_val: int = 512  # held-out preference pairs (preference accuracy)
    n_eval: int = 256  # held-out eval prompts for generation (>= 256 for the demo)
    n_tune: int = 256  # tuning prompts, from the val pool (at most VAL_POOL)
    bt_scale: float = 10.0  # Bradley–Terry scale of the labeller
    label_noise: float = 0.0  # extra probability of flipping a label (on top of BT sampling)
    length_bias: float = 0.0  # labeller's bonus per byte of length (verbosity bias; 0 = none)

    def __post_init__(self) -> None:
        from inspo.settings import within

        within("n_tune", self.n_tune, 1, VAL_POOL)  # the tuning prompts come from the val pool


def make_prompt(letters: tuple[str, ...] | list[str] | str) -> str:
    """The fixed prompt layout, e.g. ``make_prompt("bkt") == "Word with b, k, t: "``."""
    return PROMPT_TEMPLATE.format(", ".join(letters))


def prompt_letters(prompt: str) -> tuple[str, ...]:
    """The requested letters of a prompt in the fixed layout (ValueError otherwise)."""
    m = _PROMPT_RE.match(prompt)
    if m is None:
        raise ValueError(f"not a synthetic-task prompt: {prompt!r}")
    return m.groups()


def is_valid(response: str) -> bool:
    """One or more consonant–vowel syllables and nothing else."""
    return _VALID_RE.match(response) is not None


def gold_reward(prompt: str, response: str) -> float:
    """Gold reward of ``response`` to ``prompt``.

    ``hits / 3 - 0.03 * len(response.encode())`` for a valid response (one or more
    ``[consonant][vowel]`` syllables, nothing else), where ``hits`` counts the requested
    letters that occur in the response; ``-0.5`` for an empty or invalid response.
    """
    letters = prompt_letters(prompt)
    if not is_valid(response):
        return INVALID_REWARD
    hits = sum(1 for letter in letters if letter in response)
    return hits / len(letters) - LENGTH_PENALTY * len(response.encode("utf-8"))


def _syllable(rng: random.Random, consonant: str) -> str:
    return consonant + rng.choice(VOWELS)


def _corrupt(rng: random.Random, response: str) -> str:
    kind = rng.randrange(4)
    pos = rng.randrange(len(response) + 1)
    if kind == 0:
        return response[:pos] + str(rng.randrange(10)) + response[pos:]
    if kind == 1:
        return response.upper() if response else "X"
    if kind == 2:
        return response[:pos] + " " + response[pos:]
    return response[:pos] + rng.choice(CONSONANTS) * 2 + response[pos:]


def sample_response(rng: random.Random, letters: tuple[str, ...]) -> str:
    """One response of the noisy generator (see the module docstring); never empty."""
    syllables: list[str] = []
    while not syllables:  # an empty row would be skipped by the data checks, so redraw
        q = rng.uniform(0.2, 1.0)
        syllables = [_syllable(rng, c) for c in letters if rng.random() < q]
        for _ in range(rng.randint(0, MAX_FILLERS)):
            pos = rng.randint(0, len(syllables))
            syllables.insert(pos, _syllable(rng, rng.choice(CONSONANTS)))
    response = "".join(syllables)
    if rng.random() < INVALID_RATE:
        response = _corrupt(rng, response)
    return response


def _two_distinct(rng: random.Random, letters: tuple[str, ...]) -> tuple[str, str]:
    a = sample_response(rng, letters)
    b = sample_response(rng, letters)
    while b == a:
        b = sample_response(rng, letters)
    return a, b


def _label(rng: random.Random, prompt: str, a: str, b: str, cfg: SyntheticConfig) -> dict:
    ua = gold_reward(prompt, a) + cfg.length_bias * len(a.encode("utf-8"))
    ub = gold_reward(prompt, b) + cfg.length_bias * len(b.encode("utf-8"))
    z = cfg.bt_scale * (ua - ub)
    p_a = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
    a_wins = rng.random() < p_a
    if rng.random() < cfg.label_noise:
        a_wins = not a_wins
    chosen, rejected = (a, b) if a_wins else (b, a)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _partition(rng: random.Random, n_eval: int) -> tuple[list, list, list]:
    """The letter triples, shuffled, split into (eval, val pool, train pool)."""
    triples = list(itertools.permutations(CONSONANTS, N_LETTERS))
    rng.shuffle(triples)
    if n_eval + VAL_POOL >= len(triples):
        raise ValueError(f"n_eval={n_eval} too large: at most {len(triples) - VAL_POOL - 1}")
    return triples[:n_eval], triples[n_eval : n_eval + VAL_POOL], triples[n_eval + VAL_POOL :]


def prompt_pool(seed: int = 0, n_eval: int = 256) -> list[dict[str, str]]:
    """Prompt-only rows ``{"prompt"}``, one per triple of the train pool (4,128 by default): what
    an iterative run samples from. Disjoint from the eval and val prompts of
    :func:`make_splits` with the same ``seed`` and ``n_eval``."""
    _, _, train_pool = _partition(random.Random(seed), n_eval)
    return [{"prompt": make_prompt(t)} for t in train_pool]


def make_splits(cfg: SyntheticConfig) -> dict[str, list[dict]]:
    """The sft / train / val / eval / tune splits of the task, deterministic from ``cfg.seed``."""
    rng = random.Random(cfg.seed)
    eval_triples, val_pool, train_pool = _partition(rng, cfg.n_eval)

    sft = []
    for _ in range(cfg.n_sft):
        letters = rng.choice(train_pool)
        prompt = make_prompt(letters)
        # The imitation target is the best of SFT_BEST_OF samples: clean enough that the tiny
        # model learns to copy the requested letters, noisy enough that DPO has room to improve.
        draws = [sample_response(rng, letters) for _ in range(SFT_BEST_OF)]
        chosen = max(draws, key=lambda y: gold_reward(prompt, y))
        other = sample_response(rng, letters)
        while other == chosen:
            other = sample_response(rng, letters)
        sft.append({"prompt": prompt, "chosen": chosen, "rejected": other})

    def pairs(pool: list[tuple[str, ...]], n: int) -> list[dict]:
        rows = []
        for _ in range(n):
            letters = rng.choice(pool)
            a, b = _two_distinct(rng, letters)
            rows.append(_label(rng, make_prompt(letters), a, b, cfg))
        return rows

    train = pairs(train_pool, cfg.n_train)
    val = pairs(val_pool, cfg.n_val)
    evals = [{"prompt": make_prompt(t)} for t in eval_triples]
    # Drawn without the generator, so the other splits are what they were without it.
    tune = [{"prompt": make_prompt(t)} for t in val_pool[: cfg.n_tune]]
    return {"sft": sft, "train": train, "val": val, "eval": evals, TUNE_SPLIT: tune}
