"""The prompt pool of an iterative or online run, checked like pair data, and the seeded
stream of prompts that the rounds consume.

Rows come from the run's prompt source (:func:`pool_rows`): prompt-only rows ``{"prompt": ...}``
(a string or a message list), or pair rows of any layout :mod:`inspo.data.rows` reads, whose
prompt is used, as a list or as the training split of a data source's ``{split: rows}``. Each
prompt keeps its messages (a string prompt is one user turn), so a chat reflective template
renders them as offline training does. A row that cannot be used is
counted under its reason in the run's data report (``malformed_json``, ``missing_value``,
``wrong_type``, ``empty_prompt``, and ``over_long`` under ``data.over_long=drop``; a prompt
over ``data.max_prompt_length`` tokens is otherwise cut from the left and counted as
``truncated``). Duplicate prompts are kept once (``duplicate_prompt``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from inspo.data.report import DataReport
from inspo.data.rows import is_messages, render_chat, to_text
from inspo.names import ERROR, OverLong

SPLIT = "prompts"  # the data report's name for the pool


@dataclass(frozen=True)
class Prompt:
    """A pool prompt: its text (what judges and pair files see), its token ids (``[bos] +
    prompt``, cut from the left to the prompt budget: what the policy is sampled on) and its
    messages as JSON (what a chat reflective template renders; see
    :meth:`inspo.data.encode.Encoder.encode_ids`)."""

    text: str
    ids: tuple[int, ...]
    chat: str = ""


def pool_rows(rows: Sequence[Any] | Mapping[str, Sequence[Any]], split: str) -> Sequence[Any]:
    """The rows a prompt source gave: a list as it is, or split ``split`` of a data source's
    ``{split: rows}``."""
    if isinstance(rows, Mapping):
        if split not in rows:
            raise ValueError(f"the prompt source has no {split!r} split; found {sorted(rows)}")
        return rows[split]
    return rows


def read_prompt(row: Any, tokenizer: PreTrainedTokenizerBase) -> dict[str, str] | str:
    """``{"prompt": text, "chat": messages as JSON}`` of a row, or the reason it has none
    usable. Pair rows go through :func:`inspo.data.rows.to_text`, as in offline training."""
    if not isinstance(row, dict):
        return "not_a_mapping"
    if ERROR in row:
        return row[ERROR]
    prompt = row.get("prompt")
    if "chosen" in row:  # a pair row: its prompt, whatever its layout
        return to_text(row, tokenizer, keep_chat=True)
    if prompt is None:
        return "missing_value"
    if isinstance(prompt, list):  # messages: the chat template up to the assistant turn
        if not prompt:
            return "empty_prompt"
        if not is_messages(prompt):
            return "wrong_type"
        return {"prompt": render_chat(tokenizer, prompt), "chat": json.dumps(prompt)}
    if not isinstance(prompt, str):
        return "wrong_type"
    return {"prompt": prompt, "chat": json.dumps([{"role": "user", "content": prompt}])}


def check_prompts(
    rows: Sequence[Any],
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_length: int,
    over_long: str,
    report: DataReport,
) -> list[Prompt]:
    """The usable, distinct prompts of ``rows``, in order; every other row counted in
    ``report`` under :data:`SPLIT`."""
    rep = report.split(SPLIT)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out, seen = [], set()
    for i, row in enumerate(rows):
        rep.rows_read += 1
        row_id = row.get("row_id", i) if isinstance(row, dict) else i
        read = read_prompt(row, tokenizer)
        if isinstance(read, str) or not read["prompt"].strip():
            report.skip(SPLIT, read if isinstance(read, str) else "empty_prompt", row_id)
            continue
        text = read["prompt"]
        if text in seen:
            report.skip(SPLIT, "duplicate_prompt", row_id)
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_length:
            if over_long == OverLong.drop:
                report.skip(SPLIT, "over_long", row_id)
                continue
            ids, rep.truncated = ids[-max_prompt_length:], rep.truncated + 1
        seen.add(text)
        out.append(Prompt(text, tuple(bos + ids), read.get("chat") or ""))
    rep.rows_used = len(out)
    if not out:
        raise ValueError(f"the prompt pool has no usable prompt:\n{report}")
    return out


def stream(pool: Sequence[Prompt], seed: int, start: int, count: int) -> list[Prompt]:
    """Prompts ``start .. start + count − 1`` of the run's endless prompt stream: the pool in a
    fresh seeded order every pass, so a round's prompts depend on its position alone."""
    out = []
    for k in range(start, start + count):
        epoch, i = divmod(k, len(pool))
        out.append(pool[_order(len(pool), seed, epoch)[i]])
    return out


_ORDERS: dict[tuple[int, int, int], list[int]] = {}


def _order(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _ORDERS:
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        _ORDERS[key] = order
    return _ORDERS[key]
