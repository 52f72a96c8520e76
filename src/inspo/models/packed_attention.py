"""Attention over a packed sequence, block by block: rows never see each other, and no [T, T]
mask exists.

A packed forward runs the rows of a batch as one sequence [1, T]. transformers can derive a
block-causal mask from packed ``position_ids`` for sdpa and eager attention, but it builds a
dense [1, 1, T, T] mask and computes all T² scores, which on CPU is slower than the padded batch
it replaces. Here each block of queries attends only to its own keys, with
``scaled_dot_product_attention`` per block, so the cost is Σ L_i² and no [T, T] mask exists
(a shared context's keys are copied ahead of the rejected response's, once per pair and layer).

A block is ``(q0, q1, c0, c1)``: the queries at packed indices [q0, q1) attend causally to the
keys at [q0, q1) and to every key at [c0, c1), a context that precedes them (empty for an
ordinary row). A pair whose chosen and rejected rows share their context is laid out as
[context, chosen response, rejected response] and becomes two blocks: the context with the
chosen response (an ordinary causal block), and the rejected response attending to the context
and to itself, never to the chosen response. The context is then computed once per pair.

The model is switched once to a registered attention implementation (``inspo_packed_sdpa`` or
``inspo_packed_eager``) that behaves exactly like the one it wraps unless a forward passes
``PACK_KWARG``; transformers hands every extra forward keyword argument down to the attention
function, and activation checkpointing replays them in backward. A model that cannot pack is
reported by :func:`packing_blocker` and the caller scores the padded view instead.

``Blocks.kernel`` picks how the layout is computed: block by block here (``blocks``, the CPU's
fastest), or in one call per layer on a GPU (``flex``, ``varlen``:
:mod:`inspo.models.varlen_attention`); ``auto`` chooses by device and dtype.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from inspo.models import varlen_attention
from inspo.models.hf_compat import eager_attention

log = logging.getLogger(__name__)

#: The forward keyword argument that carries the :class:`Blocks` of a packed sequence.
PACK_KWARG = "inspo_blocks"
#: Attention implementations that can pack → the registered wrapper of each.
WRAPPERS = {"sdpa": "inspo_packed_sdpa", "eager": "inspo_packed_eager"}
#: Keyword arguments the attention modules of Llama, Qwen2, Mistral, Gemma and GPT-2 pass and
#: that change nothing here (position_ids: the layout already has them; use_cache: no cache).
#: Anything else (soft-capping, attention sinks, position biases, bidirectional attention)
#: stops packing, so an architecture whose attention differs falls back instead of being wrong.
HARMLESS_KWARGS = frozenset({"position_ids", "use_cache", "output_attentions"})


class PackingUnsupported(RuntimeError):
    """The model's attention asked for something block attention does not do."""


@dataclass
class Blocks:
    """The attention layout of one packed sequence (see the module docstring).

    ``positions`` [T] are the tokens' position ids, used for sliding windows. ``calls`` counts
    the attention layers that used the layout, so the caller can check that every layer did.
    ``kernel``: one of :data:`~inspo.models.varlen_attention.PACKING_KERNELS`.
    """

    blocks: list[tuple[int, int, int, int]]
    positions: Tensor
    calls: int = 0
    kernel: str = "blocks"
    _masks: dict[int | None, list[Tensor | None]] = field(default_factory=dict, repr=False)
    _built: dict = field(default_factory=dict, repr=False)

    def built(self, key, make: Callable):
        """``make()``, once per ``key`` for this layout: what a kernel derives from the layout
        (a block mask, gathered key indices) is built by the first layer and shared by all."""
        if key not in self._built:
            self._built[key] = make()
        return self._built[key]

    def masks(self, window: int | None) -> list[Tensor | None]:
        """Per block, the boolean mask (True = attend) over its keys, the context's then its
        own (:meth:`split`), or None where plain causal attention is exact; built once per
        window size and shared by every layer."""
        if window not in self._masks:
            self._masks[window] = [self._mask(b, window) for b in self.blocks]
        return self._masks[window]

    def _mask(self, block: tuple[int, int, int, int], window: int | None) -> Tensor | None:
        q0, q1, c0, c1 = block
        if c0 == c1 and (window is None or q1 - q0 <= window):
            return None  # an ordinary row: plain causal attention is exact
        q_pos = self.positions[q0:q1]
        k_pos = torch.cat([self.positions[c0:c1], q_pos])
        # Causal by position: a context precedes its queries, so its keys always pass, and
        # within the block a key is visible from its own position on.
        allowed = k_pos[None, :] <= q_pos[:, None]
        if window is not None:  # as transformers' sliding_window_overlay: q − k < window
            allowed = allowed & (q_pos[:, None] - k_pos[None, :] < window)
        return allowed[None, None]

    def split(self) -> tuple[list[int], list[tuple[int, int, int] | None]]:
        """The sizes of the blocks' query spans, in order (they tile the sequence), and per
        block with a context: (the block whose queries hold the context, where the context
        starts and ends in that block's queries); None for a block without one."""

        def make() -> tuple[list[int], list[tuple[int, int, int] | None]]:
            starts = [q0 for q0, _, _, _ in self.blocks]

            def owner(c0: int, c1: int) -> tuple[int, int, int]:
                j = bisect_right(starts, c0) - 1  # the block whose queries start at or before c0
                if j < 0 or c1 > self.blocks[j][1]:
                    raise PackingUnsupported(f"the context [{c0}, {c1}) spans several blocks")
                return j, c0 - starts[j], c1 - starts[j]

            sizes = [q1 - q0 for q0, q1, _, _ in self.blocks]
            return sizes, [owner(c0, c1) if c1 > c0 else None for _, _, c0, c1 in self.blocks]

        return self.built("split", make)


def block_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    blocks: Blocks,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """Attention of a packed [1, heads, T, dim] sequence, block by block; returns the output as
    transformers' attention functions do, [1, T, heads, dim], and no weights."""
    unknown = {k for k, v in kwargs.items() if v is not None and k not in HARMLESS_KWARGS}
    if unknown:
        raise PackingUnsupported(f"the attention takes {', '.join(sorted(unknown))}")
    if getattr(module, "is_causal", True) is False:
        raise PackingUnsupported("the attention is not causal")
    blocks.calls += 1
    kernel = varlen_attention.pick_kernel(blocks.kernel, query, dropout)
    if kernel == "flex":
        return varlen_attention.flex_attention(
            query, key, value, blocks, scaling, sliding_window
        ), None
    if kernel == "varlen":
        return varlen_attention.varlen_attention(
            query, key, value, blocks, scaling, sliding_window
        ), None
    # Each block's queries, keys and values are pieces of one split (its backward is one
    # concatenation): a slice per block would give each block's gradient the whole
    # sequence's size, zero-filled and summed, layer after layer.
    sizes, spans = blocks.split()
    queries, keys, values = (t.split(sizes, dim=2) for t in (query, key, value))
    gqa = query.shape[1] != key.shape[1]
    out = []
    for i, (mask, span) in enumerate(zip(blocks.masks(sliding_window), spans, strict=True)):
        k, v = keys[i], values[i]
        if span is not None:  # the shared context's keys, then the block's own
            j, a, b = span
            k = torch.cat([keys[j][:, :, a:b], k], dim=2)
            v = torch.cat([values[j][:, :, a:b], v], dim=2)
        out.append(
            F.scaled_dot_product_attention(
                queries[i],
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=mask is None,
                scale=scaling,
                enable_gqa=gqa,
            )
        )
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def _wrapper(base: Callable[[torch.nn.Module], Callable]) -> Callable:
    """An attention function that is ``base(module)`` unless the forward passed a layout."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        blocks = kwargs.pop(PACK_KWARG, None)
        if blocks is None:
            return base(module)(module, query, key, value, attention_mask, **kwargs)
        return block_attention(module, query, key, value, blocks, **kwargs)

    return attention


def _sdpa(module: torch.nn.Module) -> Callable:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _eager(module: torch.nn.Module) -> Callable:
    # The function the attention module itself falls back to for "eager". packing_blocker
    # refuses a model whose file has none, so the wrapper is never installed without it.
    found = eager_attention(module)
    if found is None:
        raise PackingUnsupported(f"no eager_attention_forward for {type(module).__name__}")
    return found


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

    for name, base, mask in (
        (WRAPPERS["sdpa"], _sdpa, sdpa_mask),
        (WRAPPERS["eager"], _eager, eager_mask),
    ):
        AttentionInterface.register(name, _wrapper(base))
        # Padded calls build the same masks as the wrapped implementation.
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask)


_register()


def packing_blocker(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot run packed sequences, or None when it can; decided from its config
    and code before any forward."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl in WRAPPERS.values():
        return None
    if impl not in WRAPPERS:
        return f"attention implementation {impl!r} (packing needs sdpa or eager)"
    if impl == "eager" and eager_attention(model) is None:
        return f"no eager_attention_forward in {type(model).__module__}"
    text = config.get_text_config()
    if getattr(text, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping"
    if getattr(text, "reorder_and_upcast_attn", False):
        return "reorder_and_upcast_attn (GPT-2's own eager attention)"
    return None


def enable_packing(model: torch.nn.Module) -> None:
    """Switch ``model`` (and every module sharing its config) to the wrapper of its attention
    implementation: identical results for ordinary calls, block attention for packed ones. The
    switch is not saved: ``save_pretrained`` does not write the implementation."""
    impl = model.config._attn_implementation
    if impl in WRAPPERS:
        model.config._attn_implementation = WRAPPERS[impl]


def empty_mask(device: torch.device) -> Tensor:
    """The ``attention_mask`` of a packed forward: a 4-D mask is used as given, so transformers
    builds no [T, T] mask; it is never read (and, being empty, fails loudly if an attention
    that bypasses the interface tried to)."""
    return torch.empty(1, 1, 0, 0, dtype=torch.bool, device=device)
