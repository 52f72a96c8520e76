"""Batches: rows of token sequences → padded tensors, one per view.

The collator pads every view to its longest sequence and stacks chosen rows first, then rejected
rows, so the policy scores a whole view in one forward pass. Each view carries a ``loss_mask``
that is 1 exactly on the scored response tokens (EOS included).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from inspo.names import MARGIN_COLUMN, PLAIN


def pad_rows(
    rows: Sequence[Sequence[int]], pad_id: int, side: Literal["left", "right"] = "right"
) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), both [len(rows), longest], padded on ``side``."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        input_ids[i, cols] = torch.as_tensor(r, dtype=torch.long)
        attention_mask[i, cols] = 1
    return input_ids, attention_mask


def pad_view(rows: Sequence[dict], view: str, pad_id: int) -> dict[str, Tensor]:
    """Stack a view's chosen rows then rejected rows, right-padded to the longest sequence."""
    sides = ("chosen", "rejected")
    seqs = [r[f"{view}_{side}"] for side in sides for r in rows]
    starts = [r[f"{view}_{side}_start"] for side in sides for r in rows]
    input_ids, attention_mask = pad_rows(seqs, pad_id)
    columns = torch.arange(input_ids.shape[1])
    lengths = attention_mask.sum(-1, keepdim=True)
    loss_mask = (columns >= torch.tensor(starts)[:, None]) & (columns < lengths)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask.long()}


@dataclass
class PreferenceCollator:
    """Builds a batch ``{view: {input_ids, attention_mask, loss_mask}, "index": [B]}``, plus
    ``"margin"`` [B] when the rows carry one (the data's margin column).

    Rows hold the pre-tokenised views from :class:`Encoder`; padding is dynamic. ``index`` is
    each row's position in its split, used to look up precomputed reference scores.
    """

    pad_id: int
    views: tuple[str, ...] = (PLAIN,)

    def __call__(self, rows: Sequence[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = {v: pad_view(rows, v, self.pad_id) for v in self.views}
        batch["index"] = torch.as_tensor([r["index"] for r in rows], dtype=torch.long)
        if rows and rows[0].get(MARGIN_COLUMN) is not None:
            margins = [r[MARGIN_COLUMN] for r in rows]
            batch[MARGIN_COLUMN] = torch.as_tensor(margins, dtype=torch.float)
        return batch


@dataclass
class WithReferenceScores:
    """Wraps a collator: adds ``batch["reference_scores"][view][field]`` looked up by ``index``
    (the reference's scores, precomputed once before training)."""

    collate: Callable[[Sequence[dict]], dict[str, Any]]
    scores: dict[str, dict[str, Tensor]]

    def __call__(self, rows: Sequence[dict]) -> dict[str, Any]:
        batch = self.collate(rows)
        idx = batch["index"]
        batch["reference_scores"] = {
            v: {f: t[idx] for f, t in fields.items()} for v, fields in self.scores.items()
        }
        return batch
