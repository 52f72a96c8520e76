"""Sequence scores from logits: Σ_t log π(y_t | c, y_<t) over the masked (response) tokens.

The log-softmax is never materialised over the vocabulary for every token: the selected logit
minus the logsumexp is computed chunk by chunk over the sequence, so the extra memory beyond the
logits themselves is O(chunk × vocab), not O(length × vocab).
"""

from __future__ import annotations

import torch
from torch import Tensor


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
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:].to(torch.bool)
    # Masked targets may be pad ids; they are gathered and then zeroed, never out of range.
    lp = token_logps(logits[:, :-1], targets, chunk=chunk)
    lp = torch.where(mask, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))
    return lp.sum(-1), mask.sum(-1)
