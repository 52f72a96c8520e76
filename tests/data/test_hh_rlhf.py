"""Real data: the HH-RLHF harmless-base test file (2,312 pairs) in the shared data folder."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest

from conftest import SHARED_DATA, data_module
from inspo.data.sources import preference_data
from inspo.models.load import byte_tokenizer

HH = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
pytestmark = pytest.mark.skipif(not HH.exists(), reason=f"shared data file absent: {HH}")


def test_every_row_of_the_full_file_is_accounted_for():
    src = functools.partial(preference_data, str(HH), val_fraction=0.1, seed=0)
    dm = data_module(src, byte_tokenizer(), max_length=1024, max_prompt_length=768)
    dm.setup()
    report = dm.report.to_dict()
    assert sum(s["rows_read"] for s in report.values()) == 2312
    for split in ("train", "val"):
        s = report[split]
        assert s["rows_read"] == s["rows_used"] + sum(s["skipped"].values())
    assert report["val"]["rows_read"] == 231
    skipped = {}
    for s in report.values():
        for reason, n in s["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    # Measured on this file: 5 pairs whose dialogues differ before the last assistant turn,
    # 4 with an empty response; every example id names the file line.
    assert skipped == {"implicit_prompt_mismatch": 5, "empty_response": 4}
    ids = [i for s in report.values() for i in s["examples"].get("implicit_prompt_mismatch", [])]
    assert sorted(ids) == sorted(
        f"harmless-base-test.jsonl.gz:{n}" for n in (1255, 1689, 1951, 1953, 2037)
    )
    row = dm.datasets["train"][0]
    text = dm.tokenizer.decode(row["plain_chosen"][: row["plain_chosen_start"]])
    assert text.startswith("<s>\n\nHuman: ") and text.endswith("\n\nAssistant:")


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_few_training_steps_on_hh_rlhf(tmp_path):
    """The docs/data.md example, shortened: inspo-train data=hh_rlhf with a tiny model."""
    run_dir = tmp_path / "run"
    overrides = [
        "data=hh_rlhf",
        f"data.source.path={HH}",
        "data.source.splits=null",  # a local file: one split, val_fraction of it held out
        "data.max_samples=24",
        "data.max_length=256",
        "data.max_prompt_length=160",
        "data.batch_size=4",
        "data.eval_batch_size=8",
        "model.tiny.hidden_size=32",
        "model.tiny.num_layers=2",
        "model.tiny.num_heads=2",
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "optim.warmup_steps=0",
        "logger=csv",
        "save_policy=false",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "INSPO_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "inspo.cli.train", *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-4000:]}"
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["train"]["rows_used"] == 24 and report["val"]["rows_used"] == 24
    for s in report.values():
        assert s["rows_read"] == s["rows_used"] + sum(s["skipped"].values())
    assert report["train"]["truncated"] > 0  # real dialogues exceed 256 byte tokens
    assert "data report:" in out
