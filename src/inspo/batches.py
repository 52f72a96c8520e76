"""Pair batches and reflection batches (SPEC §4), and the reflective templates R(x, y') (§3).

A row (prompt x, chosen y_w, rejected y_l) is tokenised once into token sequences, each with the
index where its scored response starts:

    plain view       x + y_w            x + y_l                 (standard DPO-family context)
    reflective view  R(x, y_l) + y_w    R(x, y_w) + y_l         (InSPO context)

The collator pads every view to its longest sequence and stacks chosen rows first, then rejected
rows, so the policy scores a whole view in one forward pass. Each view carries a ``loss_mask``
that is 1 exactly on the scored response tokens (EOS included).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

VIEWS = ("plain", "reflective")

# Named layouts for R(x, y'). Each is a format string over {prompt} and {other}; the scored
# response follows the formatted text directly.
TEMPLATES: dict[str, str] = {
    # Readable: the alternative is marked as another answer, and the prompt (whose ending cues
    # the response) sits right before the scored response, as in the plain view.
    "default": "[another answer to the prompt below: {other}]\n{prompt}",
    # The InSPO authors' plain concatenation x + y' + y.
    "raw": "{prompt}{other}",
}


@dataclass(frozen=True)
class Template:
    """A reflective template split into literal text and the {prompt}/{other} slots."""

    text: str

    def __post_init__(self) -> None:
        fields = [f for _, f, _, _ in string.Formatter().parse(self.text) if f is not None]
        if sorted(fields) != ["other", "prompt"]:
            raise ValueError(
                "a reflective template must contain {prompt} and {other} exactly once each; "
                f"got fields {fields} in {self.text!r}"
            )

    def segments(self) -> list[tuple[str, str]]:
        """[(kind, text)] with kind in {"text", "prompt", "other"}, in order."""
        out: list[tuple[str, str]] = []
        for literal, field, _, _ in string.Formatter().parse(self.text):
            if literal:
                out.append(("text", literal))
            if field is not None:
                out.append((field, ""))
        return out


def resolve_template(name_or_text: str) -> Template:
    """A template by name (``default``, ``raw``) or a literal format string."""
    if name_or_text in TEMPLATES:
        return Template(TEMPLATES[name_or_text])
    if "{" not in name_or_text:
        raise ValueError(
            f"unknown reflection template {name_or_text!r}; valid names: {', '.join(TEMPLATES)}"
            " (or a format string with {prompt} and {other})"
        )
    return Template(name_or_text)


# --------------------------------------------------------------------------- tokenisation
@dataclass
class Encoder:
    """Turns text rows into the token sequences of each view, with truncation.

    ``max_length`` bounds every sequence; ``max_prompt_length`` bounds the prompt. In the plain
    view the prompt is cut from the left, then the response from the right. In the reflective
    view (SPEC §3) the alternative response is shortened first (its end is cut), then the
    prompt from the left, and the scored response only when nothing else is left.
    """

    tokenizer: PreTrainedTokenizerBase
    template: Template
    max_length: int = 512
    max_prompt_length: int = 256

    def __post_init__(self) -> None:
        tok = self.tokenizer
        self.bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        self.eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        self._segments = [
            (kind, self.ids(text) if kind == "text" else [])
            for kind, text in self.template.segments()
        ]
        self.template_overhead = sum(len(ids) for _, ids in self._segments)

    def ids(self, text: str | list[str]) -> list:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, prompt: str, chosen: str, rejected: str, views: Sequence[str]) -> dict:
        """Token sequences of the requested views, their response starts and truncation flags."""
        return self.encode_ids(self.ids(prompt), self.ids(chosen), self.ids(rejected), views)

    def encode_batch(self, rows: dict[str, list[str]], views: Sequence[str]) -> dict[str, list]:
        """``encode`` over a column batch, with one tokenizer call per column."""
        ids = {c: self.ids(rows[c]) for c in ("prompt", "chosen", "rejected")}
        out: dict[str, list] = {}
        for x, y_w, y_l in zip(ids["prompt"], ids["chosen"], ids["rejected"], strict=True):
            for key, value in self.encode_ids(x, y_w, y_l, views).items():
                out.setdefault(key, []).append(value)
        return out

    def encode_ids(
        self, x: list[int], y_w: list[int], y_l: list[int], views: Sequence[str]
    ) -> dict[str, Any]:
        """Like :meth:`encode`, from token ids (responses without EOS)."""
        out: dict[str, Any] = {"truncated": len(x) > self.max_prompt_length}
        x = x[-self.max_prompt_length :] if len(x) > self.max_prompt_length else x
        y_w, y_l = y_w + self.eos, y_l + self.eos
        for view in views:
            for side, y, other in (("chosen", y_w, y_l), ("rejected", y_l, y_w)):
                if view == "plain":
                    ctx, resp, cut = self._plain(x, y)
                else:
                    ctx, resp, cut = self._reflective(x, other[: len(other) - len(self.eos)], y)
                out[f"{view}_{side}"] = ctx + resp
                out[f"{view}_{side}_start"] = len(ctx)
                out["truncated"] = out["truncated"] or cut
        return out

    def _plain(self, x: list[int], y: list[int]) -> tuple[list[int], list[int], bool]:
        room = self.max_length - len(self.bos)
        if len(x) + len(y) <= room:
            return self.bos + x, y, False
        x = x[-max(room - len(y), 0) :] if room > len(y) else []
        y = y[: room - len(x)]
        return self.bos + x, y, True

    def _reflective(
        self, x: list[int], other: list[int], y: list[int]
    ) -> tuple[list[int], list[int], bool]:
        room = self.max_length - len(self.bos) - self.template_overhead
        excess = len(x) + len(other) + len(y) - room
        cut = excess > 0
        if excess > 0:  # 1. shorten the alternative response (keep its beginning)
            drop = min(excess, len(other))
            other, excess = other[: len(other) - drop], excess - drop
        if excess > 0:  # 2. then the prompt, from the left
            drop = min(excess, len(x))
            x, excess = x[drop:], excess - drop
        if excess > 0:  # 3. the scored response only when nothing else is left
            y = y[: max(len(y) - excess, 0)]
        ctx = list(self.bos)
        for kind, ids in self._segments:
            ctx += {"text": ids, "prompt": x, "other": other}[kind]
        return ctx, y, cut


# --------------------------------------------------------------------------- collation
def pad_view(rows: Sequence[dict], view: str, pad_id: int) -> dict[str, Tensor]:
    """Stack a view's chosen rows then rejected rows, right-padded to the longest sequence."""
    seqs = [r[f"{view}_chosen"] for r in rows] + [r[f"{view}_rejected"] for r in rows]
    starts = [r[f"{view}_chosen_start"] for r in rows] + [r[f"{view}_rejected_start"] for r in rows]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        input_ids[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
        loss_mask[i, start : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


@dataclass
class PreferenceCollator:
    """Builds a batch ``{view: {input_ids, attention_mask, loss_mask}, "index": [B]}``.

    Rows hold the pre-tokenised views from :class:`Encoder`; padding is dynamic. ``index`` is
    each row's position in its split, used to look up precomputed reference scores.
    """

    pad_id: int
    views: tuple[str, ...] = ("plain",)

    def __call__(self, rows: Sequence[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = {v: pad_view(rows, v, self.pad_id) for v in self.views}
        batch["index"] = torch.as_tensor([r["index"] for r in rows], dtype=torch.long)
        return batch
