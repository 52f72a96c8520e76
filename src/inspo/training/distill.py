"""Self-distillation of the reflective behaviour into the plain context that inference uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def distill_kl(
    teacher_logits: Tensor, teacher_mask: Tensor, student_logits: Tensor, student_mask: Tensor
) -> Tensor:
    """Mean token KL(stop-grad teacher ‖ student) over the response tokens of each row.

    Teacher: the policy after R(x, y_l) (its logits detached); student: the policy after x
    alone. Masks are the rows' loss masks. Token t of a response is aligned by its rank within
    the response, so the two contexts' different lengths do not matter; each row keeps the
    first n tokens, n the shorter of its two counts.
    """
    t_mask, s_mask = teacher_mask[:, 1:].bool(), student_mask[:, 1:].bool()
    n = torch.minimum(t_mask.sum(1), s_mask.sum(1)).unsqueeze(1)
    t_mask = t_mask & (t_mask.cumsum(1) <= n)
    s_mask = s_mask & (s_mask.cumsum(1) <= n)
    t_logp = F.log_softmax(teacher_logits.detach()[:, :-1][t_mask].float(), dim=-1)
    s_logp = F.log_softmax(student_logits[:, :-1][s_mask].float(), dim=-1)
    return F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")
