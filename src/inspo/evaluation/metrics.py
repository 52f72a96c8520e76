"""Evaluation metrics: comparing two policies' scored samples, and the KL between policies.

- ``win_rate``: wins (+½ per tie) of one set of scored samples over another on the same prompts,
  with a Wilson 95% interval.
- ``length_controlled_win_rate``: the win probability with the length difference regressed out
  (a logistic regression of win on Δlength, read at Δlength = 0, in the spirit of AlpacaEval 2),
  flagged as not identified when Δlength does not vary.
- ``monte_carlo_kl``: KL(π_θ ‖ π_ref) from the policy's own samples.
- ``preference_accuracy``: held-out accuracy of the plain and the reflective policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from inspo.data.collate import pad_rows
from inspo.models.sampling import prompt_ids
from inspo.models.scoring import Scoring, score_sequences
from inspo.names import (
    EVAL_PLAIN_ACCURACY,
    EVAL_REFLECTIVE_ACCURACY,
    PLAIN_ACCURACY,
    VIEW_ACCURACY,
    Reflection,
)


def score(
    reward: Callable[[str, str], float], prompts: Sequence[str], responses: Sequence[str]
) -> list[float]:
    """``reward(prompt, response)`` for each pair."""
    return [reward(p, r) for p, r in zip(prompts, responses, strict=True)]


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (ties counted as half successes)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class WinRate:
    rate: float
    low: float
    high: float
    n: int
    wins: int
    ties: int


def win_rate(scores: Sequence[float], baseline: Sequence[float]) -> WinRate:
    """P(score > baseline) + ½·P(tie), paired by prompt, with a Wilson 95% interval."""
    if len(scores) != len(baseline) or not scores:
        raise ValueError("win_rate needs two equally long, non-empty lists of scores")
    wins = sum(a > b for a, b in zip(scores, baseline, strict=True))
    ties = sum(a == b for a, b in zip(scores, baseline, strict=True))
    n = len(scores)
    successes = wins + 0.5 * ties
    low, high = wilson_interval(successes, n)
    return WinRate(successes / n, low, high, n, wins, ties)


@dataclass(frozen=True)
class LengthControlled:
    """``rate``: the win probability at zero length difference when ``identified``; when the
    length difference does not vary, length cannot be separated from the policy's effect, and
    ``rate`` is the raw win rate with ``identified`` False."""

    rate: float
    identified: bool


def length_controlled_win_rate(
    scores: Sequence[float],
    baseline: Sequence[float],
    lengths: Sequence[float],
    baseline_lengths: Sequence[float],
    steps: int = 500,
) -> LengthControlled:
    """Win probability at zero length difference.

    Fits P(win) = σ(a + b·Δ), Δ = (len − len_baseline)/sd, by maximum likelihood (ties are
    half wins), and returns σ(a): how often the policy would win if its responses were as long
    as the baseline's. A policy that wins only by being longer (or shorter) loses that edge.
    When Δ is the same for every prompt (a constant gap, or equal lengths), a and b cannot be
    told apart: the result is the raw win rate, flagged ``identified=False``.
    """
    y = torch.tensor(
        [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline, strict=True)],
        dtype=torch.float64,
    )
    f64 = torch.float64
    d = torch.tensor(lengths, dtype=f64) - torch.tensor(baseline_lengths, dtype=f64)
    if len(d) < 2 or bool((d == d[0]).all()):
        return LengthControlled(float(y.mean()), identified=False)
    d = d / d.std()
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = w[0] + w[1] * d
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        loss = bce + 1e-4 * w.pow(2).sum()  # a whisper of L2 keeps separable data finite
        loss.backward()
        return loss

    opt.step(closure)
    return LengthControlled(float(torch.sigmoid(w[0].detach())), identified=True)


# --------------------------------------------------------------------------- KL
@torch.no_grad()
def sample_logps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    samples: Sequence[Sequence[int]],
    batch_size: int = 64,
) -> torch.Tensor:
    """Σ_t log π(y_t | x, y_<t) of each sampled token sequence ``samples[i]`` after its prompt,
    laid out as in generation (``[bos] + prompt``), scored as training scores sequences."""
    model.eval()
    contexts = prompt_ids(tokenizer, prompts)
    return response_logps(model, contexts, samples, tokenizer.pad_token_id, batch_size)


@torch.no_grad()
def response_logps(
    model: torch.nn.Module,
    contexts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 64,
) -> torch.Tensor:
    """Σ_t log π(y_t | c, y_<t) of each token sequence ``responses[i]`` after ``contexts[i]``
    (float32 [N]), ``batch_size`` rows per forward, scored as training scores sequences."""
    out = [
        scored_sums(
            model,
            contexts[start : start + batch_size],
            responses[start : start + batch_size],
            pad_id,
            ONE_BY_ONE,
        )
        for start in range(0, len(contexts), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0)


def scored_sums(
    model: torch.nn.Module,
    contexts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    how: Scoring,
) -> torch.Tensor:
    """One forward: the summed log-probs of ``responses[i]`` after ``contexts[i]`` (float32 [N],
    on the CPU), the rows right-padded as training's views are (rows i and N/2 + i with the same
    context are a pair that ``how`` may run it once for)."""
    rows = [list(c) + list(y) for c, y in zip(contexts, responses, strict=True)]
    ids, att = pad_rows(rows, pad_id)
    starts = torch.tensor([len(c) for c in contexts])[:, None]
    scored = ((torch.arange(ids.shape[1]) >= starts) & att.bool()).long()
    view = {"input_ids": ids, "attention_mask": att, "loss_mask": scored}
    device = next(model.parameters()).device
    sums = score_sequences(model, {k: v.to(device) for k, v in view.items()}, how).sums
    return sums.float().cpu()


#: Rows here are unrelated samples: nothing to share between them.
ONE_BY_ONE = Scoring(share_prompt=False)


def grouped_response_logps(
    model: torch.nn.Module,
    contexts: Sequence[Sequence[int]],
    groups: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
    how: Scoring,
    batch_size: int = 64,
) -> list[list[float]]:
    """:func:`response_logps` of every response of ``groups[i]`` after ``contexts[i]``, per
    group, with the responses of one context scored two at a time as pairs that share it: the
    context runs once per two responses (packed or through the KV cache, as ``how`` scores
    pairs), not once per response; ``batch_size`` rows per forward (at least one pair). A
    group's odd response is scored on its own."""
    pairs = [(i, j) for i, g in enumerate(groups) for j in range(0, len(g) - 1, 2)]
    out = [[math.nan] * len(g) for g in groups]
    per_batch = max(1, batch_size // 2)
    for start in range(0, len(pairs), per_batch):
        chunk = pairs[start : start + per_batch]
        ctx = [contexts[i] for _ in (0, 1) for i, _ in chunk]
        ys = [groups[i][j + k] for k in (0, 1) for i, j in chunk]
        sums = scored_sums(model, ctx, ys, pad_id, how).tolist()
        for n, (i, j) in enumerate(chunk):
            out[i][j], out[i][j + 1] = sums[n], sums[n + len(chunk)]
    odd = [(i, len(g) - 1) for i, g in enumerate(groups) if len(g) % 2]
    if odd:
        ctx = [contexts[i] for i, _ in odd]
        lone = response_logps(model, ctx, [groups[i][j] for i, j in odd], pad_id, batch_size)
        for (i, j), v in zip(odd, lone.tolist(), strict=True):
            out[i][j] = v
    return out


def monte_carlo_kl(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    samples: Sequence[Sequence[int]],
    batch_size: int = 64,
) -> tuple[float, float]:
    """KL(π_θ ‖ π_ref) ≈ mean_i [log π_θ(y_i|x_i) − log π_ref(y_i|x_i)], y_i ~ π_θ(·|x_i);
    returns (estimate, standard error). Unbiased only for draws from π_θ itself."""
    policy_logps = sample_logps(policy, tokenizer, prompts, samples, batch_size)
    diff = policy_logps - sample_logps(reference, tokenizer, prompts, samples, batch_size)
    se = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return float(diff.mean()), se


def preference_accuracy(metrics: dict[str, float], reflection: str | None) -> dict[str, float]:
    """Held-out preference accuracy, plain and (for reflective runs) reflective, side by side."""
    out = {}
    plain = metrics.get(PLAIN_ACCURACY)
    if plain is None and reflection == Reflection.off:
        plain = metrics.get(VIEW_ACCURACY)
    if plain is not None:
        out[EVAL_PLAIN_ACCURACY] = float(plain)
    if reflection not in (None, Reflection.off) and VIEW_ACCURACY in metrics:
        out[EVAL_REFLECTIVE_ACCURACY] = float(metrics[VIEW_ACCURACY])
    return out
