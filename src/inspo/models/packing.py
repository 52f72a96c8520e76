"""A padded view → one packed sequence without padding, and the way back.

The rows of a view (``input_ids``, ``attention_mask``, ``loss_mask`` [N, W]) are concatenated
into one sequence [1, T], T the number of real tokens, each row's position ids restarting at 0
as the padded forward computes them. When the chosen row i and rejected row B+i share their
context token for token (:func:`shared_contexts`), the pair is laid out as [context, chosen
response, rejected response]: the rejected response's positions continue from the context, and
the context appears once. Unlike the padded path's KV-cache sharing, this is decided pair by
pair: a pair whose two contexts were truncated differently simply packs as two rows.
:class:`Pack` keeps, for every real token of the padded view, where it sits in the pack
(``index``), so scores and logits map back to the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from inspo.models.packed_attention import Blocks


@dataclass
class Pack:
    """``input_ids`` and ``position_ids`` [1, T]; ``index`` [N, W]: the packed index of each
    real token of the padded view (0 at pads, which every mask excludes); ``blocks`` the
    attention layout."""

    input_ids: Tensor
    position_ids: Tensor
    index: Tensor
    blocks: Blocks

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]


def shared_contexts(view: dict[str, Tensor]) -> Tensor | None:
    """For a right-padded pair view (chosen rows, then rejected rows): per row [N], the length
    of the context its pair shares (the first scored column), 0 for pairs that share none
    (different contexts, as in reflective views or after per-side truncation; a row that
    scores nothing). None for a view that is not such a pair view."""
    ids, att, scored = view["input_ids"], view["attention_mask"], view["loss_mask"]
    n, width = ids.shape
    if n % 2 or n == 0:
        return None
    length = att.sum(-1)
    if not torch.equal(att.bool(), torch.arange(width, device=ids.device) < length[:, None]):
        return None  # left padding or holes: positions would not line up
    b = n // 2
    start = scored.long().argmax(-1)
    ok = scored.bool().any(-1)
    ok = ok[:b] & ok[b:] & (start[:b] == start[b:]) & (start[:b] >= 1)
    p = start[:b].clamp(max=width)
    in_ctx = torch.arange(width, device=ids.device) < p[:, None]
    ok &= ((ids[:b] == ids[b:]) | ~in_ctx).all(-1)
    context = torch.where(ok, start[:b], 0)
    return torch.cat([context, context])


def pack_view(view: dict[str, Tensor], context: Tensor | None = None) -> Pack:
    """Pack a view's real tokens. ``context`` [N] (:func:`shared_contexts`): per row, the length
    of the context its pair shares, 0 where none, for a right-padded pair view; None packs
    every row on its own (any padding side)."""
    ids, real = view["input_ids"], view["attention_mask"].bool()
    n, width = ids.shape
    cols = torch.arange(width, device=ids.device).expand(n, width)
    position = real.long().cumsum(-1) - 1  # as the padded forward computes positions
    if context is None:
        order = torch.arange(n, device=ids.device)
        keep = real
    else:  # pair i: its chosen row whole, then its rejected row after the shared context
        b = n // 2
        order = torch.stack([torch.arange(b), torch.arange(b) + b], 1).flatten().to(ids.device)
        keep = real.clone()
        keep[b:] &= cols[b:] >= context[b:, None]
    kept = keep[order]
    flat = torch.zeros(n, width, dtype=torch.long, device=ids.device)
    flat[order] = (kept.flatten().cumsum(0) - 1).view(n, width)
    index = torch.where(keep, flat, 0)
    if context is not None:  # a rejected row's context is its chosen row's
        b = n // 2
        shared = real[b:] & (cols[b:] < context[b:, None])
        index[b:] = torch.where(shared, index[:b], index[b:])
    return Pack(
        input_ids=ids[order][kept][None],
        position_ids=position[order][kept][None],
        index=index,
        blocks=_blocks(keep[order].sum(-1).tolist(), context, position[order][kept]),
    )


def _blocks(lengths: list[int], context: Tensor | None, positions: Tensor) -> Blocks:
    """One causal block per row; for a shared pair, (context + chosen) and (rejected response
    over the context)."""
    out, start = [], 0
    if context is None:
        for n in lengths:
            out.append((start, start + n, start, start))
            start += n
        return Blocks(out, positions)
    for i, p in enumerate(context[: len(lengths) // 2].tolist()):
        chosen, rejected = lengths[2 * i], lengths[2 * i + 1]  # chosen: context included
        out.append((start, start + chosen, start, start))
        out.append((start + chosen, start + chosen + rejected, start, start + p))
        start += chosen + rejected
    return Blocks(out, positions)


def scored_positions(view: dict[str, Tensor], pack: Pack) -> tuple[Tensor, Tensor, Tensor]:
    """For every scored token of the view: (its row, the packed index of the token before it,
    whose hidden state predicts it, and its id). Token 0 of a row is never scored."""
    mask = view["loss_mask"][:, 1:].bool()
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
    return rows, pack.index[:, :-1][mask], view["input_ids"][:, 1:][mask]


def unpack(packed: Tensor, pack: Pack) -> Tensor:
    """[1, T, ...] → [N, W, ...] in the padded view's layout (pads hold the first token's
    values and are masked by the caller)."""
    return packed[0][pack.index]
