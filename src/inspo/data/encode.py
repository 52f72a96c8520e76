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

import hashlib
import json
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
# For chat models (``chat`` or ``chat:<format string>``): this text becomes the content of the
# last user turn, and the tokenizer's chat template renders the conversation up to the
# assistant turn, which is the scored response.
CHAT_TEMPLATE = "{prompt}\n\n[Another answer to this request, shown for reference only:]\n{other}"


@dataclass(frozen=True)
class Template:
    """A reflective template split into literal text and the {prompt}/{other} slots."""

    text: str
    chat: bool = False  # rendered through the tokenizer's chat template (see CHAT_TEMPLATE)

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
    """A template by name (``default``, ``raw``, ``chat``), ``chat:<format string>``, or a
    literal format string."""
    if name_or_text == "chat":
        return Template(CHAT_TEMPLATE, chat=True)
    if name_or_text.startswith("chat:"):
        return Template(name_or_text[len("chat:") :], chat=True)
    if name_or_text in TEMPLATES:
        return Template(TEMPLATES[name_or_text])
    if "{" not in name_or_text:
        raise ValueError(
            f"unknown reflection template {name_or_text!r}; valid names: "
            f"{', '.join([*TEMPLATES, 'chat'])}"
            " (or a format string with {prompt} and {other})"
        )
    return Template(name_or_text)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything about a tokenizer that changes token ids: its serialised vocabulary,
    merges and normalisation rules, its special tokens and its chat template (which the
    ``chat`` reflective template renders with). Keys token and reference-score caches."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    parts = [rules, tokenizer.special_tokens_map, tokenizer.chat_template]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


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
        chats = rows.get("chat") or [None] * len(ids["prompt"])
        out: dict[str, list] = {}
        for x, y_w, y_l, chat in zip(
            ids["prompt"], ids["chosen"], ids["rejected"], chats, strict=True
        ):
            for key, value in self.encode_ids(x, y_w, y_l, views, chat).items():
                out.setdefault(key, []).append(value)
        return out

    def encode_ids(
        self,
        x: list[int],
        y_w: list[int],
        y_l: list[int],
        views: Sequence[str],
        chat: str | list[dict] | None = None,
    ) -> dict[str, Any]:
        """Like :meth:`encode`, from token ids (responses without EOS).

        ``chat`` (the prompt messages, or their JSON) is needed by a chat reflective template;
        without it the prompt text ``x`` is the one user turn.
        """
        out: dict[str, Any] = {"truncated": len(x) > self.max_prompt_length, "response_cut": False}
        if self.template.chat and "reflective" in views:
            msgs = json.loads(chat) if isinstance(chat, str) and chat else chat
            if not msgs:
                msgs = [{"role": "user", "content": self.tokenizer.decode(x)}]
        x = x[-self.max_prompt_length :] if len(x) > self.max_prompt_length else x
        y_w, y_l = y_w + self.eos, y_l + self.eos
        for view in views:
            for side, y, other in (("chosen", y_w, y_l), ("rejected", y_l, y_w)):
                alt = other[: len(other) - len(self.eos)]
                if view == "plain":
                    ctx, resp, cut = self._plain(x, y)
                elif self.template.chat:
                    ctx, resp, cut = self._reflective_chat(msgs, alt, y)
                else:
                    ctx, resp, cut = self._reflective(x, alt, y)
                out[f"{view}_{side}"] = ctx + resp
                out[f"{view}_{side}_start"] = len(ctx)
                out["truncated"] = out["truncated"] or cut
                out["response_cut"] = out["response_cut"] or len(resp) < len(y)
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

    def _reflective_chat(
        self, msgs: list[dict], other: list[int], y: list[int]
    ) -> tuple[list[int], list[int], bool]:
        """R(x, y') through the chat template: the alternative joins the last user turn.

        Truncation works on token lists of the text slots, in the usual order (alternative
        first, then the user turn's own text from the left, the scored response last); the
        context is then decoded and re-rendered with ``apply_chat_template`` per row, and the
        cut repeated while the rendered sequence is still too long (retokenisation can differ
        by a few tokens from the sum of the parts).
        """
        from inspo.data.rows import render_chat

        history, user = msgs[:-1], self.ids(msgs[-1]["content"])
        dec = self.tokenizer.decode

        def render(u: list[int], o: list[int]) -> list[int]:
            content = self.template.text.format(prompt=dec(u), other=dec(o))
            text = render_chat(self.tokenizer, [*history, {"role": "user", "content": content}])
            return self.bos + self.ids(text)

        ctx = render(user, other)
        excess = len(ctx) + len(y) - self.max_length
        cut = excess > 0
        while excess > 0 and (other or user):
            drop = min(excess, len(other))
            other = other[: len(other) - drop]
            if excess - drop > 0:
                user = user[min(excess - drop, len(user)) :]
            ctx = render(user, other)
            excess = len(ctx) + len(y) - self.max_length
        if excess > 0:  # nothing else is left
            y = y[: max(len(y) - excess, 0)]
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
