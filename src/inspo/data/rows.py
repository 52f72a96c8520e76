"""Row layouts → text rows ``{prompt, chosen, rejected}`` that the Encoder tokenises.

Three layouts are recognised per row (see ``docs/data.md``):

* explicit: ``prompt``, ``chosen``, ``rejected`` are strings; used as they are.
* implicit prompt (HH-RLHF): no prompt; ``chosen``/``rejected`` are whole dialogues
  ``\\n\\nHuman: …\\n\\nAssistant: …`` sharing the prompt as a prefix. The prompt is everything up
  to and including the final ``\\n\\nAssistant:``; rows whose dialogues differ before that point
  are reported as ``implicit_prompt_mismatch``.
* conversational (UltraFeedback-binarized): ``chosen``/``rejected`` are message lists
  ``[{"role", "content"}]`` ending with the assistant turn; ``prompt`` is a string, a message
  list, or absent (then the messages before the last turn). Rendered with the tokenizer's own
  chat template; the BOS the template writes is removed from the prompt text and the EOS it
  writes after the assistant turn is removed from the response text, because the Encoder adds
  both as token ids (so no id is ever duplicated).

A row that cannot be used yields its reason (a string) instead of a text row.
"""

from __future__ import annotations

import json
import math
from typing import Any

from transformers import PreTrainedTokenizerBase

from inspo.data.report import DataError
from inspo.names import ERROR, MARGIN_COLUMN

ASSISTANT = "\n\nAssistant:"
COLUMNS = ("prompt", "chosen", "rejected")


def check_row(row: dict) -> str | None:
    """The reason a text row cannot be used, or None. Cheap checks that need no tokenizer."""
    if MARGIN_COLUMN in row and not _is_finite_number(row[MARGIN_COLUMN]):
        return "invalid_margin"
    values = [row.get(c) for c in COLUMNS]
    if any(v is None for v in values):
        return "missing_value"
    if not all(isinstance(v, str) for v in values):
        return "wrong_type"
    prompt, chosen, rejected = values
    if not prompt.strip():
        return "empty_prompt"
    if not chosen.strip() or not rejected.strip():
        return "empty_response"
    if chosen == rejected:
        return "identical_responses"
    return None


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )


def split_implicit(chosen: str, rejected: str) -> tuple[str, str, str] | str:
    """(prompt, chosen response, rejected response) of two dialogues, or a reason."""
    ic, ir = chosen.rfind(ASSISTANT), rejected.rfind(ASSISTANT)
    if ic < 0 or ir < 0:
        return "no_assistant_turn"
    prompt_c, prompt_r = chosen[: ic + len(ASSISTANT)], rejected[: ir + len(ASSISTANT)]
    if prompt_c != prompt_r:
        return "implicit_prompt_mismatch"
    return prompt_c, chosen[len(prompt_c) :], rejected[len(prompt_r) :]


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], response: dict | None = None
) -> str:
    """The chat-template text of ``messages`` (+ the generation prompt), or of the response turn
    alone when ``response`` is given; BOS/EOS strings the Encoder adds as ids are removed."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if response is None:
        bos = tokenizer.bos_token
        if bos and tokenizer.bos_token_id is not None and prompt.startswith(bos):
            prompt = prompt[len(bos) :]
        return prompt
    full = tokenizer.apply_chat_template([*messages, response], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("chat_template_mismatch")
    text = full[len(prompt) :]
    eos, stripped = tokenizer.eos_token, text.rstrip()
    if eos and tokenizer.eos_token_id is not None and stripped.endswith(eos):
        text = stripped[: -len(eos)]
    return text


def _messages(value: Any) -> list[dict] | None:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return value if is_messages(value) else None


def to_text(
    row: dict, tokenizer: PreTrainedTokenizerBase | None, keep_chat: bool = False
) -> dict | str:
    """A text row ``{row_id, prompt, chosen, rejected}`` (plus ``chat``, the prompt messages as
    JSON, when ``keep_chat``), or the reason the row cannot be used."""
    if not isinstance(row, dict):
        return "not_a_mapping"
    if ERROR in row:
        return row[ERROR]
    prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
    if chosen is None or rejected is None:
        return "missing_value"
    out: dict[str, Any] = {"row_id": row.get("row_id")}
    if MARGIN_COLUMN in row:
        out[MARGIN_COLUMN] = row[MARGIN_COLUMN]
    if isinstance(chosen, list) or isinstance(rejected, list):
        if not (is_messages(chosen) and is_messages(rejected)):
            return "wrong_type"
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            return "no_assistant_turn"
        if chosen[:-1] != rejected[:-1]:
            return "implicit_prompt_mismatch"
        msgs = chosen[:-1] if prompt is None else _messages(prompt)
        if msgs is None:
            return "wrong_type" if prompt is not None else "missing_value"
        if not msgs:
            return "empty_prompt"
        if chosen[:-1] and chosen[:-1] != msgs:
            return "prompt_mismatch"
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "conversational rows (message lists) need a tokenizer with a chat_template; "
                f"{getattr(tokenizer, 'name_or_path', tokenizer)!r} has none"
            )
        if not chosen[-1]["content"].strip() or not rejected[-1]["content"].strip():
            return "empty_response"
        try:
            out["prompt"] = render_chat(tokenizer, msgs)
            out["chosen"] = render_chat(tokenizer, msgs, chosen[-1])
            out["rejected"] = render_chat(tokenizer, msgs, rejected[-1])
        except ValueError as e:
            return str(e) if str(e) == "chat_template_mismatch" else "wrong_type"
    elif prompt is None:
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            return "wrong_type"
        parts = split_implicit(chosen, rejected)
        if isinstance(parts, str):
            return parts
        out["prompt"], out["chosen"], out["rejected"] = parts
        msgs = [{"role": "user", "content": out["prompt"]}]
    else:
        out.update(prompt=prompt, chosen=chosen, rejected=rejected)
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else None
    if keep_chat:
        out["chat"] = json.dumps(msgs) if msgs is not None else ""
    return out
