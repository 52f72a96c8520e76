"""inspo-train with packed batches equals the padded run; grouped batches resume exactly."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import FAST, full_and_resumed
from inspo.config import compose_config
from inspo.names import TOKENS_PADDING_SHARE
from inspo.training.run import run


def train(path, *overrides):
    return run(compose_config([*FAST, "save_policy=false", *overrides], path))


def logged(path, name):
    with open(path / "csv" / "metrics.csv") as f:
        return [float(r[name]) for r in csv.DictReader(f) if r.get(name)]


@pytest.mark.parametrize(
    "setup",
    [
        ["reflection=off"],
        # every scoring path at once: reflective policy, plain reference context (precomputed),
        # a mixed-in standard loss and self-distillation (full logits of both contexts)
        [
            "reflection=inspo",
            "reflection.reference_context=plain",
            "reference=precomputed",
            "reflection.standard_weight=0.5",
            "reflection.distill_weight=0.1",
        ],
    ],
    ids=["dpo", "inspo-every-path"],
)
def test_a_packed_run_equals_the_padded_run(tmp_path, setup):
    common = [*setup, "trainer.max_steps=3"]
    padded = train(tmp_path / "padded", *common, "data.packing=false")
    packed = train(tmp_path / "packed", *common, "data.packing=true")
    vals = [k for k in padded["metrics"] if k.startswith("val/")]
    assert "val/plain/rewards/margins" in vals
    for key in vals:
        assert packed["metrics"][key] == pytest.approx(padded["metrics"][key], rel=1e-4, abs=1e-6)
    share = f"train/{TOKENS_PADDING_SHARE}"
    assert logged(tmp_path / "packed", share) == [0.0] * 3
    assert all(s > 0.05 for s in logged(tmp_path / "padded", share))
    report = json.loads((tmp_path / "packed" / "data_report.json").read_text())
    assert report["train"]["batches"]["padding_share"] == 0.0
    assert report["train"]["batches"]["padding_share_without_packing"] > 0.05


@pytest.mark.parametrize(
    "batching",
    [["data.group_by_length=true", "data.group_size=2"], ["data.max_tokens_per_batch=700"]],
    ids=["grouped", "budget"],
)
def test_grouped_batches_resume_exactly(tmp_path, batching):
    common = ["trainer.max_steps=6", "checkpoint.every_n_train_steps=1", *batching]
    full, resumed = full_and_resumed(train, tmp_path, *common)
    assert resumed["steps"] == full["steps"] == 6
    for key in ("val/loss", "val/rewards/margins", "val/logps/chosen"):
        assert resumed["metrics"][key] == pytest.approx(full["metrics"][key], rel=1e-5, abs=1e-7)
