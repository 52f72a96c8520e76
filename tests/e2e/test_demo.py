"""The demo recipe on a tiny budget: every stage starts from the same SFT policy and is judged
against the same SFT samples, with the figures of its own run."""

from __future__ import annotations

import json

from conftest import FAST
from inspo.recipes.demo import format_timings, run_demo
from inspo.settings import EvalConfig


def test_demo_compares_every_stage_with_the_same_sft_samples(tmp_path):
    ecfg = EvalConfig(n_prompts=8, max_new_tokens=6, batch_size=8, seed=1, progress=False)
    report = run_demo(tmp_path, [*FAST, "trainer.max_steps=2"], ecfg)
    table = report["table"]
    assert list(table) == ["sft", "dpo", "inspo"]
    ref = [json.loads((tmp_path / s / "eval" / "reference_generations.json").read_text())
           for s in ("dpo", "inspo")]  # fmt: skip
    assert [r["output"] for r in ref[0]] == [r["output"] for r in ref[1]]
    for name in ("dpo", "inspo"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["choices"]["model"].endswith("sft/policy")
        plain = summary["metrics"]["val/plain/rewards/accuracies"]
        assert table[name]["pref_accuracy_plain"] == plain
        assert 0 <= table[name]["win_rate_vs_sft"] <= 1
    assert table["inspo"]["pref_accuracy_reflective"] is not None
    assert table["dpo"]["pref_accuracy_reflective"] is None
    assert json.loads((tmp_path / "demo.json").read_text())["table"] == table
    assert (tmp_path / "demo.png").exists()
    # The stage-by-stage profile: every stage's wall and CPU seconds, within the total.
    cpu = report["stage_cpu_seconds"]
    assert list(cpu) == list(report["stage_seconds"]) == ["sft", "dpo", "inspo"]
    assert all(c > 0 for c in cpu.values())
    assert sum(report["stage_seconds"].values()) + report["seconds_eval"] <= report["seconds_total"]
    assert sum(cpu.values()) + report["cpu_seconds_eval"] <= report["cpu_seconds_total"] + 1e-6
    rows = format_timings(report).splitlines()[2:]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == [
        "sft",
        "dpo",
        "inspo",
        "evaluation",
        "total",
    ]
