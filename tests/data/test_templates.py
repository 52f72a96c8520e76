"""The reflective templates R(x, y') on one example: the exact strings the model sees."""

from __future__ import annotations

import pytest

from inspo.data.encode import Encoder
from inspo.data.rows import to_text
from inspo.data.templates import resolve_template

CHAT = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ROW = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}

# template → (context of the chosen response, i.e. R(x, y_l); the whole rejected sequence)
EXPECTED = {
    "default": (
        "<s>[another answer to the prompt below: Lyon.]\nCapital of France?",
        "<s>[another answer to the prompt below: Paris.]\nCapital of France?Lyon.</s>",
    ),
    "raw": ("<s>Capital of France?Lyon.", "<s>Capital of France?Paris.Lyon.</s>"),
    "chat": (
        "<s><|user|>Capital of France?\n\n"
        "[Another answer to this request, shown for reference only:]\nLyon.\n<|assistant|>",
        "<s><|user|>Capital of France?\n\n"
        "[Another answer to this request, shown for reference only:]\nParis.\n<|assistant|>"
        "Lyon.</s>",
    ),
    "chat:{prompt} (other answer: {other})": (
        "<s><|user|>Capital of France? (other answer: Lyon.)\n<|assistant|>",
        "<s><|user|>Capital of France? (other answer: Paris.)\n<|assistant|>Lyon.</s>",
    ),
}


def encode(tokenizer, template, max_length=256):
    chat = template.startswith("chat")
    if chat:
        tokenizer.chat_template = CHAT
    enc = Encoder(tokenizer, resolve_template(template), max_length, 128)
    text = to_text(
        {"prompt": [{"role": "user", "content": ROW["prompt"]}], "chosen": [
            {"role": "assistant", "content": ROW["chosen"]}], "rejected": [
            {"role": "assistant", "content": ROW["rejected"]}]}
        if chat else dict(ROW),
        tokenizer,
        keep_chat=True,
    )  # fmt: skip
    batch = enc.encode_batch({k: [v] for k, v in text.items()}, ["plain", "reflective"])
    return {k: v[0] for k, v in batch.items()}


@pytest.mark.parametrize("template", list(EXPECTED))
def test_decoded_reflective_strings(tokenizer, template):
    out = encode(tokenizer, template)
    start = out["reflective_chosen_start"]
    context, whole_rejected = EXPECTED[template]
    assert tokenizer.decode(out["reflective_chosen"][:start]) == context
    assert tokenizer.decode(out["reflective_chosen"][start:]) == "Paris.</s>"
    assert tokenizer.decode(out["reflective_rejected"]) == whole_rejected


def test_chat_plain_view_is_the_chat_prompt(tokenizer):
    out = encode(tokenizer, "chat")
    assert tokenizer.decode(out["plain_chosen"]) == (
        "<s><|user|>Capital of France?\n<|assistant|>Paris.</s>"
    )


def test_chat_truncation_cuts_the_alternative_first_then_the_prompt(tokenizer):
    full = encode(tokenizer, "chat")
    n = len(full["reflective_chosen"])
    out = encode(tokenizer, "chat", max_length=n - 3)  # the alternative loses its end
    assert len(out["reflective_chosen"]) == n - 3 and out["truncated"]
    assert tokenizer.decode(out["reflective_chosen"]).endswith("\nLy\n<|assistant|>Paris.</s>")
    out = encode(tokenizer, "chat", max_length=n - 5 - 8)  # alternative gone, prompt cut left
    text = tokenizer.decode(out["reflective_chosen"])
    assert text.startswith(
        "<s><|user|>of France?\n\n[Another answer to this request, shown for reference only:]\n\n<"
    ) and text.endswith("Paris.</s>")
    assert not out["response_cut"]


def test_chat_keeps_earlier_turns_and_puts_the_alternative_in_the_last_user_turn(tokenizer):
    tokenizer.chat_template = CHAT
    turns = [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of France?"},
    ]
    row = {
        "chosen": [*turns, {"role": "assistant", "content": "Paris."}],
        "rejected": [*turns, {"role": "assistant", "content": "Lyon."}],
    }
    text = to_text(row, tokenizer, keep_chat=True)
    enc = Encoder(tokenizer, resolve_template("chat:{prompt} [other: {other}]"), 256, 128)
    out = enc.encode_batch({k: [v] for k, v in text.items()}, ["plain", "reflective"])
    assert tokenizer.decode(out["reflective_chosen"][0]) == (
        "<s><|user|>Hi.\n<|assistant|>Hello.</s>\n"
        "<|user|>Capital of France? [other: Lyon.]\n<|assistant|>Paris.</s>"
    )
    assert tokenizer.decode(out["plain_rejected"][0]) == (
        "<s><|user|>Hi.\n<|assistant|>Hello.</s>\n"
        "<|user|>Capital of France?\n<|assistant|>Lyon.</s>"
    )
