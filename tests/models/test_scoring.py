import pytest
import torch
import torch.nn.functional as F

from inspo.models.scoring import sequence_logps, token_logps


def direct(logits, input_ids, loss_mask):
    """Per-token reference computation: full log_softmax, then an explicit loop."""
    lp = F.log_softmax(logits.double(), dim=-1)
    sums, counts = [], []
    for i in range(input_ids.shape[0]):
        s, c = 0.0, 0
        for t in range(1, input_ids.shape[1]):
            if loss_mask[i, t]:
                s += lp[i, t - 1, input_ids[i, t]].item()
                c += 1
        sums.append(s)
        counts.append(c)
    return torch.tensor(sums), torch.tensor(counts)


def test_token_logps_match_log_softmax_for_any_chunk():
    torch.manual_seed(0)
    logits = torch.randn(3, 17, 11)
    targets = torch.randint(0, 11, (3, 17))
    expected = F.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    for chunk in (1, 4, 17, 100):
        torch.testing.assert_close(token_logps(logits, targets, chunk=chunk), expected)


def test_sequence_logps_right_and_left_padding():
    torch.manual_seed(1)
    V = 13
    # Row 0: right padded, row 1: left padded, row 2: no padding. Masks cover a "response".
    input_ids = torch.randint(0, V, (3, 9))
    loss_mask = torch.tensor(
        [
            [0, 0, 0, 1, 1, 1, 0, 0, 0],  # prompt 3, response 3, pad 3
            [0, 0, 0, 0, 0, 1, 1, 1, 1],  # pad 2, prompt 3, response 4
            [0, 0, 1, 1, 1, 1, 1, 1, 1],
        ]
    )
    logits = torch.randn(3, 9, V)
    sums, counts = sequence_logps(logits, input_ids, loss_mask, chunk=4)
    ref_sums, ref_counts = direct(logits, input_ids, loss_mask)
    torch.testing.assert_close(sums.double(), ref_sums.double(), rtol=1e-5, atol=1e-5)
    assert counts.tolist() == ref_counts.tolist() == [3, 4, 7]


def test_sequence_logps_ignore_padding_values():
    """Whatever sits under mask 0 (pad ids, garbage logits) must not change the score."""
    torch.manual_seed(2)
    ids = torch.randint(0, 7, (1, 6))
    mask = torch.tensor([[0, 0, 1, 1, 0, 0]])
    logits = torch.randn(1, 6, 7)
    a, _ = sequence_logps(logits, ids, mask)
    ids2, logits2 = ids.clone(), logits.clone()
    ids2[0, 4:] = 6
    logits2[0, 3:] = 100.0  # position 3 predicts token 4 (masked), so it must not count
    b, _ = sequence_logps(logits2, ids2, mask)
    torch.testing.assert_close(a, b)


def test_bf16_logits_are_scored_in_fp32():
    torch.manual_seed(3)
    logits = torch.randn(2, 5, 300)
    ids = torch.randint(0, 300, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    s16, _ = sequence_logps(logits.bfloat16(), ids, mask)
    assert s16.dtype == torch.float32
    s32, _ = sequence_logps(logits.bfloat16().float(), ids, mask)
    torch.testing.assert_close(s16, s32)


def test_lm_head_on_scored_rows_matches_full_logits_values_and_gradients(monkeypatch):
    """hidden_sequence_logps (LM head tile by tile on scored positions, recomputed in backward)
    equals full logits + sequence_logps, in value and in the gradients of hidden and weight."""
    import inspo.models.scoring as lp_mod
    from inspo.models.scoring import hidden_sequence_logps

    monkeypatch.setattr(lp_mod, "TILE_ELEMENTS", 40)  # several tiles of 3 rows
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 13, (3, 8), generator=g)
    mask = torch.zeros(3, 8, dtype=torch.long)
    mask[0, 3:], mask[1, 5:7], mask[2, 1:] = 1, 1, 1
    sums, counts = hidden_sequence_logps(h, w, ids, mask)
    ref_sums, ref_counts = sequence_logps(h @ w.T, ids, mask)
    torch.testing.assert_close(sums, ref_sums)
    assert counts.tolist() == ref_counts.tolist()
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    got = torch.autograd.grad((sums * weights).sum(), (h, w))
    want = torch.autograd.grad((ref_sums * weights).sum(), (h, w))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_scores_the_same_with_and_without_the_scored_lm_head(tokenizer):
    from inspo.data.collate import PreferenceCollator
    from inspo.data.encode import Encoder
    from inspo.data.templates import resolve_template
    from inspo.models.load import tiny_llama
    from inspo.models.scoring import Scoring, score_pairs

    enc = Encoder(tokenizer, resolve_template("default"), max_length=64, max_prompt_length=32)
    rows = [{**enc.encode("Q: abc? ", "yes", "no no", ["plain"]), "index": 0}]
    view = PreferenceCollator(tokenizer.pad_token_id, ("plain",))(rows)["plain"]
    model = tiny_llama(hidden_size=32, num_layers=2, num_heads=2, tokenizer=tokenizer)
    fast, logits = score_pairs(model, view, Scoring())
    assert logits is None  # the LM head ran on the scored positions only
    full, logits = score_pairs(model, view, Scoring(scored_lm_head=False))
    assert logits is not None
    torch.testing.assert_close(fast.chosen, full.chosen)
    torch.testing.assert_close(fast.rejected, full.rejected)


# ------------------------------------------------------------------ shared prompts
def pair_view(tokenizer, pairs, views=("plain",), view="plain"):
    from inspo.data.collate import PreferenceCollator
    from inspo.data.encode import Encoder
    from inspo.data.templates import resolve_template

    enc = Encoder(tokenizer, resolve_template("default"), max_length=128, max_prompt_length=64)
    rows = [{**enc.encode(p, c, r, list(views)), "index": i} for i, (p, c, r) in enumerate(pairs)]
    return PreferenceCollator(tokenizer.pad_token_id, tuple(views))(rows)[view]


PAIRS = [("Q: abc? ", "yes", "no no no"), ("Question: why is it so? ", "because", "x"),
         ("Hi ", "a longer chosen answer", "short")]  # fmt: skip


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_scores_match_full_rows_values_and_gradients(tokenizer, attn):
    """Context once per pair + KV cache tiled to both responses == each full row scored."""
    from inspo.models.load import tiny_llama
    from inspo.models.scoring import (
        hidden_sequence_logps,
        shared_prompt_logps,
        split_lm_head,
        split_shared_prompt,
    )

    view = pair_view(tokenizer, PAIRS)
    model = tiny_llama(hidden_size=32, num_layers=2, num_heads=2, tokenizer=tokenizer, seed=3)
    model.set_attn_implementation(attn)
    decoder, weight = split_lm_head(model)
    split = split_shared_prompt(view)
    assert split is not None
    lengths = view["attention_mask"].sum(-1)
    # contexts counted once per pair: B·|context| fewer tokens than the full rows
    assert int(split["context_mask"].sum() + split["response_mask"].sum()) == int(
        lengths.sum() - split["start"][:3].sum()
    )
    weights = torch.arange(1.0, 7.0)  # every row's score reaches the loss with its own weight

    def grads(sums):
        return torch.autograd.grad((sums * weights).sum(), list(model.parameters()))

    mask = view["attention_mask"]
    hidden = decoder(input_ids=view["input_ids"], attention_mask=mask,
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state  # fmt: skip
    want, want_n = hidden_sequence_logps(hidden, weight, view["input_ids"], view["loss_mask"])
    got, got_n = shared_prompt_logps(decoder, weight, split)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_n, want_n)
    for g, w in zip(grads(got), grads(want), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_split_shared_prompt_declines_views_without_a_shared_context(tokenizer):
    from inspo.models.scoring import split_shared_prompt

    # InSPO's reflective view: chosen is scored after the rejected response and vice versa.
    reflective = pair_view(tokenizer, PAIRS, views=("plain", "reflective"), view="reflective")
    assert split_shared_prompt(reflective) is None
    plain = pair_view(tokenizer, PAIRS)
    other = {k: v.clone() for k, v in plain.items()}
    other["input_ids"][3, 2] += 1  # the rejected row of pair 0 now has another context token
    assert split_shared_prompt(other) is None
    empty = {k: v.clone() for k, v in plain.items()}
    empty["loss_mask"][4] = 0  # a row that scores nothing
    assert split_shared_prompt(empty) is None
    left = {k: v.flip(-1) for k, v in plain.items()}  # left-padded rows
    assert split_shared_prompt(left) is None
    assert split_shared_prompt(plain) is not None


# Long shared prompts, short answers: the context once plus the responses is fewer positions
# than the full rows, so sharing pays (on PAIRS it does not: see below).
LONG_PROMPTS = [(p * 3, c, r) for p, c, r in PAIRS[:2]]


def test_shares_prompts_only_where_it_changes_nothing(tokenizer, monkeypatch):
    """The same scores with and without sharing; sharing is used on the plain view where it
    computes fewer positions than the full rows, and skipped under activation checkpointing
    (which drops the KV cache)."""
    import inspo.models.scoring as scoring
    from inspo.models.load import enable_checkpointing, tiny_llama

    view = pair_view(tokenizer, LONG_PROMPTS)
    model = tiny_llama(hidden_size=32, num_layers=2, num_heads=2, tokenizer=tokenizer).train()
    calls = []
    real = scoring.shared_prompt_logps
    monkeypatch.setattr(scoring, "shared_prompt_logps", lambda *a: calls.append(1) or real(*a))
    shared, _ = scoring.score_pairs(model, view, scoring.Scoring())
    assert calls == [1]
    full, _ = scoring.score_pairs(model, view, scoring.Scoring(share_prompt=False))
    assert calls == [1]
    torch.testing.assert_close(shared.chosen, full.chosen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.rejected, full.rejected, atol=1e-5, rtol=1e-5)
    # PAIRS: a long answer after a short prompt; contexts once + responses padded to the
    # longest answer hold more positions than the rows themselves, so the rows run whole.
    few = pair_view(tokenizer, PAIRS)
    split = scoring.split_shared_prompt(few)
    assert split["context"].numel() + split["response"].numel() > few["input_ids"].numel()
    rows, _ = scoring.score_pairs(model, few, scoring.Scoring())
    assert calls == [1] and int(rows.tokens.computed) == few["input_ids"].numel()
    enable_checkpointing(model)
    checkpointed, _ = scoring.score_pairs(model, view, scoring.Scoring())
    assert calls == [1]
    torch.testing.assert_close(checkpointed.chosen, full.chosen, atol=1e-5, rtol=1e-5)


def test_shared_prompt_declines_sliding_window_caches_before_any_forward(tokenizer):
    """A decoder whose own cache would not be plain per-layer K/V (sliding window) is left to
    the full-row path, without a wasted context forward."""
    from transformers import MistralConfig, MistralForCausalLM

    from inspo.models.scoring import shared_prompt_logps, split_lm_head, split_shared_prompt

    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                           sliding_window=4)  # fmt: skip
    decoder, weight = split_lm_head(MistralForCausalLM(config))
    calls = []
    decoder.register_forward_hook(lambda *a: calls.append(1))
    split = split_shared_prompt(pair_view(tokenizer, PAIRS))
    assert split is not None
    assert shared_prompt_logps(decoder, weight, split) is None
    assert calls == []
