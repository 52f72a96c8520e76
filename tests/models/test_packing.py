"""Packed rows (data.packing) score exactly as the padded view: every view, every path, tiny
random Llama, Qwen2, Mistral, Gemma and GPT-2 with sdpa and eager attention, in value and in the
policy's gradients; models that cannot pack fall back to padding with one warning."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import inspo.models.packed_attention as packed_attention
from inspo.data.collate import PreferenceCollator
from inspo.data.encode import Encoder
from inspo.data.templates import resolve_template
from inspo.models.load import enable_checkpointing, turn_off_dropout
from inspo.models.packing import pack_view, shared_contexts, unpack
from inspo.models.scoring import Scoring, prepare_packing, score_pairs, score_sequences

# The last pair's prompt is cut to fit max_length, by a different amount on each side (its
# responses differ in length), so its two contexts differ: it packs as two rows, the others
# as [context, chosen, rejected].
PAIRS = [
    ("Q: abc? ", "yes", "no no no"),
    ("Question: why is it so? ", "because", "x"),
    ("Hi ", "a longer chosen answer", "short"),
    ("A long prompt that will not fit whole. " * 2, "a b c d e f g h", "z"),
]
MAX_LENGTH = 48
FAMILIES = {
    "llama": {"num_key_value_heads": 1},  # grouped-query attention
    "qwen2": {"num_key_value_heads": 2},
    "mistral": {"num_key_value_heads": 1},
    "gemma": {"num_key_value_heads": 2, "head_dim": 16},
    "gpt2": {},
}


def tiny(family, tokenizer, attn="sdpa", **extra):
    sizes = (
        {"n_embd": 32, "n_layer": 2, "n_head": 2}
        if family == "gpt2"
        else {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    )
    cfg = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        intermediate_size=64,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
        **{**FAMILIES.get(family, {}), **extra},
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    return turn_off_dropout(model).double().train()


def batch(tokenizer, pairs=PAIRS):
    views = ("plain", "reflective")
    enc = Encoder(
        tokenizer, resolve_template("default"), max_length=MAX_LENGTH, max_prompt_length=64
    )
    rows = [{**enc.encode(p, c, r, views), "index": i} for i, (p, c, r) in enumerate(pairs)]
    return PreferenceCollator(tokenizer.pad_token_id, views)(rows)


def scores_and_grads(model, view, how, **kw):
    """The scores of every row, and the gradient of a loss that weighs every row differently."""
    model.zero_grad(set_to_none=True)
    s, logits = score_pairs(model, view, how, **kw)
    sums = torch.cat([s.chosen, s.rejected])
    weights = torch.linspace(1.0, -2.0, sums.shape[0], dtype=sums.dtype)
    if sums.requires_grad:
        (sums * weights).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return sums.detach(), grads, s, logits


def assert_same(model, view, how, **kw):
    """Packed and padded: equal scores, counts and gradients; returns the packed scores."""
    want, want_g, padded, want_logits = scores_and_grads(model, view, how, **kw)
    assert prepare_packing(model)
    got, got_g, packed, got_logits = scores_and_grads(model, view, replace(how, packing=True), **kw)
    # Float64 models, but parts of them compute in float32 (RMSNorm; eager's softmax, where
    # the pack runs sdpa), so "equal" is to float32 rounding, not to float64's.
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(packed.chosen_length, padded.chosen_length)
    assert torch.equal(packed.rejected_length, padded.rejected_length)
    assert len(got_g) == len(want_g) and (len(got_g) > 0) == torch.is_grad_enabled()
    for g, w in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6 * float(w.abs().max()))
    if want_logits is not None:  # the full-logits path hands back the padded layout
        real = view["attention_mask"].bool()
        torch.testing.assert_close(got_logits[real], want_logits[real], rtol=1e-6, atol=1e-6)
    assert int(packed.tokens.computed) == int(packed.tokens.real)  # nothing padded computed
    return packed


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_equals_padded_for_every_view(tokenizer, family, attn):
    model = tiny(family, tokenizer, attn)
    b = batch(tokenizer)
    plain, reflective = b["plain"], b["reflective"]
    how = Scoring()
    # plain with shared contexts: three pairs share theirs, the truncated one cannot
    context = shared_contexts(plain)
    assert (context[:4] > 0).tolist() == [True, True, True, False]
    shared = assert_same(model, plain, how)
    real = int(plain["attention_mask"].sum())
    assert int(shared.tokens.computed) == real - int(context[4:].sum())
    # plain without sharing, the reflective view (contexts differ by construction), the
    # chosen rows alone (SFT terms), the full-logits path (distillation, unusual heads)
    unshared = assert_same(model, plain, replace(how, share_prompt=False))
    assert int(unshared.tokens.computed) == real
    assert_same(model, reflective, how)
    assert_same(model, plain, how, chosen_only=True)
    assert_same(model, plain, replace(how, scored_lm_head=False))
    assert_same(model, reflective, how, need_logits=True)
    # the reference: eval mode, no graph
    model.eval()
    with torch.no_grad():
        assert_same(model, plain, how)
        assert_same(model, reflective, how)
    assert model.config._attn_implementation == packed_attention.WRAPPERS[attn]


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_windows_pack(tokenizer, family):
    """A window shorter than the rows: each block's keys are cut to the window by position,
    as transformers' sliding-window mask does (Qwen2: the window on its upper layers only)."""
    extra = {"sliding_window": 5}
    if family == "qwen2":
        extra |= {"use_sliding_window": True, "max_window_layers": 1}
    model = tiny(family, tokenizer, **extra)
    b = batch(tokenizer)
    for view in (b["plain"], b["reflective"]):
        assert_same(model, view, Scoring())
    model.eval()
    with torch.no_grad():
        out = score_pairs(model, b["plain"], Scoring())[0].chosen
        wide = tiny(family, tokenizer, **{**extra, "sliding_window": 512}).eval()
        assert not torch.allclose(out, score_pairs(wide, b["plain"], Scoring())[0].chosen)


def test_packing_shares_contexts_under_activation_checkpointing(tokenizer):
    """The padded path cannot share a context under checkpointing (it drops the KV cache);
    the pack shares it in the layout, and the replayed layers see the same blocks."""
    model = tiny("llama", tokenizer)
    enable_checkpointing(model)
    plain = batch(tokenizer)["plain"]
    packed = assert_same(model, plain, Scoring())
    assert int(packed.tokens.computed) < int(plain["attention_mask"].sum())


def test_pack_layout(tokenizer):
    """Every real token once (a shared context once per pair), positions restarting per row
    as the padded forward numbers them, blocks tiling the pack, and index mapping back."""
    view = batch(tokenizer)["plain"]
    real = view["attention_mask"].bool()
    positions = view["attention_mask"].cumsum(-1) - 1
    for context in (None, shared_contexts(view)):
        pack = pack_view(view, context)
        assert torch.equal(
            unpack(pack.input_ids[..., None], pack)[..., 0][real], view["input_ids"][real]
        )
        assert torch.equal(
            unpack(pack.position_ids[..., None], pack)[..., 0][real], positions[real]
        )
        shared = 0 if context is None else int(context[4:].sum())
        assert pack.tokens == int(real.sum()) - shared
        ends = [b[1] for b in pack.blocks.blocks]
        starts = [b[0] for b in pack.blocks.blocks]
        assert starts[0] == 0 and ends[-1] == pack.tokens and starts[1:] == ends[:-1]
    # left padding: the same rows, padding moved to the front; they pack on their own
    shift = (view["attention_mask"] == 0).sum(-1)
    left = {
        k: torch.stack([r.roll(int(n)) for r, n in zip(v, shift, strict=True)])
        for k, v in view.items()
    }
    assert shared_contexts(left) is None
    pack = pack_view(left)
    assert torch.equal(pack.input_ids[0], view["input_ids"][real])


def test_a_model_that_cannot_pack_is_scored_padded_with_one_warning(tokenizer, caplog):
    """Gemma2's attention soft-caps its logits, which block attention does not: its batches
    are scored padded, the same numbers, and the reason is logged once."""
    model = tiny(
        "gemma2",
        tokenizer,
        "eager",
        num_key_value_heads=2,
        head_dim=16,
        attn_logit_softcapping=50.0,
        sliding_window=64,
    )
    view = batch(tokenizer)["plain"]
    how = Scoring(packing=True)
    with caplog.at_level(logging.WARNING, logger="inspo.models.scoring"):
        assert not prepare_packing(model)
        first = score_pairs(model, view, how)[0]
        second = score_pairs(model, view, how)[0]
    warnings = [r for r in caplog.records if "cannot run packed rows" in r.getMessage()]
    assert len(warnings) == 1 and "soft-capping" in warnings[0].getMessage()
    padded = score_pairs(model, view, Scoring())[0]
    torch.testing.assert_close(first.chosen, padded.chosen)
    torch.testing.assert_close(second.rejected, padded.rejected)
    assert int(first.tokens.computed) > int(first.tokens.real)  # padding was computed
    assert model.config._attn_implementation == "eager"  # left as it was


def test_attention_that_does_not_take_the_layout_falls_back(tokenizer, caplog, monkeypatch):
    """Found during the forward: an attention argument block attention does not handle, or a
    layer that never used the layout. The batch is scored padded instead, warned once."""
    view = batch(tokenizer)["plain"]
    model = tiny("llama", tokenizer)
    want = score_pairs(model, view, Scoring())[0].chosen
    monkeypatch.setattr(packed_attention, "HARMLESS_KWARGS", frozenset({"position_ids"}))
    assert prepare_packing(model)  # the layout is refused later, during the forward
    with caplog.at_level(logging.WARNING, logger="inspo.models.scoring"):
        got = score_pairs(model, view, Scoring(packing=True))[0]
    torch.testing.assert_close(got.chosen, want)
    assert int(got.tokens.computed) > int(got.tokens.real)
    assert "takes use_cache" in caplog.text
    monkeypatch.undo()

    class Bypass(torch.nn.Module):  # an attention that ignores the interface entirely
        def forward(self, hidden_states, **kwargs):
            return torch.zeros_like(hidden_states), None

    model = tiny("llama", tokenizer)
    model.model.layers[1].self_attn = Bypass()
    want = score_pairs(model, view, Scoring())[0].chosen
    assert prepare_packing(model)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="inspo.models.scoring"):
        got = score_pairs(model, view, Scoring(packing=True))[0]
        score_pairs(model, view, Scoring(packing=True))
    torch.testing.assert_close(got.chosen, want)
    assert caplog.text.count("1 of 2 attention layers took the packed layout") == 1


def test_ordinary_calls_are_unchanged_after_the_switch(tokenizer):
    """The wrapper is the wrapped implementation for every call that does not pack: masks,
    padding sides, KV-cache decoding; and it is not written into saved configs."""
    for attn in ("sdpa", "eager"):
        model = tiny("qwen2", tokenizer, attn).eval()
        ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # left padding
        with torch.no_grad():
            before = model(input_ids=ids, attention_mask=mask).logits
            assert model.config._attn_implementation == attn  # scoring alone switches nothing
            score_sequences(model, batch(tokenizer)["plain"], Scoring(packing=True))
            assert model.config._attn_implementation == attn
            assert prepare_packing(model)  # the switch, explicit
            assert model.config._attn_implementation == packed_attention.WRAPPERS[attn]
            after = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)
        assert "_attn_implementation" not in model.config.to_json_string()
