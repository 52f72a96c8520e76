"""Packed attention in one kernel call per layer, for GPUs: flex attention with a block mask
built from the layout, or flash-attention's variable-length kernel.

:mod:`inspo.models.packed_attention` computes a pack block by block, one
``scaled_dot_product_attention`` call per row and layer. On a CPU that is the fastest exact way
(cost Σ L², no [T, T] mask). On a GPU every call is a kernel launch, and a batch of many short
rows leaves the attention waiting on launches, not on arithmetic. The kernels here compute the
whole pack at once from the same layout (:class:`~inspo.models.packed_attention.Blocks`):

- ``flex``: torch's ``flex_attention`` (compiled on CUDA) with a ``BlockMask``. Query t attends
  to the keys in ``[own_lo[t], t]`` (its own row, causal, cut to the sliding window) and in
  ``[ctx_lo[t], ctx_hi[t])`` (the shared context of a rejected response; empty otherwise). The
  block mask is computed from these intervals tile by tile; no [T, T] tensor exists.
- ``varlen``: flash-attention's variable-length kernel, ``flash_attn_varlen_func`` of the
  ``flash_attn`` package or else torch's own ``torch.nn.attention.varlen.varlen_attn`` (the
  same FlashAttention-2 kernel, torch ≥ 2.11). Every block is one sequence whose keys are
  gathered as [its context, its own tokens]: a key's place in its sequence is then its position
  id, so causal attention aligned to the last key (the kernel's convention when a sequence has
  more keys than queries) and the window ``(window − 1, 0)`` are exact. Half precision only.

``auto`` (:data:`PACKING_KERNELS`) takes ``blocks`` off CUDA, ``varlen`` on CUDA in bf16/fp16
where a varlen kernel is installed, and ``flex`` on CUDA otherwise. Attention dropout, which
neither kernel here applies, runs ``blocks``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from inspo.names import PackingKernel

if TYPE_CHECKING:
    from inspo.models.packed_attention import Blocks

#: ``data.packing_kernel``: how a packed sequence's attention is computed.
PACKING_KERNELS = tuple(k.value for k in PackingKernel)
#: Query and key tile of the flex block mask (flex attention's default).
TILE = 128
HALF = (torch.bfloat16, torch.float16)


def check_kernel(name: str) -> str:
    if name not in PACKING_KERNELS:
        valid = ", ".join(PACKING_KERNELS)
        raise ValueError(f"unknown packing kernel {name!r}; valid: {valid}")
    return name


def pick_kernel(setting: str, query: Tensor, dropout: float = 0.0) -> str:
    """The kernel that computes a packed attention call: ``setting`` unless it is ``auto``."""
    if dropout > 0.0:
        return "blocks"  # the only one that applies attention dropout
    if setting != "auto":
        return setting
    if query.device.type != "cuda":
        return "blocks"
    if query.dtype in HALF and varlen_kernel() is not None:
        return "varlen"
    return "flex"


# --------------------------------------------------------------------------- token intervals
def key_intervals(blocks: Blocks, window: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per packed token t [T]: ``own_lo`` (its row's keys are [own_lo, t]) and ``ctx_lo``,
    ``ctx_hi`` (its context's keys are [ctx_lo, ctx_hi), empty when ctx_lo ≥ ctx_hi), with the
    sliding window (q − k < window, by position) applied."""
    device = blocks.positions.device
    table = torch.tensor(blocks.blocks, dtype=torch.long, device=device)  # [n, 4]
    q0, q1, c0, c1 = table.unbind(-1)
    total = int(blocks.blocks[-1][1])
    lengths = q1 - q0
    own_lo, ctx_lo, ctx_hi = (x.repeat_interleave(lengths, output_size=total) for x in (q0, c0, c1))
    if window is not None:
        t = torch.arange(total, device=device)
        pos = blocks.positions
        # In a row, index and position move together; a context key k has position k − c0.
        own_lo = torch.maximum(own_lo, t - window + 1)
        ctx_lo = torch.maximum(ctx_lo, ctx_lo + pos - window + 1)
    return own_lo, ctx_lo, ctx_hi


# --------------------------------------------------------------------------- flex
def flex_block_mask(blocks: Blocks, window: int | None):
    """The ``BlockMask`` of the layout: per (query tile, key tile), no visible key, some, or
    all (full tiles skip the mask function in the kernel). Exactly what ``create_block_mask``
    computes from :func:`flex_mask_mod`, in O(T · T/TILE) work instead of O(T²)."""
    from torch.nn.attention.flex_attention import BlockMask

    own_lo, ctx_lo, ctx_hi = key_intervals(blocks, window)
    total, device = own_lo.shape[0], own_lo.device
    n = math.ceil(total / TILE)
    k0 = torch.arange(n, device=device) * TILE  # key tiles [k0, k1); the last may overrun T
    k1 = k0 + TILE
    t = torch.arange(total, device=device)[:, None]
    own_lo, ctx_lo, ctx_hi = own_lo[:, None], ctx_lo[:, None], ctx_hi[:, None]
    some = ((own_lo < k1) & (t >= k0)) | ((ctx_lo < k1) & (ctx_hi > k0) & (ctx_lo < ctx_hi))
    # A tile that overruns T is never full: its missing keys count as hidden.
    every = ((own_lo <= k0) & (t >= k1 - 1)) | ((ctx_lo <= k0) & (ctx_hi >= k1))
    every &= k1 <= total
    pad = n * TILE - total  # query rows past T see nothing (as create_block_mask pads them)
    some = torch.nn.functional.pad(some, (0, 0, 0, pad)).view(n, TILE, n).any(1)
    every = torch.nn.functional.pad(every, (0, 0, 0, pad)).view(n, TILE, n).all(1)
    full = some & every
    partial = some & ~every
    return BlockMask.from_kv_blocks(
        *_ordered(partial),
        *_ordered(full),
        BLOCK_SIZE=TILE,
        mask_mod=flex_mask_mod(own_lo[:, 0], ctx_lo[:, 0], ctx_hi[:, 0]),
        seq_lengths=(total, total),
    )


def _ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """[q tiles, k tiles] booleans → (count [1, 1, q], indices [1, 1, q, k]): per query tile,
    how many key tiles are listed and which, listed ones first in ascending order."""
    count = dense.sum(-1, dtype=torch.int32)
    order = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return count[None, None], order[None, None]


def flex_mask_mod(own_lo: Tensor, ctx_lo: Tensor, ctx_hi: Tensor) -> Callable:
    """flex attention's mask function of the layout (True = query q sees key k)."""

    def mask_mod(b, h, q, k):
        own = (k >= own_lo[q]) & (k <= q)
        return own | ((k >= ctx_lo[q]) & (k < ctx_hi[q]))

    return mask_mod


def _flex(device_type: str) -> Callable:
    """Compiled on an accelerator; eager on CPU (a reference implementation, forward only)."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention if device_type == "cpu" else compiled_flex()


@functools.cache
def compiled_flex() -> Callable:
    """flex attention compiled once with dynamic shapes: pack lengths and layouts change
    every batch, and one compilation serves them all."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex_attention(
    query: Tensor, key: Tensor, value: Tensor, blocks: Blocks, scaling: float | None, window
) -> Tensor:
    """[1, heads, T, dim] → [1, T, heads, dim]."""
    mask = blocks.built(("flex", window), lambda: flex_block_mask(blocks, window))
    gqa = query.shape[1] != key.shape[1]
    fn = _flex(query.device.type)
    out = fn(query, key, value, block_mask=mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2)


# --------------------------------------------------------------------------- varlen
def varlen_layout(blocks: Blocks) -> tuple[Tensor | None, Tensor, Tensor, int, int]:
    """(the packed index of every gathered key, or None when no block has a context; the
    cumulative query and key lengths [blocks + 1], int32; the longest query and key run)."""
    device = blocks.positions.device
    q_len = [q1 - q0 for q0, q1, _, _ in blocks.blocks]
    k_len = [q1 - q0 + c1 - c0 for q0, q1, c0, c1 in blocks.blocks]
    index = None
    if any(c1 > c0 for _, _, c0, c1 in blocks.blocks):
        spans = [r for q0, q1, c0, c1 in blocks.blocks for r in ((c0, c1), (q0, q1))]
        index = torch.cat([torch.arange(a, b) for a, b in spans if b > a]).to(device)

    def cumulative(lengths: list[int]) -> Tensor:
        return (
            torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
        )

    return index, cumulative(q_len), cumulative(k_len), max(q_len), max(k_len)


def varlen_attention(
    query: Tensor, key: Tensor, value: Tensor, blocks: Blocks, scaling: float | None, window
) -> Tensor:
    """[1, heads, T, dim] → [1, T, heads, dim]."""
    kernel = varlen_kernel()
    if kernel is None:
        raise RuntimeError(
            "data.packing_kernel=varlen needs flash-attention's varlen kernel: the flash_attn "
            "package, or torch >= 2.11 (torch.nn.attention.varlen) on a CUDA device"
        )
    index, cu_q, cu_k, max_q, max_k = blocks.built("varlen", lambda: varlen_layout(blocks))
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, heads, dim]
    if index is not None:
        k, v = k.index_select(0, index), v.index_select(0, index)
    left = -1 if window is None else window - 1
    out = kernel(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, max_q, max_k,
                 scaling, left)  # fmt: skip
    return out[None]


def varlen_kernel() -> Callable | None:
    """``kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_left)``, causal aligned to the
    last key, for [tokens, heads, dim] inputs (keys may have fewer heads): the flash_attn
    package's where it is installed, else torch's, else None."""
    return flash_attn_kernel() or torch_varlen_kernel()


@functools.cache
def flash_attn_kernel() -> Callable | None:
    """``flash_attn_varlen_func`` of the flash_attn package, or None where it is absent."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None

    def flash(q, k, v, cu_q, cu_k, max_q, max_k, scale, left):
        return flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, max_q, max_k,
            dropout_p=0.0, softmax_scale=scale, causal=True, window_size=(left, 0),
        )  # fmt: skip

    return flash


@functools.cache
def torch_varlen_kernel() -> Callable | None:
    """torch's ``varlen_attn`` (torch >= 2.11, whose signature takes a window), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" not in params:  # torch 2.10's took is_causal and no window
        return None
    gqa = "enable_gqa" in params

    def torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, left):
        extra = {}
        if gqa:
            extra["enable_gqa"] = q.shape[1] != k.shape[1]
        elif q.shape[1] != k.shape[1]:  # no grouped-query support: repeat the key heads
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return varlen_attn(
            q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(left, 0), **extra
        )

    return torch_varlen
