"""Sampling responses from a causal LM, explicitly and reproducibly.

Everything that shapes the samples is in :class:`~inspo.settings.SamplingConfig`; the model's
``generation_config`` (a checkpoint's ``repetition_penalty``, ``no_repeat_ngram_size``,
``min_length``, ``top_k``, ...) is never read, so the samples are draws from the distribution
the config names and nothing else. That matters for anything computed from them: a Monte-Carlo
KL(π_θ ‖ π_ref) is unbiased only for samples from π_θ itself (temperature 1, no top-k/top-p).

- Prompts are laid out as in training, ``[bos] + tokenizer(prompt, add_special_tokens=False)``,
  left-padded, with positions from the attention mask.
- Each prompt is prefilled once; its KV cache is repeated for its ``n`` samples.
- Noise comes from private generators, one per (seed, prompt index, sample index): the samples
  depend neither on the global RNG nor on the batch size, and two models sampled with the same
  seed draw the same uniforms (inverse-CDF draws in vocabulary order), so their samples are
  coupled where the models agree.
- Every sample carries its summed log-probability under the model's own distribution
  (temperature 1, unprocessed) and under the distribution actually sampled from, both taken from
  the logits of the decoding steps.

:func:`sample` works on text prompts; :func:`sample_ids` on token ids (what an online training
loop holds).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from functools import cache

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache

from inspo.models.hf_compat import cache_kwargs
from inspo.settings import SamplingConfig

__all__ = ["Sample", "SamplingConfig", "prompt_ids", "sample", "sample_ids"]


@dataclass(frozen=True)
class Sample:
    """One sampled response.

    ``ids`` ends with the EOS token when ``finished``; otherwise ``max_new_tokens`` ran out.
    ``logp`` = Σ_t log π(y_t | x, y_<t) under the model's unprocessed distribution;
    ``sampler_logp`` is the same sum under the distribution sampled from (0 for greedy).
    """

    ids: list[int]
    text: str
    finished: bool
    logp: float
    sampler_logp: float


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """``[bos] + prompt`` token ids, the layout of training."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    config: SamplingConfig,
    *,
    n: int = 1,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "sampling",
) -> list[list[Sample]]:
    """``n`` responses to each prompt, ``result[i][j]`` the j-th for ``prompts[i]``; stops at
    the tokenizer's EOS; texts decoded with special tokens skipped. ``batch_size`` counts
    decoded rows, as in :func:`sample_ids`."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    groups = sample_ids(
        model,
        prompt_ids(tokenizer, prompts),
        config,
        n=n,
        eos_token_ids=[] if eos is None else [eos],
        pad_token_id=pad,
        batch_size=batch_size,
        progress=progress,
        desc=desc,
    )
    return [
        [replace(s, text=tokenizer.decode(s.ids, skip_special_tokens=True)) for s in group]
        for group in groups
    ]


@torch.no_grad()
def sample_ids(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    config: SamplingConfig,
    *,
    n: int = 1,
    eos_token_ids: Collection[int],
    pad_token_id: int,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "sampling",
    all_done: Callable[[bool], bool] | None = None,
) -> list[list[Sample]]:
    """``n`` responses to each token-id prompt (texts left empty).

    ``batch_size`` counts decoded rows: ``batch_size // n`` prompts (at least one) per batch.
    ``prompts[i]``'s j-th sample uses the noise of (``config.seed``, i, j), so an online loop
    that wants fresh samples each step passes a fresh seed.

    ``all_done(local_done) -> bool`` decides when a batch stops decoding; a sharded (FSDP)
    policy needs every process to run the same forwards, so it passes a function that is
    true only when every process is done (and gives every process as many prompts).
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt: nothing to condition the first token on")
    was_training = model.training
    model.eval()
    per_batch = max(1, batch_size // n)
    starts = range(0, len(prompts), per_batch)
    out: list[list[Sample]] = []
    try:
        for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
            rows = [list(p) for p in prompts[start : start + per_batch]]
            out += _sample_batch(
                model,
                rows,
                range(start, start + len(rows)),
                config,
                n,
                set(eos_token_ids),
                pad_token_id,
                all_done,
            )
    finally:
        model.train(was_training)
    return out


#: The share of a batch's rows that must have finished before they leave it: leaving copies
#: the KV cache of the rows that stay, about one decoding step's cache traffic.
LEAVE_AT = 1 / 8


def _sample_batch(
    model: PreTrainedModel,
    rows: list[list[int]],
    indices: range,
    config: SamplingConfig,
    n: int,
    eos: set[int],
    pad: int,
    all_done: Callable[[bool], bool] | None = None,
) -> list[list[Sample]]:
    """Decode ``n`` samples of each row of one batch, step by step on one KV cache.

    Rows that finished leave the batch (their cache rows too) once they are ``LEAVE_AT`` of it:
    a response that ended early costs no further forwards. The noise is indexed by the
    sample, not by its place in the batch, so the samples do not depend on when rows leave.
    """
    cache, logits, att, pos = _prefill(model, rows, n, pad)
    device, n_rows = logits.device, logits.shape[0]
    noise = None if config.greedy else _noise(config, indices, n).to(device)
    eos_ids = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    live = torch.arange(n_rows, device=device)  # the sample each row of the batch decodes
    finished = torch.zeros(n_rows, dtype=torch.bool, device=device)
    length = torch.zeros(n_rows, dtype=torch.long, device=device)
    logp = torch.zeros(n_rows, dtype=torch.float64, device=device)
    qlogp = torch.zeros_like(logp)
    tokens = torch.full((n_rows, config.max_new_tokens), pad, dtype=torch.long, device=device)
    done = torch.zeros(n_rows, dtype=torch.bool, device=device)  # per batch row
    for t in range(config.max_new_tokens):
        token, lp, qp = _choose(logits, config, None if noise is None else noise[live, t])
        going = ~done
        token = token.masked_fill(done, pad)
        tokens[live, t] = token
        logp[live] += torch.where(going, lp, 0.0)
        qlogp[live] += torch.where(going, qp, 0.0)
        length[live] += going.long()
        ended = going & torch.isin(token, eos_ids)
        finished[live] |= ended
        done |= ended
        stop = bool(done.all())
        if t + 1 == config.max_new_tokens or (all_done(stop) if all_done else stop):
            break
        if int(done.sum()) >= LEAVE_AT * len(done) and not stop:
            keep = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            live, token, att, pos, done = live[keep], token[keep], att[keep], pos[keep], done[keep]
        # A sharded policy may go on after this process's rows all ended: they keep decoding
        # pad tokens (ignored) so every process runs the same forwards.
        att = torch.cat([att, att.new_ones(len(live), 1)], dim=-1)
        pos = pos + 1
        logits = _next_logits(model, token[:, None], att, pos, cache)
    columns = (length.tolist(), finished.tolist(), logp.tolist(), qlogp.tolist())
    ids = tokens.tolist()
    flat = [
        Sample(ids[r][:k], "", bool(f), float(a), float(b))
        for r, (k, f, a, b) in enumerate(zip(*columns, strict=True))
    ]
    return [flat[i * n : (i + 1) * n] for i in range(len(rows))]


def _prefill(
    model: PreTrainedModel, rows: list[list[int]], n: int, pad: int
) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over the prompts, then everything repeated for their ``n`` samples:
    (cache, next-token logits, attention mask, last positions), ``len(rows) * n`` rows each."""
    ids, att = _left_pad(rows, pad, next(model.parameters()).device)
    pos = (att.cumsum(-1) - 1).clamp(min=0)  # left padding: each row's positions start at 0
    cache = DynamicCache(config=model.config)
    logits = _next_logits(model, ids, att, pos, cache)
    # Sample j of prompt i is row i·n + j: repeat_interleave keeps each prompt's rows together.
    cache.batch_repeat_interleave(n)
    last = pos[:, -1:].repeat_interleave(n, 0)
    return cache, logits.repeat_interleave(n, 0), att.repeat_interleave(n, 0), last


def _left_pad(
    rows: list[list[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding, so that every row's next token follows its own last prompt token."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.as_tensor(r, dtype=torch.long)
        att[i, width - len(r) :] = 1
    return ids.to(device), att.to(device)


def _next_logits(
    model: PreTrainedModel,
    ids: torch.Tensor,
    att: torch.Tensor,
    pos: torch.Tensor,
    cache: DynamicCache,
) -> torch.Tensor:
    """Float32 logits of the next token, [rows, vocab], extending ``cache`` in place."""
    # Only the last position's logits are needed; models that can skip the others save a
    # [rows, prompt length, vocab] tensor at prefill.
    keep = {"logits_to_keep": 1} if _takes_logits_to_keep(type(model)) else {}
    out = model(
        input_ids=ids,
        attention_mask=att,
        position_ids=pos,
        **cache_kwargs(model, cache),
        use_cache=True,
        **keep,
    )
    return out.logits[:, -1].float()


@cache
def _takes_logits_to_keep(cls: type) -> bool:
    # Once per class: reading a signature costs about as much as a tiny model's decoding step's
    # sampling arithmetic, and this runs at every step.
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def _noise(config: SamplingConfig, indices: range, n: int) -> torch.Tensor:
    """Uniforms [rows, max_new_tokens] in float64, row (i, j) from its own generator."""
    out = torch.empty((len(indices) * n, config.max_new_tokens), dtype=torch.float64)
    for r, (i, j) in enumerate((i, j) for i in indices for j in range(n)):
        gen = torch.Generator().manual_seed(_row_seed(config.seed, i, j))
        out[r] = torch.rand(config.max_new_tokens, generator=gen, dtype=torch.float64)
    return out


def _row_seed(seed: int, prompt: int, sample: int) -> int:
    # SeedSequence mixes the three integers, so nearby (seed, i, j) give unrelated streams.
    state = np.random.SeedSequence([seed, prompt, sample]).generate_state(1, np.uint64)[0]
    return int(state) >> 1  # torch seeds must fit in a signed 64-bit integer


def _choose(
    logits: torch.Tensor, config: SamplingConfig, u: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, log π(token), log q(token)) per row: π the model's distribution, q the one
    sampled from. ``u`` holds one uniform per row; None means greedy."""
    logp = logits.log_softmax(-1)
    if u is None:
        token = logits.argmax(-1)
        zero = logits.new_zeros(logits.shape[0], dtype=torch.float64)  # greedy: q(token) = 1
        return token, _at(logp, token), zero
    logq = sampler_logprobs(logits, config)
    token = _inverse_cdf(logq, u)
    return token, _at(logp, token), _at(logq, token)


def _at(logprobs: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    return logprobs.gather(-1, token[:, None]).squeeze(-1).double()


def sampler_logprobs(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """log q(· | ·) [rows, vocab] of the distribution sampled from: logits / temperature, then
    the top-k (ties at the k-th value kept), then the smallest top-p nucleus; −inf outside."""
    scaled = logits / config.temperature
    if 0 < config.top_k < scaled.shape[-1]:
        kth = scaled.topk(config.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if config.top_p < 1:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop_sorted = probs.cumsum(-1) - probs >= config.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled.log_softmax(-1)


def _inverse_cdf(logq: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token whose CDF interval (in vocabulary order) holds ``u``; never a zero-mass one."""
    cdf = logq.double().exp().cumsum(-1)
    total = cdf[:, -1:]
    # u < 1, but u·total can round up to total; keep it strictly below the last step.
    v = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, v, right=True).squeeze(-1)
