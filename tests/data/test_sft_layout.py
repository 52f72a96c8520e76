"""reflection.sft_fraction: a share of SFT rows laid out reflectively, R(x, other) + chosen."""

from __future__ import annotations

import functools

import pytest

from conftest import data_module
from inspo.data.sources import synthetic
from inspo.data.templates import TEMPLATES
from inspo.models.load import byte_tokenizer


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_sft_fraction_lays_out_rows_reflectively(fraction, tmp_path):
    tok = byte_tokenizer()
    src = functools.partial(synthetic, n_sft=40, n_train=8, n_val=8, n_eval=4)
    dm = data_module(src, tok, train_split="sft", val_split=None,
                              sft_fraction=fraction, seed=0)  # fmt: skip
    dm.setup("fit")
    raw = {r["row_id"]: r for r in (dict(r, row_id=i) for i, r in enumerate(dm.raw["sft"]))}
    head = TEMPLATES["default"].split("{other}")[0]
    n = 0
    for row in dm.datasets["sft"]:
        start = row["plain_chosen_start"]
        ctx, resp = tok.decode(row["plain_chosen"][:start]), tok.decode(row["plain_chosen"][start:])
        src_row = raw[row["row_id"]]
        assert resp == src_row["chosen"] + "</s>"  # the scored response is always the chosen one
        if ctx.startswith("<s>" + head):
            n += 1
            assert ctx == "<s>" + TEMPLATES["default"].format(
                prompt=src_row["prompt"], other=src_row["rejected"]
            )
        else:
            assert ctx == "<s>" + src_row["prompt"]
    total = len(dm.datasets["sft"])
    if fraction == 0.0:
        assert n == 0
    elif fraction == 1.0:
        assert n == total
    else:
        assert 0.25 * total < n < 0.75 * total
