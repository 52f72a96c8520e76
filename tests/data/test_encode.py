import pytest
import torch

from conftest import data_module
from inspo.data.collate import PreferenceCollator
from inspo.data.encode import Encoder
from inspo.data.templates import Template, resolve_template


def decode_masked(tok, view, i):
    ids, mask = view["input_ids"][i], view["loss_mask"][i].bool()
    return tok.decode(ids[mask])


def decode_context(tok, view, i):
    ids, mask, att = view["input_ids"][i], view["loss_mask"][i].bool(), view["attention_mask"][i]
    return tok.decode(ids[(~mask) & att.bool()], skip_special_tokens=False)


def make_batch(tokenizer, template="default", views=("plain", "reflective"), **kw):
    enc = Encoder(tokenizer, resolve_template(template), **kw)
    rows = [
        {**enc.encode("Q: bkt? A:", "bakitu", "zz", views), "index": 0},
        {**enc.encode("Q: long prompt? A:", "ok", "nope", views), "index": 1},
    ]
    return PreferenceCollator(tokenizer.pad_token_id, views)(rows)


def test_masks_cover_exactly_the_scored_response(tokenizer):
    batch = make_batch(tokenizer)
    plain, refl = batch["plain"], batch["reflective"]
    # Chosen rows first, then rejected rows; the mask covers the response and EOS only.
    assert [decode_masked(tokenizer, plain, i) for i in range(4)] == [
        "bakitu</s>", "ok</s>", "zz</s>", "nope</s>",
    ]  # fmt: skip
    assert [decode_masked(tokenizer, refl, i) for i in range(4)] == [
        "bakitu</s>", "ok</s>", "zz</s>", "nope</s>",
    ]  # fmt: skip
    assert decode_context(tokenizer, plain, 0) == "<s>Q: bkt? A:"
    # The chosen response is scored after the rejected one, and vice versa.
    assert decode_context(tokenizer, refl, 0) == (
        "<s>[another answer to the prompt below: zz]\nQ: bkt? A:"
    )
    assert decode_context(tokenizer, refl, 2) == (
        "<s>[another answer to the prompt below: bakitu]\nQ: bkt? A:"
    )
    # Dynamic padding: width is the longest sequence; attention covers exactly the real tokens.
    lengths = plain["attention_mask"].sum(1)
    assert plain["input_ids"].shape[1] == int(lengths.max())
    assert (plain["input_ids"][plain["attention_mask"] == 0] == tokenizer.pad_token_id).all()
    assert batch["index"].tolist() == [0, 1]


def test_raw_template_is_plain_concatenation(tokenizer):
    batch = make_batch(tokenizer, template="raw")
    assert decode_context(tokenizer, batch["reflective"], 0) == "<s>Q: bkt? A:zz"


def test_template_validation():
    with pytest.raises(ValueError, match="valid names"):
        resolve_template("fancy")
    with pytest.raises(ValueError, match=r"\{prompt\} and \{other\}"):
        Template("{prompt} only")
    assert resolve_template("<{other}>{prompt}").segments() == [
        ("text", "<"), ("other", ""), ("text", ">"), ("prompt", ""),
    ]  # fmt: skip


def test_reflective_truncation_shortens_alternative_then_prompt(tokenizer):
    tmpl = Template("{prompt}|{other}|")  # overhead: 2 tokens
    x, y_w, y_l = "P" * 10, "W" * 5, "L" * 8
    # bos(1) + overhead(2) + x(10) + other + y(+eos)
    enc = Encoder(tokenizer, tmpl, max_length=1 + 2 + 10 + 4 + 6, max_prompt_length=64)
    out = enc.encode(x, y_w, y_l, ["reflective"])
    chosen = tokenizer.decode(out["reflective_chosen"])
    assert chosen == "<s>" + "P" * 10 + "|" + "LLLL" + "|" + "WWWWW</s>"  # alternative cut first
    assert out["truncated"]
    # Tighter: the alternative is gone entirely, then the prompt loses tokens from the left.
    enc = Encoder(tokenizer, tmpl, max_length=1 + 2 + 7 + 6, max_prompt_length=64)
    chosen = tokenizer.decode(enc.encode(x, y_w, y_l, ["reflective"])["reflective_chosen"])
    assert chosen == "<s>" + "P" * 7 + "||" + "WWWWW</s>"
    # Nothing else left: only then is the scored response cut.
    enc = Encoder(tokenizer, tmpl, max_length=1 + 2 + 4, max_prompt_length=64)
    out = enc.encode(x, y_w, y_l, ["reflective"])
    assert tokenizer.decode(out["reflective_chosen"]) == "<s>||WWWW"
    assert out["reflective_chosen_start"] == 3


def test_plain_truncation_cuts_prompt_from_the_left(tokenizer):
    enc = Encoder(tokenizer, resolve_template("default"), max_length=10, max_prompt_length=6)
    out = enc.encode("abcdefghij", "xyz", "uv", ["plain"])
    # max_prompt_length=6 keeps "efghij"; the chosen pair still overflows max_length=10, so
    # the prompt loses one more token from the left and the response stays whole.
    assert tokenizer.decode(out["plain_chosen"]) == "<s>fghijxyz</s>"
    assert out["plain_chosen_start"] == 6
    assert tokenizer.decode(out["plain_rejected"]) == "<s>efghijuv</s>"
    assert out["truncated"]


def test_encode_batch_equals_encode(tokenizer):
    enc = Encoder(tokenizer, resolve_template("default"), max_length=40, max_prompt_length=20)
    rows = {"prompt": ["a b", "ccc"], "chosen": ["x", "yy"], "rejected": ["z", "w"]}
    batch = enc.encode_batch(rows, ["plain", "reflective"])
    for i in range(2):
        one = enc.encode(rows["prompt"][i], rows["chosen"][i], rows["rejected"][i],
                         ["plain", "reflective"])  # fmt: skip
        assert {k: v[i] for k, v in batch.items()} == one
    assert torch.is_tensor(torch.as_tensor(batch["plain_chosen"][0]))


def test_token_cache_is_keyed_on_the_chat_template(tmp_path, tokenizer):
    """Changing only the tokenizer's chat template (which the chat reflective template renders
    with) gives new tokens, never the stale cached ones."""

    rows = [{"prompt": f"Capital of {c}?", "chosen": "Paris.", "rejected": "Lyon."} for c in "ABCD"]

    def reflective_context(chat_template: str) -> str:
        tokenizer.chat_template = chat_template
        source = lambda: {"train": rows}
        dm = data_module(
            source, tokenizer, val_split=None, template="chat", reflective=True,
            cache_dir=str(tmp_path),
        )  # fmt: skip
        dm.setup()
        row = dm.datasets["train"][0]
        return tokenizer.decode(row["reflective_chosen"][: row["reflective_chosen_start"]])

    turns = "{% for m in messages %}"
    end = "{% endfor %}{% if add_generation_prompt %}"
    first = reflective_context(
        turns + "<|{{ m['role'] }}|>{{ m['content'] }}" + end + "<|bot|>{% endif %}"
    )
    second = reflective_context(
        turns + "[{{ m['role'] }}] {{ m['content'] }}" + end + "[bot] {% endif %}"
    )
    assert first.endswith("<|bot|>") and second.endswith("[bot] ")
    assert len(list(tmp_path.glob("train-*.arrow"))) == 2
