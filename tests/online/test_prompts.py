"""The prompt pool: bad rows counted as for pair data; the seeded stream."""

from __future__ import annotations

import pytest

from inspo.data.report import DataReport
from inspo.names import ERROR
from inspo.online.prompts import SPLIT, check_prompts, stream


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
