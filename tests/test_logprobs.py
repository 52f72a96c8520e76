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
