"""Real-data sources: file formats, bad rows by reason, layouts, the report identity."""

from __future__ import annotations

import functools
import gzip
import json

import pytest
from datasets import Dataset

from conftest import data_module
from inspo.data import sources
from inspo.data.report import DataError
from inspo.data.rows import dialogue_messages, split_implicit, to_text
from inspo.data.sources import preference_data

CHAT = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

GOOD = [{"prompt": f"Q{i}? A:", "chosen": f" good{i}", "rejected": f" bad{i}"} for i in range(6)]


def write_jsonl(path, rows, extra_lines=()):
    with open(path, "wb") as f:
        for r in rows:
            f.write((json.dumps(r) + "\n").encode())
        for line in extra_lines:
            f.write(line)
    return path


def build(tokenizer, source, **kw):
    kw = {"val_split": None, "max_length": 64, "max_prompt_length": 32, **kw}
    dm = data_module(source, tokenizer, **kw)
    dm.setup()
    return dm


def identity(split_report):
    d = split_report.to_dict()
    return d["rows_read"] == d["rows_used"] + sum(d["skipped"].values())


def test_bad_jsonl_lines_are_counted_with_file_and_line(tmp_path, tokenizer):
    bad = [
        b"{not json\n",
        b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n',  # latin-1 byte: not UTF-8
        b"[1, 2]\n",
        b'{"prompt": "Q", "chosen": 3, "rejected": "b"}\n',
        b'{"prompt": "Q", "chosen": "same", "rejected": "same"}\n',
        b'{"prompt": "Q", "chosen": "  ", "rejected": "b"}\n',
        b'{"prompt": "Q", "rejected": "b"}\n',
        b"\n",  # blank lines are not rows
    ]
    path = write_jsonl(tmp_path / "d.jsonl", GOOD, bad)
    dm = build(tokenizer, functools.partial(preference_data, str(path)))
    rep = dm.report.split("train")
    assert rep.rows_read == 13 and rep.rows_used == 6 and identity(rep)
    assert dict(rep.skipped) == {
        "malformed_json": 1, "invalid_utf8": 1, "not_a_mapping": 1, "wrong_type": 1,
        "identical_responses": 1, "empty_response": 1, "missing_value": 1,
    }  # fmt: skip
    assert rep.examples["malformed_json"] == ["d.jsonl:7"]
    assert rep.examples["invalid_utf8"] == ["d.jsonl:8"]
    # gzip reads the same
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    rep2 = build(tokenizer, functools.partial(preference_data, str(gz))).report.split("train")
    assert rep2.to_dict()["skipped"] == rep.to_dict()["skipped"]


def test_strict_names_the_row(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD, [b"{oops\n"])
    with pytest.raises(DataError, match=r"d\.jsonl:7 \(malformed_json\)"):
        build(tokenizer, functools.partial(preference_data, str(path)), strict=True)


def test_missing_columns_is_a_startup_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "good": "a", "bad": "b"}])
    with pytest.raises(DataError, match=r"missing column.*'chosen'.*found \['bad', 'good'"):
        preference_data(str(path))
    rows = preference_data(str(path), prompt_key="question", chosen_key="good", rejected_key="bad")
    assert rows["train"][0] == {
        "prompt": "q",
        "chosen": "a",
        "rejected": "b",
        "row_id": "d.jsonl:1",
    }


@pytest.mark.parametrize("fmt", ["json", "parquet", "csv", "disk"])
def test_every_file_format_reads_the_same_rows(tmp_path, fmt):
    ds = Dataset.from_list(GOOD)
    path = tmp_path / f"d.{fmt}"
    {
        "json": lambda: path.write_text(json.dumps(GOOD)),
        "parquet": lambda: ds.to_parquet(str(path)),
        "csv": lambda: ds.to_csv(str(path), index=False),
        "disk": lambda: ds.save_to_disk(str(path)),
    }[fmt]()
    rows = preference_data(str(path))["train"]
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows] == GOOD
    assert [r["row_id"] for r in rows] == list(range(6))


def test_split_mapping_held_out_fraction_and_max_samples(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD * 5)  # 30 rows
    out = preference_data(str(path), val_fraction=0.2, seed=3)
    assert len(out["train"]) == 24 and len(out["val"]) == 6
    again = preference_data(str(path), val_fraction=0.2, seed=3)
    assert [r["row_id"] for r in again["val"]] == [r["row_id"] for r in out["val"]]
    other = preference_data(str(path), val_fraction=0.2, seed=4)
    assert [r["row_id"] for r in other["val"]] != [r["row_id"] for r in out["val"]]
    mapped = preference_data(
        {"tr": str(path), "te": str(path)}, splits={"train": "tr", "val": "te"}
    )
    assert sorted(mapped) == ["train", "val"]
    with pytest.raises(DataError, match="not in"):
        preference_data(str(path), splits={"train": "train_prefs"})
    src = functools.partial(preference_data, str(path), val_fraction=0.2)
    dm = build(tokenizer, src, val_split="val", max_samples=5)
    assert dm.report.split("train").rows_used == 5 and len(dm.datasets["val"]) == 5


def test_train_parts_are_disjoint_cover_the_train_rows_and_share_the_held_out_rows(tmp_path):
    """Two runs on parts 0 and 1 of 2 train on no common row, between them on every row the
    hold-out left, and validate on the same held-out rows; a part that does not exist is a
    setting error naming the key."""
    from inspo.settings import SettingError

    path = write_jsonl(tmp_path / "d.jsonl", GOOD * 5)  # 30 rows
    whole = preference_data(str(path), val_fraction=0.2, seed=3)
    a, b = (
        preference_data(str(path), val_fraction=0.2, seed=3, train_parts=2, train_part=k)
        for k in (0, 1)
    )
    ids = {name: [r["row_id"] for r in d["train"]] for name, d in (("a", a), ("b", b))}
    assert len(ids["a"]) == len(ids["b"]) == 12 and not set(ids["a"]) & set(ids["b"])
    assert sorted(ids["a"] + ids["b"]) == sorted(r["row_id"] for r in whole["train"])
    lines = [int(i.split(":")[1]) for i in ids["a"]]
    assert lines == sorted(lines)  # file order kept
    assert a["val"] == b["val"] == whole["val"]
    with pytest.raises(SettingError, match=r"data\.source\.train_part"):
        preference_data(str(path), train_parts=2, train_part=2)


def test_unreachable_hub_says_pass_a_local_path(monkeypatch):
    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'org/name' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(sources, "load_dataset", offline)
    with pytest.raises(DataError, match="could not reach the Hub for dataset 'org/name'; pass a"):
        preference_data("org/name")
    with pytest.raises(DataError, match="data file not found"):
        preference_data("./nowhere.jsonl")


def test_implicit_prompt_extraction_and_mismatch():
    c = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: no"
    r = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: sure, one"
    assert split_implicit(c, r) == (
        "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant:", " no", " sure, one",
    )  # fmt: skip
    r2 = "\n\nHuman: hey\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: sure"
    assert split_implicit(c, r2) == "implicit_prompt_mismatch"
    assert split_implicit("no turns", "at all") == "no_assistant_turn"


def test_hh_dialogues_become_chat_turns_with_a_chat_template_and_stay_text_without(tokenizer):
    row = {
        "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: no",
        "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: sure, one",
    }
    plain = to_text(row, tokenizer, keep_chat=True)  # the byte tokenizer has no template
    assert plain["prompt"].endswith("\n\nHuman: joke?\n\nAssistant:") and plain["chosen"] == " no"
    tokenizer.chat_template = CHAT
    chat = to_text(row, tokenizer, keep_chat=True)
    turns = [("user", "hi"), ("assistant", "hello"), ("user", "joke?")]
    assert json.loads(chat["chat"]) == [{"role": r, "content": c} for r, c in turns]
    assert chat["prompt"] == "<|user|>hi\n<|assistant|>hello</s>\n<|user|>joke?\n<|assistant|>"
    assert (chat["chosen"], chat["rejected"]) == ("no", "sure, one")
    # A prompt that is not a dialogue is one user turn; an empty answer is still a reason.
    assert dialogue_messages("Question?\n\nAssistant:") is None
    odd = {"chosen": "Question?\n\nAssistant: a", "rejected": "Question?\n\nAssistant: b"}
    assert to_text(odd, tokenizer)["prompt"] == "<|user|>Question?\n\nAssistant:\n<|assistant|>"
    empty = {"chosen": row["chosen"], "rejected": row["chosen"].removesuffix(" no") + "  "}
    assert to_text(empty, tokenizer) == "empty_response"


def test_conversational_rows_use_the_chat_template_without_duplicate_specials(tokenizer):
    tokenizer.chat_template = CHAT
    row = {
        "row_id": 0,
        "prompt": "Name a colour.",
        "chosen": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
        ],
        "rejected": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "No."},
        ],
    }
    text = to_text(row, tokenizer)
    assert text["prompt"] == "<|user|>Name a colour.\n<|assistant|>"
    assert text["chosen"] == "Blue."
    dm = build(
        tokenizer,
        lambda: {"train": [row, {**row, "prompt": "Other."}]},
        max_length=128,
        max_prompt_length=64,
    )
    rep = dm.report.split("train")
    assert rep.rows_used == 1 and dict(rep.skipped) == {"prompt_mismatch": 1}
    ids = dm.datasets["train"][0]["plain_chosen"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert ids[0] == bos and ids.count(bos) == 1 and ids[-1] == eos and ids.count(eos) == 1
    assert tokenizer.decode(ids) == "<s><|user|>Name a colour.\n<|assistant|>Blue.</s>"
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="chat_template"):
        to_text(row, tokenizer)


def test_a_pair_left_without_responses_in_the_reflective_view_is_dropped_and_counted(tokenizer):
    # A long earlier turn fills the chat reflective context (earlier turns are never cut): both
    # scored responses are cut to nothing there, while the plain view still holds them.
    tokenizer.chat_template = CHAT
    history = [{"role": "user", "content": "x" * 120}, {"role": "assistant", "content": "ok"}]
    turn = [*history, {"role": "user", "content": "Name a colour."}]
    rows = [
        {"chosen": [*turn, {"role": "assistant", "content": c}],
         "rejected": [*turn, {"role": "assistant", "content": r}]}
        for c, r in (("Blue.", "No."), ("Red.", "Hm."))
    ]  # fmt: skip
    rows[1]["chosen"][0] = rows[1]["rejected"][0] = {"role": "user", "content": "short"}
    dm = build(
        tokenizer, lambda: {"train": rows}, max_length=160, max_prompt_length=160,
        reflective=True, template="chat",
    )  # fmt: skip
    rep = dm.report.split("train")
    assert rep.rows_used == 1 and dict(rep.skipped) == {"identical_after_truncation": 1}
    kept = dm.datasets["train"][0]
    for view in ("plain", "reflective"):
        assert len(kept[f"{view}_chosen"]) > kept[f"{view}_chosen_start"]


def test_over_long_policy(tmp_path, tokenizer):
    rows = [{"prompt": "P", "chosen": "W" * 80, "rejected": "L"}, *GOOD]
    src = lambda: {"train": [dict(r) for r in rows]}
    kept = build(tokenizer, src).report.split("train")
    assert kept.rows_used == 7 and kept.response_truncated == 1 and kept.truncated == 1
    dropped = build(tokenizer, src, over_long="drop").report.split("train")
    assert dropped.rows_used == 6 and dict(dropped.skipped) == {"over_long": 1}
    assert identity(dropped)


def uf_row(i):
    q = f"Question {i}?"
    return {
        "prompt": q,
        "prompt_id": str(i),
        "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": f"Good {i}."}],
        "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": "Bad."}],
        "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Good."}],
        "score_chosen": 8.0,
        "score_rejected": 3.0,
    }


def test_ultrafeedback_layout_from_a_local_save_to_disk_folder(tmp_path, tokenizer):
    from datasets import DatasetDict
    from hydra import compose, initialize_config_dir

    from conftest import REPO

    folder = tmp_path / "uf"
    DatasetDict(
        {
            "train_prefs": Dataset.from_list([uf_row(i) for i in range(8)]),
            "test_prefs": Dataset.from_list([uf_row(i) for i in range(8, 12)]),
        }
    ).save_to_disk(str(folder))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["data=ultrafeedback", f"data.source.path={folder}"])
    src = cfg.data.source
    assert dict(src.splits) == {"train": "train_prefs", "val": "test_prefs"}
    tokenizer.chat_template = CHAT
    source = functools.partial(preference_data, src.path, splits=dict(src.splits))
    dm = build(tokenizer, source, val_split="val", max_length=128, max_prompt_length=64)
    assert [dm.report.split(s).rows_used for s in ("train", "val")] == [8, 4]
    row = dm.datasets["val"][0]
    assert tokenizer.decode(row["plain_chosen"]) == (
        "<s><|user|>Question 8?\n<|assistant|>Good 8.</s>"
    )


@pytest.mark.parametrize("name", ["hh_rlhf", "ultrafeedback", "jsonl"])
def test_data_configs_compose(name):
    from hydra import compose, initialize_config_dir

    from conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={name}", "data.source.path=${oc.env:HOME}"])
        assert cfg.data.source._target_ == "inspo.data.sources.preference_data"
        assert cfg.data.source.val_split == "val" and cfg.data.over_long == "truncate"
        if name == "hh_rlhf":  # the Hub dataset by default (its test split validates)
            cfg = compose("train", overrides=["data=hh_rlhf"])
            assert cfg.data.source.path == "Anthropic/hh-rlhf"
            assert dict(cfg.data.source.splits) == {"train": "train", "val": "test"}
