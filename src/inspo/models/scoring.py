"""Sequence scores: Σ_t log π(y_t | c, y_<t) over the scored (response) tokens of each row.

:func:`score_sequences` is the one way the project scores sequences, for training, for the
reference's precomputed scores and for evaluation. It picks the cheapest exact path:

- the LM head only at the positions that predict a scored token, on the decoder's hidden
  states, tile by tile (:func:`hidden_sequence_logps`): no [rows, length, vocab] logits exist;
- a pair's shared context run once, its KV cache serving both responses
  (:func:`shared_prompt_logps`), when chosen and rejected rows share it token for token;
- full logits with a chunked log-softmax (:func:`sequence_logps`) when the caller needs the
  logits or the model's head is not a plain linear map;
- with ``Scoring.packing``, every one of these on the view's rows packed into one sequence
  without padding (:func:`packed_logps`; pairs that share a context hold it once), for a model
  switched to packing where it was prepared (:func:`prepare_packing`); a model that cannot pack
  (one warning there) or was not prepared is scored padded.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor

from inspo.models.hf_compat import cache_kwargs
from inspo.models.packed_attention import (
    PACK_KWARG,
    PackingUnsupported,
    empty_mask,
    enable_packing,
    packing_blocker,
)
from inspo.models.packing import Pack, pack_view, scored_positions, shared_contexts, unpack
from inspo.models.varlen_attention import check_kernel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scoring:
    """How sequences are scored; every path gives the same numbers.

    ``scored_lm_head``: the LM head only where a scored token is predicted (when the model's
    head allows it). ``share_prompt``: run a pair's shared context once (needs the scored-head
    path and a plain KV cache; off under activation checkpointing, which drops the cache).
    ``logp_chunk``: sequence chunk of the full-logits path's log-softmax. ``packing``: run the
    view's rows as one sequence without padding (``data.packing``), on models prepared with
    :func:`prepare_packing`. ``packing_kernel``: how a packed sequence's attention is computed
    (``data.packing_kernel``: :data:`~inspo.models.varlen_attention.PACKING_KERNELS`; ``auto``
    by device).
    """

    scored_lm_head: bool = True
    share_prompt: bool = True
    logp_chunk: int = 1024
    packing: bool = False
    packing_kernel: str = "auto"

    def __post_init__(self) -> None:
        check_kernel(self.packing_kernel)


class TokenCount(NamedTuple):
    """Positions a scoring call ran through the model (``computed``, padding included) and how
    many of them held real tokens (``real``; a shared context counts once). 0-d tensors, so
    counting needs no host sync."""

    computed: Tensor
    real: Tensor

    def __add__(self, other: TokenCount) -> TokenCount:  # type: ignore[override]
        return TokenCount(self.computed + other.computed, self.real + other.real)


class Scored(NamedTuple):
    """:func:`score_sequences`' result: sums and counts [N], logits when computed, tokens."""

    sums: Tensor
    counts: Tensor
    logits: Tensor | None
    tokens: TokenCount


@dataclass
class ViewScores:
    """Summed log-probs and scored-token counts of a pair view's chosen and rejected rows; [B].
    ``tokens``: what scoring them computed (None for precomputed scores)."""

    chosen: Tensor
    rejected: Tensor
    chosen_length: Tensor
    rejected_length: Tensor
    tokens: TokenCount | None = None


def forward(model: torch.nn.Module, view: dict[str, Tensor], output: str = "logits") -> Tensor:
    """``model``'s ``output`` on a padded view; positions count real tokens only, so left- and
    right-padded rows score the same."""
    mask = view["attention_mask"]
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=view["input_ids"],
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=False,
    )
    return out[output]


def score_sequences(
    model: torch.nn.Module,
    view: dict[str, Tensor],
    how: Scoring = Scoring(),
    *,
    need_logits: bool = False,
) -> Scored:
    """Sums [N], counts [N], logits (or None) and tokens for the N rows of ``view``
    (``input_ids``, ``attention_mask``, ``loss_mask``: 1 exactly on the scored tokens). Logits
    come back only when ``need_logits`` or when the model's head forces the full-logits path."""
    ids, scored = view["input_ids"], view["loss_mask"]
    parts = split_lm_head(model) if how.scored_lm_head and not need_logits else None
    if packed(model, how):
        try:
            return packed_logps(model, parts, view, how)
        except PackingUnsupported as e:  # found during the forward: nothing of it is kept
            _refuse(model, str(e))
    padded = TokenCount(_numel(ids), view["attention_mask"].sum())
    if parts is None:
        logits = forward(model, view)
        return Scored(*sequence_logps(logits, ids, scored, how.logp_chunk), logits, padded)
    decoder, weight = parts
    checkpointed = getattr(decoder, "gradient_checkpointing", False) and decoder.training
    if how.share_prompt and not checkpointed:
        split = split_shared_prompt(view)
        if split is not None and not _sharing_computes_less(split, ids):
            split = None
        sums = None if split is None else shared_prompt_logps(decoder, weight, split)
        if sums is not None:
            shared = [split[k] for k in ("context_mask", "response_mask")]
            tokens = TokenCount(sum(_numel(m) for m in shared), sum(m.sum() for m in shared))
            return Scored(*sums, None, tokens)
    hidden = forward(decoder, view, output="last_hidden_state")
    return Scored(*hidden_sequence_logps(hidden, weight, ids, scored), None, padded)


def scored_token_logps(
    model: torch.nn.Module, view: dict[str, Tensor], how: Scoring = Scoring()
) -> Tensor:
    """log π(token t+1 | tokens ≤ t) at every position t whose next token is scored, 0
    elsewhere: [N, T − 1], float32 at least. Its row sums are :func:`score_sequences`' sums
    (without prompt sharing); sums over parts of ``loss_mask`` come from the same forward."""
    ids, mask = view["input_ids"], view["loss_mask"][:, 1:].to(torch.bool)
    parts = split_lm_head(model) if how.scored_lm_head else None
    if parts is None:
        return masked_token_logps(forward(model, view), ids, view["loss_mask"], how.logp_chunk)
    decoder, weight = parts
    hidden = forward(decoder, view, output="last_hidden_state")
    lp = lm_head_logps(hidden[:, :-1][mask], weight, ids[:, 1:][mask])
    return lp.new_zeros(mask.shape).masked_scatter(mask, lp)


def score_pairs(
    model: torch.nn.Module,
    view: dict[str, Tensor],
    how: Scoring = Scoring(),
    *,
    chosen_only: bool = False,
    need_logits: bool = False,
) -> tuple[ViewScores, Tensor | None]:
    """A pair view (chosen rows, then rejected rows) scored as :class:`ViewScores`.
    ``chosen_only`` scores only the chosen rows (objectives that ignore the rejected response);
    the rejected fields are then zeros."""
    n = view["input_ids"].shape[0] // 2
    if chosen_only:
        view = {k: v[:n] for k, v in view.items()}
        how = replace(how, share_prompt=False)  # no pairs left to share
    sums, counts, logits, tokens = score_sequences(model, view, how, need_logits=need_logits)
    if chosen_only:
        zeros, ones = torch.zeros_like(sums), torch.ones_like(counts)
        return ViewScores(sums, zeros, counts, ones, tokens), logits
    return ViewScores(sums[:n], sums[n:], counts[:n], counts[n:], tokens), logits


def _sharing_computes_less(split: dict[str, Tensor], ids: Tensor) -> bool:
    """Contexts once and responses apart are two padded rectangles; in a batch of similar total
    lengths (``data.group_by_length``) they often hold more positions than the rows do."""
    return split["context"].numel() + split["response"].numel() < ids.numel()


def _numel(t: Tensor) -> Tensor:
    return torch.tensor(t.numel(), device=t.device)


def token_logps(logits: Tensor, targets: Tensor, chunk: int = 1024) -> Tensor:
    """log softmax(logits)[..., targets] for every position, shape ``targets.shape``.

    ``logits`` is [N, T, V] and ``targets`` [N, T] (already aligned: logits[:, t] predicts
    targets[:, t]). Computed in float32 at least, whatever the model's dtype.
    """
    out = []
    for start in range(0, logits.shape[1], chunk):
        piece = logits[:, start : start + chunk]
        if piece.dtype in (torch.float16, torch.bfloat16):
            piece = piece.float()
        tgt = targets[:, start : start + chunk].unsqueeze(-1)
        selected = piece.gather(-1, tgt).squeeze(-1)
        out.append(selected - torch.logsumexp(piece, dim=-1))
    return torch.cat(out, dim=1)


def sequence_logps(
    logits: Tensor, input_ids: Tensor, loss_mask: Tensor, chunk: int = 1024
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of the masked tokens of each sequence, and how many there are.

    ``logits`` [N, T, V] come from a causal LM on ``input_ids`` [N, T]; ``loss_mask`` [N, T] is 1
    exactly on the tokens being scored (the response, EOS included). Position t's logits predict
    token t+1, so token 0 is never scored. Padding may be on either side: masked positions
    contribute nothing. Returns (sum [N], count [N]); the mean score is sum / count.
    """
    lp = masked_token_logps(logits, input_ids, loss_mask, chunk)
    return lp.sum(-1), loss_mask[:, 1:].to(torch.bool).sum(-1)


def masked_token_logps(
    logits: Tensor, input_ids: Tensor, loss_mask: Tensor, chunk: int = 1024
) -> Tensor:
    """Per position t of [N, T − 1]: log π(token t+1 | tokens ≤ t) where that token is scored,
    0 elsewhere (the terms :func:`sequence_logps` sums)."""
    mask = loss_mask[:, 1:].to(torch.bool)
    # Masked targets may be pad ids; they are gathered and then zeroed, never out of range.
    lp = token_logps(logits[:, :-1], input_ids[:, 1:], chunk=chunk)
    return torch.where(mask, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))


# --------------------------------------------------------------------------- LM head on scored rows
#: Elements of one [rows, vocab] logits tile in :class:`_LMHeadLogps` (64 MiB in float32).
TILE_ELEMENTS = 1 << 24


class _LMHeadLogps(torch.autograd.Function):
    """log softmax(h @ W.T)[target] per row, tile by tile; backward recomputes each tile.

    Never holds more than one [tile, vocab] block of logits (forward or backward), so memory is
    O(rows × hidden + tile × vocab) instead of O(rows × vocab).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, tile: int) -> Tensor:
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least
        out = hidden.new_empty(hidden.shape[0], dtype=acc)
        lse = torch.empty_like(out)
        for s in range(0, hidden.shape[0], tile):
            logits = (hidden[s : s + tile] @ weight.T).to(acc)
            lse[s : s + tile] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(-1, targets[s : s + tile, None]).squeeze(-1)
            out[s : s + tile] = picked - lse[s : s + tile]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.tile = tile
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = lse.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_out = grad_out.to(acc)
        for s in range(0, hidden.shape[0], ctx.tile):
            h, g = hidden[s : s + ctx.tile], grad_out[s : s + ctx.tile, None]
            logits = (h @ weight.T).to(acc)
            # d(logit[t] - lse)/d logits = onehot(t) - softmax
            grad = torch.exp(logits - lse[s : s + ctx.tile, None]).mul_(-g)
            grad.scatter_add_(1, targets[s : s + ctx.tile, None], g)
            grad = grad.to(hidden.dtype)
            if need_h:
                grad_h[s : s + ctx.tile] = grad @ weight
            if need_w:
                grad_w.add_((grad.T @ h).to(acc))
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None


def lm_head_logps(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """log softmax(hidden @ weight.T)[targets] for hidden [M, d], weight [V, d], targets [M]."""
    tile = max(1, TILE_ELEMENTS // weight.shape[0])
    return _LMHeadLogps.apply(hidden, weight, targets, tile)


def hidden_sequence_logps(
    hidden: Tensor, weight: Tensor, input_ids: Tensor, loss_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Like :func:`sequence_logps`, from the last hidden states [N, T, d] and the LM head's
    weight [V, d]: the head is applied only at the positions that predict a scored token.

    Prompts, reflective contexts and padding cost no LM-head work, and no [N, T, V] logits
    exist, in forward or backward.
    """
    mask = loss_mask[:, 1:].to(torch.bool)
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
    lp = lm_head_logps(hidden[:, :-1][mask], weight, input_ids[:, 1:][mask])
    return row_sums(lp, rows, mask.shape[0]), mask.sum(-1)


def row_sums(values: Tensor, rows: Tensor, n: int) -> Tensor:
    """Σ of ``values`` per row id in ``rows``, for rows 0..n−1."""
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, rows, values)


#: Config fields that change the logits after the LM head's matmul; such models use full logits.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def split_lm_head(model: torch.nn.Module) -> tuple[torch.nn.Module, Tensor] | None:
    """(decoder, LM-head weight) when ``model``'s logits are exactly ``decoder(...) @ W.T``;
    None otherwise (wrappers, PEFT, FSDP-sharded roots, biased or scaled heads), in which case
    the caller computes full logits."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or type(model).__name__.startswith("FSDP"):
        return None
    head = model.get_output_embeddings()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or decoder in (None, model):
        return None
    config = model.config.get_text_config()
    if any(getattr(config, k, None) not in (None, 1, 1.0) for k in _LOGIT_TRANSFORMS):
        return None
    return decoder, head.weight


# --------------------------------------------------------------------------- shared prompts
def split_shared_prompt(view: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """A pair view whose chosen row i and rejected row B+i share their context token for
    token, split into the context once per pair and the 2B responses (both right-padded);
    None when any pair's contexts differ (reflective views, per-side truncation) or a row
    scores nothing.

    ``view`` is right-padded, chosen rows then rejected rows, with ``loss_mask`` 1 exactly on
    the response tokens ``[start, length)`` (inspo.data.encode.pad_view).
    """
    ids, att, scored = view["input_ids"], view["attention_mask"], view["loss_mask"]
    n, width = ids.shape
    if n % 2 or n == 0 or not bool(scored.any(-1).all()):
        return None
    length = att.sum(-1)
    if not torch.equal(att.bool(), torch.arange(width, device=ids.device) < length[:, None]):
        return None  # not right-padded (left padding, holes): positions would not line up
    b = n // 2
    start = scored.argmax(-1)  # first response token = context length
    if not torch.equal(start[:b], start[b:]) or int(start.min()) < 1:
        return None
    p = int(start.max())
    cols = torch.arange(p, device=ids.device)
    in_ctx = cols[None] < start[:b, None]
    if not torch.equal(ids[:b, :p][in_ctx], ids[b:, :p][in_ctx]):
        return None
    # Contexts stay right-padded, as in the view: a left pad would be a query row that sees no
    # key at all, which eager attention turns into NaN (and 0 · NaN reaches the real rows).
    context, context_mask = ids[:b, :p], in_ctx.long()
    r = int((length - start).max())
    jr = torch.arange(r, device=ids.device)
    response = ids.gather(1, (start[:, None] + jr[None]).clamp(max=width - 1))
    response_mask = (jr[None] < (length - start)[:, None]).long()
    return {
        "context": context,
        "context_mask": context_mask,
        "response": response,
        "response_mask": response_mask,
        "start": start,
    }


def shared_prompt_logps(
    decoder: torch.nn.Module, weight: Tensor, split: dict[str, Tensor]
) -> tuple[Tensor, Tensor] | None:
    """Sequence log-probs of a pair view with each context run once per pair, not twice.

    The context goes through ``decoder`` once (its KV cache kept, with gradients), the cache is
    tiled to the 2B rows, and the responses run on top of it: the same numbers as scoring the
    full rows (the response attends to the same keys and values at the same positions), for
    B·|context| fewer tokens of forward and backward. Returns None, before any forward, when
    the decoder's config asks for anything but a plain per-layer key/value cache (then the
    caller scores the full rows).
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    # The cache the decoder would build for itself, built here so that its layer kinds are
    # known before any work is done.
    cache = DynamicCache(config=decoder.config)
    if not all(type(x) is DynamicLayer for x in cache.layers):
        return None  # sliding-window or linear-attention layers: not tiled here
    ctx, ctx_mask = split["context"], split["context_mask"]
    b = ctx.shape[0]
    out = decoder(
        input_ids=ctx,
        attention_mask=ctx_mask,
        position_ids=(ctx_mask.cumsum(-1) - 1).clamp(min=0),
        **cache_kwargs(decoder, cache),
        use_cache=True,
    )
    rows = torch.cat([torch.arange(b, device=ctx.device)] * 2)
    cache.batch_select_indices(rows)  # chosen rows then rejected rows, as in the view
    response, response_mask = split["response"], split["response_mask"]
    positions = split["start"][:, None] + torch.arange(response.shape[1], device=ctx.device)
    hidden = decoder(
        input_ids=response,
        attention_mask=torch.cat([ctx_mask[rows], response_mask], dim=1),
        position_ids=positions,
        **cache_kwargs(decoder, cache),
        use_cache=True,
    ).last_hidden_state
    # The context's last hidden state predicts the first response token.
    last = out.last_hidden_state[torch.arange(b, device=ctx.device), split["start"][:b] - 1]
    hidden = torch.cat([last[rows, None], hidden], dim=1)
    targets = torch.cat([response[:, :1], response], dim=1)  # column 0 is never scored
    scored = torch.cat([torch.zeros_like(response_mask[:, :1]), response_mask], dim=1)
    return hidden_sequence_logps(hidden, weight, targets, scored)


# --------------------------------------------------------------------------- packed rows
#: Per model: None when it runs packed sequences, else why not.
_PACKING: weakref.WeakKeyDictionary[torch.nn.Module, str | None] = weakref.WeakKeyDictionary()
_WARNED: set[tuple[str, str]] = set()


def prepare_packing(model: torch.nn.Module) -> bool:
    """Switch ``model`` to the packing attention wrapper (identical results for ordinary calls),
    where the model is prepared for training; or warn once why it cannot, and return False
    (its batches are then scored padded). Idempotent."""
    if model not in _PACKING:
        reason = packing_blocker(model)
        if reason is None:
            enable_packing(model)
            _PACKING[model] = None
        else:
            _refuse(model, reason)
    return packs(model)


def packed(model: torch.nn.Module, how: Scoring) -> bool:
    """Whether ``model`` is scored packed under ``how``: asked for, and the model was prepared
    (a model that was not is scored padded, with one warning)."""
    if not how.packing:
        return False
    if model not in _PACKING:
        _warn_once(model, "it was not prepared for them (prepare_packing, where it is built)")
    return packs(model)


def packs(model: torch.nn.Module) -> bool:
    """Whether ``model`` was prepared for packed rows (:func:`prepare_packing`) and has not
    refused a packed forward since. Changes nothing."""
    return model in _PACKING and _PACKING[model] is None


def _refuse(model: torch.nn.Module, reason: str) -> None:
    _PACKING[model] = reason
    _warn_once(model, reason)


def _warn_once(model: torch.nn.Module, reason: str) -> None:
    key = (type(model).__name__, reason)
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning("data.packing: %s cannot run packed rows (%s); scoring padded", *key)


def packed_forward(
    model: torch.nn.Module,
    run: torch.nn.Module,
    view: dict[str, Tensor],
    contexts: Any,
    how: Scoring,
) -> tuple[Any, Pack]:
    """``run`` (``model`` or its decoder) on the view's rows packed into one sequence, each of
    ``contexts`` (:func:`shared_contexts`, or None) once, attention by ``how.packing_kernel``:
    its output and the pack. Raises :class:`PackingUnsupported` when an attention layer of
    ``model`` did not take the packed layout."""
    pack = pack_view(view, contexts)
    pack.blocks.kernel = how.packing_kernel
    out = run(
        input_ids=pack.input_ids,
        position_ids=pack.position_ids,
        attention_mask=empty_mask(view["input_ids"].device),
        use_cache=False,
        **{PACK_KWARG: pack.blocks},
    )
    layers = model.config.get_text_config().num_hidden_layers
    if pack.blocks.calls != layers:
        raise PackingUnsupported(
            f"{pack.blocks.calls} of {layers} attention layers took the packed layout"
        )
    return out, pack


def packed_logps(
    model: torch.nn.Module,
    parts: tuple[torch.nn.Module, Tensor] | None,
    view: dict[str, Tensor],
    how: Scoring,
) -> Scored:
    """:func:`score_sequences` on the view's rows packed into one sequence (see
    :mod:`inspo.models.packing`): the same numbers, no padding computed, and each shared
    context once (no KV cache needed, so this also shares under activation checkpointing).

    ``parts`` = (decoder, LM-head weight) for the scored-position head, else full logits,
    returned in the padded view's layout. Raises :class:`PackingUnsupported` when an attention
    layer did not take the packed layout (the caller then scores the padded view).
    """
    ids, scored = view["input_ids"], view["loss_mask"]
    contexts = shared_contexts(view) if how.share_prompt else None
    out, pack = packed_forward(model, model if parts is None else parts[0], view, contexts, how)
    real = torch.tensor(pack.tokens, device=ids.device)
    tokens = TokenCount(real, real)
    if parts is None:
        logits = unpack(out.logits, pack)
        return Scored(*sequence_logps(logits, ids, scored, how.logp_chunk), logits, tokens)
    rows, before, targets = scored_positions(view, pack)
    lp = lm_head_logps(out.last_hidden_state[0][before], parts[1], targets)
    return Scored(row_sums(lp, rows, ids.shape[0]), scored[:, 1:].bool().sum(-1), None, tokens)
