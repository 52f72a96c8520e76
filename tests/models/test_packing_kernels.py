"""The one-call kernels of a packed sequence (flex attention with a block mask, flash-attention's
varlen kernel) compute the same attention as the per-row path, so packed rows score as the
padded view, in value and gradient, for every view and architecture the per-row path is tested
on, the shared-context block included.

On CPU torch's flex attention runs forward only (its backward needs CUDA) and no varlen kernel
runs at all, so value and gradient are proven here through a reference of each kernel's stated
semantics: for flex, exactly what the kernel computes from a BlockMask (full tiles visible,
partial tiles through the mask function, the rest hidden); for varlen, per sequence causal
attention aligned to its last key within the window. What is ours (the mask function, the
block mask, the gathered keys, the cumulative lengths) is then exercised whole; the real flex
forward runs here too, and the real kernels' gradients run in the CUDA tests (test_cuda.py).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from test_packing import assert_same, batch, tiny
from torch.nn.attention.flex_attention import create_block_mask, create_mask

import inspo.models.varlen_attention as va
from inspo.models.packed_attention import Blocks, PackingUnsupported, block_attention
from inspo.models.packing import pack_view, shared_contexts
from inspo.models.scoring import Scoring, prepare_packing, score_pairs

FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gpt2"]


def tiles(count: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """A BlockMask's (count, indices) → dense [q tiles, k tiles] booleans."""
    dense = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        dense[q, index[0, 0, q, : count[0, 0, q]].long()] = True
    return dense


def flex_reference(query, key, value, *, block_mask, scale=None, enable_gqa=False):
    """What flex attention computes from ``block_mask``: a key is visible in a full tile, or in
    a partial tile where the mask function says so; every other tile is skipped."""
    t = query.shape[2]
    n = -(-t // va.TILE)
    partial = tiles(block_mask.kv_num_blocks, block_mask.kv_indices, n)
    full = tiles(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, n)
    i = torch.arange(t)
    q, k = i[:, None], i[None, :]
    tile_q, tile_k = q // va.TILE, k // va.TILE
    allowed = full[tile_q, tile_k] | (partial[tile_q, tile_k] & block_mask.mask_mod(0, 0, q, k))
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed, scale=scale, enable_gqa=enable_gqa
    )


def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale, left):
    """flash-attention's varlen semantics: per sequence, query i sees key j when
    i + (Lk − Lq) − left ≤ j ≤ i + (Lk − Lq) (causal aligned to the last key)."""
    assert q.shape[0] == int(cu_q[-1]) and k.shape[0] == int(cu_k[-1])
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
    assert max_k == int((cu_k[1:] - cu_k[:-1]).max())
    out = []
    for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:], strict=True):
        lq, lk = int(b - a), int(d - c)
        i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
        mask = j <= i + lk - lq
        if left >= 0:
            mask &= j >= i + lk - lq - left
        o = F.scaled_dot_product_attention(
            *(x.transpose(0, 1)[None] for x in (q[a:b], k[c:d], v[c:d])),
            attn_mask=mask,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)


@pytest.fixture
def kernels(monkeypatch):
    """The two kernels replaced by the references above (CPU has neither's backward)."""
    monkeypatch.setattr(va, "_flex", lambda device: flex_reference)
    monkeypatch.setattr(va, "varlen_kernel", lambda: varlen_reference)


def dense_blocks(blocks: Blocks, window: int | None) -> torch.Tensor:
    """The [T, T] mask the per-row path applies (its blocks' masks, causal where None)."""
    t = blocks.positions.shape[0]
    out = torch.zeros(t, t, dtype=torch.bool)
    for (q0, q1, c0, c1), mask in zip(blocks.blocks, blocks.masks(window), strict=True):
        if mask is None:
            mask = torch.ones(q1 - q0, q1 - q0 + c1 - c0, dtype=torch.bool).tril(c1 - c0)
        mask = mask[0, 0] if mask.dim() == 4 else mask  # keys: the context's, then its own
        out[q0:q1, c0:c1] = mask[:, : c1 - c0]
        out[q0:q1, q0:q1] = mask[:, c1 - c0 :]
    return out


def random_layout(seed: int) -> Blocks:
    """Rows and shared pairs of random lengths, crossing several 128-token tiles; the first
    row is long enough to hold full tiles."""
    g = torch.Generator().manual_seed(seed)
    blocks, positions, start = [], [], 0
    for i in range(12):
        n = 300 + seed if i == 0 else int(torch.randint(1, 90, (1,), generator=g))
        if torch.rand(1, generator=g) < 0.5:  # an ordinary row
            blocks.append((start, start + n, start, start))
            positions += range(n)
            start += n
            continue
        p = int(torch.randint(1, n + 1, (1,), generator=g))  # context + chosen, then rejected
        r = int(torch.randint(1, 60, (1,), generator=g))
        blocks += [(start, start + n + 1, start, start), (start + n + 1, start + n + 1 + r,
                   start, start + p)]  # fmt: skip
        positions += [*range(n + 1), *range(p, p + r)]
        start += n + 1 + r
    return Blocks(blocks, torch.tensor(positions))


@pytest.mark.parametrize("window", [None, 5, 100])
def test_flex_mask_is_the_per_row_mask_and_its_tiles_are_create_block_mask(tokenizer, window):
    """The mask function sees exactly the keys the per-row path attends to, and the block
    mask built from the intervals lists the same partial and full tiles as torch's
    create_block_mask evaluating that function on every (query, key)."""
    view = batch(tokenizer)["plain"]
    layouts = [pack_view(view, shared_contexts(view)).blocks, pack_view(view).blocks]
    layouts += [random_layout(s) for s in range(3)]
    for blocks in layouts:
        t = blocks.positions.shape[0]
        mask = va.flex_block_mask(blocks, window)
        dense = create_mask(mask.mask_mod, 1, 1, t, t, device="cpu")[0, 0]
        assert torch.equal(dense, dense_blocks(blocks, window))
        want = create_block_mask(mask.mask_mod, 1, 1, t, t, device="cpu")
        n = -(-t // va.TILE)
        for count, index in (("kv_num_blocks", "kv_indices"),
                             ("full_kv_num_blocks", "full_kv_indices")):  # fmt: skip
            got = tiles(getattr(mask, count), getattr(mask, index), n)
            assert torch.equal(got, tiles(getattr(want, count), getattr(want, index), n))
        if t > 2 * va.TILE and window is None and blocks.blocks[0][1] > 2 * va.TILE:
            assert bool(tiles(mask.full_kv_num_blocks, mask.full_kv_indices, n).any())


def test_varlen_layout_gathers_each_context_before_its_rows_keys(tokenizer):
    """A rejected response's keys are its context's then its own, so a key's place in its
    sequence is its position id; the other rows' keys are their own tokens."""
    view = batch(tokenizer)["plain"]
    pack = pack_view(view, shared_contexts(view))
    index, cu_q, cu_k, _, _ = va.varlen_layout(pack.blocks)
    pos = pack.position_ids[0]
    for i, (q0, q1, _, _) in enumerate(pack.blocks.blocks):
        keys = index[int(cu_k[i]) : int(cu_k[i + 1])]
        assert torch.equal(pos[keys], torch.arange(len(keys)))  # place = position
        assert torch.equal(keys[-(q1 - q0) :], torch.arange(q0, q1))  # own tokens last
        assert int(cu_q[i + 1] - cu_q[i]) == q1 - q0
    assert index.shape[0] > pack.tokens  # the three shared contexts are gathered twice
    assert va.varlen_layout(pack_view(view).blocks)[0] is None  # no context: no gather


@pytest.mark.parametrize("kernel", ["flex", "varlen"])
@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_score_as_padded_for_every_view(tokenizer, kernels, family, kernel):
    """Value and gradient, every view (shared pairs, unshared, reflective, chosen only, full
    logits), train and eval, through the kernel's reference semantics."""
    model = tiny(family, tokenizer, "sdpa" if family != "gemma" else "eager")
    b = batch(tokenizer)
    how = Scoring(packing_kernel=kernel)
    shared = assert_same(model, b["plain"], how)
    assert int(shared.tokens.computed) < int(b["plain"]["attention_mask"].sum())
    assert_same(model, b["plain"], replace(how, share_prompt=False))
    assert_same(model, b["reflective"], how)
    assert_same(model, b["plain"], how, chosen_only=True)
    assert_same(model, b["reflective"], replace(how, scored_lm_head=False))
    model.eval()
    with torch.no_grad():
        assert_same(model, b["plain"], how)


@pytest.mark.parametrize("kernel", ["flex", "varlen"])
@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_kernels_cut_sliding_windows(tokenizer, kernels, family, kernel):
    extra = {"sliding_window": 5}
    if family == "qwen2":
        extra |= {"use_sliding_window": True, "max_window_layers": 1}
    model = tiny(family, tokenizer, **extra)
    b = batch(tokenizer)
    for view in (b["plain"], b["reflective"]):
        assert_same(model, view, Scoring(packing_kernel=kernel))


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma"])
def test_real_flex_forward_on_cpu_scores_as_padded(tokenizer, family):
    """torch's own flex attention (eager on CPU, forward only, slow: it evaluates the mask
    everywhere) with our block mask: the padded scores under grouped-query attention, a
    sliding window and the eager wrapper (Gemma), shared contexts included."""
    extra = {"sliding_window": 5} if family == "mistral" else {}
    model = tiny(family, tokenizer, "sdpa" if family != "gemma" else "eager", **extra).eval()
    assert prepare_packing(model)
    b = batch(tokenizer)
    with torch.no_grad():
        for view in (b["plain"], b["reflective"]):
            want = score_pairs(model, view, Scoring())[0]
            got = score_pairs(model, view, Scoring(packing=True, packing_kernel="flex"))[0]
            torch.testing.assert_close(got.chosen, want.chosen, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got.rejected, want.rejected, rtol=1e-6, atol=1e-6)
            assert int(got.tokens.computed) == int(got.tokens.real)


def test_kernel_choice(tokenizer, monkeypatch):
    """auto: per row on CPU; attention dropout always per row (no other kernel applies it);
    an unknown name is refused up front; varlen without a kernel says what to install."""
    q = torch.zeros(1, 2, 3, 4)
    assert va.pick_kernel("auto", q) == "blocks"
    assert va.pick_kernel("flex", q) == "flex"
    assert va.pick_kernel("varlen", q, dropout=0.1) == "blocks"
    with pytest.raises(ValueError, match=r"unknown packing kernel 'flash'.*auto, blocks"):
        Scoring(packing_kernel="flash")
    monkeypatch.setattr(va, "varlen_kernel", lambda: None)
    model = tiny("llama", tokenizer)
    assert prepare_packing(model)
    how = Scoring(packing=True, packing_kernel="varlen")
    with pytest.raises(RuntimeError, match=r"flash_attn package, or torch >= 2\.11"):
        score_pairs(model, batch(tokenizer)["plain"], how)


@pytest.mark.slow
def test_compiled_flex_serves_every_layout_with_one_compilation():
    """The compiled kernel the GPU runs (here inductor's CPU build, forward only: about 30 s
    to compile): block-sparse over our block mask, equal to the dense reference, and one
    graph for layouts of other lengths, windows and contexts."""
    from torch._dynamo.utils import counters  # the count of compiled graphs

    counters.clear()
    fn = va.compiled_flex()
    for seed in range(3):
        blocks = random_layout(seed)
        t = blocks.positions.shape[0]
        mask = va.flex_block_mask(blocks, None if seed % 2 else 7)
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, h, t, 16, generator=g) for h in (4, 2, 2))
        with torch.no_grad():
            got = fn(q, k, v, block_mask=mask, enable_gqa=True)
            want = flex_reference(q, k, v, block_mask=mask, enable_gqa=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


def test_per_block_attention_matches_the_dense_mask_and_refuses_a_split_context():
    """The per-block path (one split of q/k/v, a context's keys ahead of the block's own) gives
    what one dense masked attention over the whole sequence gives, values and gradients; a
    context that no single block holds is refused (the caller then scores padded)."""
    blocks = random_layout(3)
    t = blocks.positions.shape[0]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, t, 8, generator=g, requires_grad=True) for _ in range(3))
    module = torch.nn.Module()
    out, _ = block_attention(module, q, k, v, blocks, scaling=0.5)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_blocks(blocks, None), scale=0.5)
    torch.testing.assert_close(out, dense.transpose(1, 2))
    w = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad((out * w).sum(), (q, k, v))
    want = torch.autograd.grad((dense.transpose(1, 2) * w).sum(), (q, k, v))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    # Two ordinary rows of 4, then a block whose context [2, 6) straddles both of them.
    split = Blocks([(0, 4, 0, 0), (4, 8, 4, 4), (8, 10, 2, 6)], torch.tensor([*range(8), 6, 7]))
    x = torch.randn(1, 2, 10, 8)
    with pytest.raises(PackingUnsupported, match="spans several blocks"):
        block_attention(module, x, x, x, split)
