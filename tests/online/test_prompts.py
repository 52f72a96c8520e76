"""The prompt pool: bad rows counted as for pair data; the seeded stream."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED_DATA
from inspo.config import compose_config
from inspo.data.report import DataReport
from inspo.data.sources import preference_data
from inspo.data.synthetic import prompt_pool
from inspo.models.load import byte_tokenizer
from inspo.names import ERROR
from inspo.objectives import DPO
from inspo.online import run as online_run
from inspo.online.prompts import SPLIT, check_prompts, pool_rows, stream
from inspo.settings import load_settings


def test_bad_prompt_rows_are_counted_not_fatal(tokenizer):
    rows = [
        {"prompt": "Word with b, k, t: "},
        {"prompt": ""},
        {"row_id": "f.jsonl:3", ERROR: "malformed_json"},
        {"text": "no prompt key"},
        {"prompt": 7},
        {"prompt": "x" * 40},
        {"prompt": "Word with b, k, t: "},
        {"prompt": "Capital?", "chosen": "Paris.", "rejected": "Lyon."},  # a pair row's prompt
        "not a mapping",
    ]
    report = DataReport()
    pool = check_prompts(rows, tokenizer, max_prompt_length=32, over_long="drop", report=report)
    assert [p.text for p in pool] == ["Word with b, k, t: ", "Capital?"]
    r = report.split(SPLIT)
    assert r.rows_read == len(rows) == r.rows_used + sum(r.skipped.values())
    assert dict(r.skipped) == {"empty_prompt": 1, "malformed_json": 1, "missing_value": 1,
                               "wrong_type": 1, "over_long": 1, "duplicate_prompt": 1,
                               "not_a_mapping": 1}  # fmt: skip
    assert pool[0].ids[0] == tokenizer.bos_token_id
    report = DataReport()
    pool = check_prompts(rows[5:6], tokenizer, 32, "truncate", report)
    assert len(pool[0].ids) == 33 and report.split(SPLIT).truncated == 1
    with pytest.raises(ValueError, match="no usable prompt"):
        check_prompts([{"prompt": ""}], tokenizer, 32, "truncate", DataReport())


def test_stream_is_seeded_and_covers_the_pool_each_pass(tokenizer):
    pool = check_prompts([{"prompt": f"p{i}"} for i in range(10)], tokenizer, 8, "drop",
                         DataReport())  # fmt: skip
    first, second = stream(pool, 3, 0, 10), stream(pool, 3, 10, 10)
    assert sorted(p.text for p in first) == sorted(p.text for p in second)
    assert [p.text for p in first] != [p.text for p in second]  # a fresh order every pass
    assert stream(pool, 3, 4, 8) == (first + second)[4:12]  # position alone decides
    assert stream(pool, 4, 0, 10) != first


def test_a_sources_splits_give_the_train_split(tokenizer):
    rows = {"train": [{"prompt": "a"}], "val": [{"prompt": "b"}]}
    assert pool_rows(rows, "train") == [{"prompt": "a"}]
    assert pool_rows([{"prompt": "c"}], "train") == [{"prompt": "c"}]
    with pytest.raises(ValueError, match=r"no 'train' split; found \['val'\]"):
        pool_rows({"val": []}, "train")


def write_pairs(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p, "chosen": "yes", "rejected": "no"}) + "\n"
                            for p in prompts))  # fmt: skip
    return path


def pool(tmp_path, *overrides):
    settings = load_settings(compose_config(list(overrides), tmp_path / "run", name="iterate"))
    ext = online_run.Iterate()
    ext.datamodule(settings, byte_tokenizer(), DPO())
    return [p.text for p in ext.pool]


def test_the_pool_is_the_datas_train_split_unless_set(tmp_path):
    """``data=jsonl``: the pool is the prompts of the data's own train split (not the built-in
    task's, and not its held-out val prompts); ``iterate.prompts`` takes a source config as
    ``data.source`` does, and the train split of what it returns."""
    data = write_pairs(tmp_path / "pairs.jsonl", [f"Question {i}?" for i in range(20)])
    overrides = ["data=jsonl", f"data.source.path={data}", "data.source.val_fraction=0.25"]
    got = pool(tmp_path, *overrides)
    raw = preference_data(str(data), val_fraction=0.25)
    assert got == [r["prompt"] for r in raw["train"]] and len(got) == 15
    other = write_pairs(tmp_path / "other.jsonl", ["Other?", "Else?"])
    source = f"{{_target_: inspo.data.sources.preference_data, path: {other}}}"
    assert pool(tmp_path, *overrides, f"iterate.prompts={source}") == ["Other?", "Else?"]
    # The built-in task names its own pool: every training prompt of the task.
    assert pool(tmp_path) == [r["prompt"] for r in prompt_pool()]


def test_hh_rlhf_prompts_make_the_pool(tmp_path):
    path = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    if not path.exists():
        pytest.skip(f"HH-RLHF test data not found at {path}")
    got = pool(tmp_path, "data=hh_rlhf", f"data.source.path={path}", "data.source.splits=null")
    assert len(got) > 1000
    assert all(p.startswith("\n\nHuman:") and p.endswith("\n\nAssistant:") for p in got)
