"""Text rows → the token sequences of each view, with truncation.

A row (prompt x, chosen y_w, rejected y_l) is tokenised once into token sequences, each with the
index where its scored response starts:

    plain view       x + y_w            x + y_l                 (the standard form)
    reflective view  R(x, y_l) + y_w    R(x, y_w) + y_l         (InSPO)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from inspo.data.templates import Template
from inspo.hashing import fingerprint
from inspo.names import View


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything about a tokenizer that changes token ids: its serialised vocabulary,
    merges and normalisation rules, its special tokens and its chat template (which the
    ``chat`` reflective template renders with). Keys token and reference-score caches."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return fingerprint(rules, tokenizer.special_tokens_map, tokenizer.chat_template)


@dataclass
class Encoder:
    """Turns text rows into the token sequences of each view, with truncation.

    ``max_length`` bounds every sequence; ``max_prompt_length`` bounds the prompt. In the plain
    view the prompt is cut from the left, then the response from the right. In the reflective
    view the alternative response is shortened first (its end is cut), then the
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
        eos: tuple[bool, bool] = (True, True),
    ) -> dict[str, Any]:
        """Like :meth:`encode`, from token ids (responses without EOS).

        ``chat`` (the prompt messages, or their JSON) is needed by a chat reflective template;
        without it the prompt text ``x`` is the one user turn. ``eos``: whether the chosen and
        the rejected response end with the EOS (a sampled response that ran out of tokens
        does not: it is scored as it was sampled).
        """
        out: dict[str, Any] = {"truncated": len(x) > self.max_prompt_length, "response_cut": False}
        if self.template.chat and "reflective" in views:
            msgs = json.loads(chat) if isinstance(chat, str) and chat else chat
            if not msgs:
                msgs = [{"role": "user", "content": self.tokenizer.decode(x)}]
        x = x[-self.max_prompt_length :] if len(x) > self.max_prompt_length else x
        ends = [self.eos if e else [] for e in eos]
        # (side, scored response with its EOS, the other response without one)
        sides = (("chosen", y_w + ends[0], y_l), ("rejected", y_l + ends[1], y_w))
        for view in views:
            for side, y, alt in sides:
                if view == View.plain:
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
