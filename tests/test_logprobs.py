import torch
import torch.nn.functional as F

from inspo.logprobs import sequence_logps, token_logps


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
    import inspo.logprobs as lp_mod
    from inspo.logprobs import hidden_sequence_logps

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


def test_module_scores_the_same_with_and_without_the_scored_lm_head(tokenizer):
    from inspo.batches import Encoder, PreferenceCollator, resolve_template
    from inspo.models import tiny_llama
    from inspo.module import PreferenceModule
    from inspo.objectives import DPO

    enc = Encoder(tokenizer, resolve_template("default"), max_length=64, max_prompt_length=32)
    rows = [{**enc.encode("Q: abc? ", "yes", "no no", ["plain"]), "index": 0}]
    view = PreferenceCollator(tokenizer.pad_token_id, ("plain",))(rows)["plain"]
    model = tiny_llama(hidden_size=32, num_layers=2, num_heads=2, tokenizer=tokenizer)
    module = PreferenceModule(model, DPO())
    fast, logits = module.score_view(model, view)
    assert logits is None  # the LM head ran on the scored positions only
    module.scored_lm_head = False
    full, logits = module.score_view(model, view)
    assert logits is not None
    torch.testing.assert_close(fast.chosen, full.chosen)
    torch.testing.assert_close(fast.rejected, full.rejected)
