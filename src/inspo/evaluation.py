"""Evaluating a trained policy the way it is used: from the prompt alone (SPEC §3, §5).

- ``generate``: seeded, batched sampling from π_θ(· | x) with left padding and a progress bar.
- ``win_rate``: wins (+½ per tie) of one set of scored samples over another on the same prompts,
  with a Wilson 95% interval.
- ``length_controlled_win_rate``: the win probability with the length difference regressed out
  (a logistic regression of win on Δlength, read at Δlength = 0, in the spirit of AlpacaEval 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    desc: str = "generating",
    return_ids: bool = False,
) -> list[str] | tuple[list[str], list[list[int]]]:
    """Sample one response per prompt from the plain-context policy; returns decoded text.

    Prompts are laid out as in training, ``[bos] + prompt``, left-padded so every row's next
    token follows its own prompt. The seed fixes the samples, so two policies evaluated with the
    same seed draw comparable noise. ``return_ids`` also returns each row's sampled token ids,
    up to and including the first EOS (what a Monte-Carlo KL must score, exactly).
    """
    model.eval()
    device = next(model.parameters()).device
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    outputs: list[str] = []
    sampled: list[list[int]] = []
    batches = range(0, len(encoded), batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, leave=False):
        rows = encoded[start : start + batch_size]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.as_tensor(r)
            att[i, width - len(r) :] = 1
        # generate() draws from the global RNG; seed it per batch from our own generator.
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=att.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=top_p if temperature > 0 else None,
            top_k=0 if temperature > 0 else None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        outputs.extend(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True))
        if return_ids:
            for row in out[:, width:].tolist():
                eos = tokenizer.eos_token_id
                sampled.append(row[: row.index(eos) + 1] if eos in row else row)
    return (outputs, sampled) if return_ids else outputs


def score(reward: Callable[[str, str], float], prompts: Sequence[str], responses: Sequence[str]):
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


def length_controlled_win_rate(
    scores: Sequence[float],
    baseline: Sequence[float],
    lengths: Sequence[float],
    baseline_lengths: Sequence[float],
    steps: int = 500,
) -> float:
    """Win probability at zero length difference.

    Fits P(win) = σ(a + b·Δ), Δ = (len − len_baseline)/sd, by maximum likelihood (ties are
    half wins), and returns σ(a): how often the policy would win if its responses were as long
    as the baseline's. A policy that wins only by being longer (or shorter) loses that edge.
    """
    y = torch.tensor(
        [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline, strict=True)],
        dtype=torch.float64,
    )
    f64 = torch.float64
    d = torch.tensor(lengths, dtype=f64) - torch.tensor(baseline_lengths, dtype=f64)
    d = d / d.std().clamp(min=1e-8) if len(d) > 1 else d
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
    return float(torch.sigmoid(w[0].detach()))
