"""The tuned head-to-head report on hand-made run folders: trial counts, best configurations,
the paired differences and both intervals, computed by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from inspo.cli.report import cli
from inspo.evaluation.head_to_head import (
    build,
    paired_bootstrap,
    t_cdf,
    t_interval,
    t_quantile,
)

PROMPTS = [
    "Word with b, k, t: ",
    "Word with d, f, g: ",
    "Word with h, j, l: ",
    "Word with m, n, p: ",
]
T_975_2 = 4.302653  # Student t, 97.5% quantile, 2 degrees of freedom (tables)


def write_run(
    path: Path,
    reflection: str,
    split: str,
    metrics: dict,
    status: str = "finished",
    seed: int = 0,
    scores: list[float] | None = None,
    texts: list[str] | None = None,
    reference: str = "ba",
    **choices,
) -> None:
    path.mkdir(parents=True)
    summary = {
        "status": status,
        "metrics": metrics,
        "choices": {"objective": "DPO", "objective_config": "dpo", "reflection": reflection,
                    "eval_split": split, "seed": seed, **choices},
    }  # fmt: skip
    (path / "summary.json").write_text(json.dumps(summary))
    if scores is not None:
        rows = [
            {"prompt": p, "policy": t, "reference": reference, "policy_score": s,
             "reference_score": 0.0}
            for p, s, t in zip(PROMPTS, scores, texts, strict=True)
        ]  # fmt: skip
        (path / "eval").mkdir()
        (path / "eval" / "samples.json").write_text(json.dumps(rows))


DPO_BEST = {"beta": 0.5, "lr": 5e-5}
INSPO_BEST = {"beta": 1.0, "lr": 2e-4, "reference_context": "plain", "standard_weight": 0.3}


@pytest.fixture
def head(tmp_path) -> Path:
    """Three trials per method (one InSPO trial failed), then the best of each rerun with seeds
    0–2 on the test prompts, and an untuned setting whose pairs are incomplete."""
    tune = tmp_path / "tune"
    for i, (value, cfg) in enumerate(
        [(0.55, {"beta": 0.1, "lr": 1e-5}), (0.60, DPO_BEST), (0.60, {"beta": 1.0, "lr": 1e-4})]
    ):
        write_run(tune / "dpo" / str(i), "off", "tune", {"eval/win_rate": value}, **cfg)
    inspo_trials = [
        (0.52, "finished", {**INSPO_BEST, "reference_context": "reflective", "beta": 0.2}),
        (None, "failed", {**INSPO_BEST, "lr": 5e-4}),
        (0.58, "finished", INSPO_BEST),
    ]
    for i, (value, status, cfg) in enumerate(inspo_trials):
        metrics = {} if value is None else {"eval/win_rate": value}
        write_run(tune / "inspo" / str(i), "inspo", "tune", metrics, status, **cfg)
    # Per seed, DPO's and InSPO's samples on 4 prompts (the SFT start's score is 0 throughout):
    # win rates vs SFT 1.0/0.5 (seed 0), 0.5/0.5 (seed 1), 1.0/0.5 (seed 2).
    dpo_scores = [[1, 1, 1, 1], [1, 1, -1, -1], [1, 1, 1, 1]]
    inspo_scores = [[0, 0, 0, 0], [1, 1, -1, -1], [0, 0, 0, 0]]
    lc = {"dpo": [0.6, 0.5, 0.6], "inspo": [0.5, 0.5, 0.4]}
    for seed in range(3):
        for name, refl, scores, text, cfg in (
            ("dpo", "off", dpo_scores[seed], "bababa", DPO_BEST),
            ("inspo", "inspo", inspo_scores[seed], "ba", INSPO_BEST),
        ):
            metrics = {"eval/win_rate": -1.0, "eval/lc_win_rate": lc[name][seed]}
            write_run(tmp_path / "tuned" / name / f"seed{seed}", refl, "eval", metrics,
                      seed=seed, scores=scores, texts=[text] * 4, **cfg)  # fmt: skip
    # untuned: seed 0 paired; seed 1 InSPO sampled another SFT start; seed 2 DPO only.
    untuned = {"beta": 0.5, "lr": 5e-5, "scores": [1, 0, 0, 0], "texts": ["ba"] * 4}
    for name, refl, seeds in (("dpo", "off", (0, 1, 2)), ("inspo", "inspo", (0, 1))):
        for seed in seeds:
            ref = "ko" if (name, seed) == ("inspo", 1) else "ba"
            path = tmp_path / "untuned" / name / f"seed{seed}"
            write_run(
                path, refl, "eval", {"eval/win_rate": 0.6}, seed=seed, reference=ref, **untuned
            )
    # The SFT start beside them: no evaluation, so neither a trial nor a test run.
    write_run(tmp_path / "sft" / "seed0", "off", "eval", {}, objective_config="sft")
    return tmp_path


def test_tuning_counts_trials_and_picks_each_best(head):
    tuning = build(head)["tuning"]
    assert tuning["counts"] == {"dpo/off": 3, "dpo/inspo": 3} and tuning["equal_trials"]
    dpo, inspo = tuning["methods"]["dpo/off"], tuning["methods"]["dpo/inspo"]
    assert dpo["varied"] == ["beta", "lr"]
    assert inspo["varied"] == ["beta", "lr", "reference_context"]
    assert (dpo["best"]["trial"], dpo["best"]["config"]) == (1, DPO_BEST)  # the first of a tie
    assert (inspo["best"]["trial"], inspo["best"]["value"], inspo["n_failed"]) == (2, 0.58, 1)


def test_unequal_budgets_are_flagged(head):
    write_run(head / "tune" / "dpo" / "3", "off", "tune", {"eval/win_rate": 0.1}, beta=2.0, lr=1e-3)
    report = build(head)
    assert not report["tuning"]["equal_trials"]
    cli([str(head), "--head-to-head"])
    assert "dpo/off 4, dpo/inspo 3 (**NOT EQUAL" in (head / "head_to_head.md").read_text()


def test_paired_differences_and_both_intervals_by_hand(head):
    report = build(head)
    assert (report["baseline"], report["method"]) == ("dpo/off", "dpo/inspo")
    tuned = report["settings"]["tuned"]
    assert tuned["best"] == {"dpo/off": True, "dpo/inspo": True}
    c = tuned["comparison"]
    assert c["seeds"] == [0, 1, 2] and c["left_out"] == []
    win = c["metrics"]["eval/win_rate"]  # from the samples, not the summaries' -1
    assert win["baseline"] == [1.0, 0.5, 1.0] and win["method"] == [0.5, 0.5, 0.5]
    # Per-seed differences −0.5, 0, −0.5: mean −1/3, std √(1/12), t-interval mean ± t·std/√3.
    half = T_975_2 * math.sqrt(1 / 12) / math.sqrt(3)
    assert win["diff"] == pytest.approx(-1 / 3)
    assert (win["t_low"], win["t_high"]) == pytest.approx((-1 / 3 - half, -1 / 3 + half), abs=1e-5)
    # Within each seed every prompt differs by the same amount: resampling prompts changes
    # nothing, so the bootstrap interval is the point.
    assert (win["boot_low"], win["boot_high"]) == pytest.approx((-1 / 3, -1 / 3))
    assert (win["behind"], win["ahead"]) == (2, 0)
    # The direct comparison: InSPO's sample loses to DPO's on seeds 0 and 2, ties on seed 1.
    direct = c["metrics"]["direct"]
    assert direct["method"] == [0.0, 0.5, 0.0] and direct["diff"] == pytest.approx(-1 / 3)
    assert c["metrics"]["eval/score/policy"]["diff"] == pytest.approx(-2 / 3)
    length = c["metrics"]["eval/length/policy"]
    assert (length["diff"], length["t_low"], length["t_high"]) == (-4.0, -4.0, -4.0)
    lc = c["metrics"]["eval/lc_win_rate"]  # from the summaries: t-interval only
    assert lc["diff"] == pytest.approx(-0.1) and "boot_low" not in lc


def test_unpaired_seeds_are_named_not_dropped(head):
    c = build(head)["settings"]["untuned"]["comparison"]
    assert c["seeds"] == [0]
    assert c["left_out"] == [
        "seed 1: different prompts or SFT samples (not the same start)",
        "seed 2: 1 baseline and 0 method runs",
    ]
    assert math.isnan(c["metrics"]["eval/win_rate"]["t_low"])  # one pair: no interval
    cli([str(head), "--head-to-head"])  # written as strict JSON: no interval is null, not NaN
    written = json.loads((head / "head_to_head.json").read_text(), parse_constant=pytest.fail)
    assert written["settings"]["untuned"]["comparison"]["metrics"]["eval/win_rate"]["t_low"] is None


def test_cli_writes_the_report(head):
    cli([str(head), "--head-to-head"])
    md = (head / "head_to_head.md").read_text()
    assert "Trials per method: dpo/off 3, dpo/inspo 3 (equal)" in md
    assert "dpo/inspo (its search's best trial): beta 1.000, lr 0.0002" in md
    assert json.loads((head / "head_to_head.json").read_text())["method"] == "dpo/inspo"


@pytest.mark.parametrize(
    ("q", "df", "expected"),
    [(0.975, 1, 12.706205), (0.975, 2, 4.302653), (0.975, 4, 2.776445), (0.975, 30, 2.042272),
     (0.995, 10, 3.169273), (0.9, 7, 1.414924)],
)  # fmt: skip
def test_t_quantile_matches_the_tables(q, df, expected):
    assert t_quantile(q, df) == pytest.approx(expected, abs=2e-6)
    assert t_cdf(-expected, df) == pytest.approx(1 - q, abs=1e-7)


def test_t_interval_and_bootstrap_on_noisy_data():
    mean, low, high = t_interval([0.1, 0.3, 0.2, 0.4])
    half = 3.182446 * 0.129099 / 2  # t(0.975, 3) · std / √4
    assert (mean, low, high) == pytest.approx((0.25, 0.25 - half, 0.25 + half), abs=1e-5)
    # Two seeds of per-prompt differences: the interval holds the mean of means and is narrower
    # with more prompts (the standard error shrinks as 1/√n).
    few = paired_bootstrap([[0.0, 1.0] * 5, [0.0, 0.5] * 5])
    many = paired_bootstrap([[0.0, 1.0] * 500, [0.0, 0.5] * 500])
    assert few[0] < 0.375 < few[1] and many[0] < 0.375 < many[1]
    assert many[1] - many[0] < (few[1] - few[0]) / 5


def test_a_best_value_at_the_end_of_its_searched_range_is_flagged(head):
    """The searched ranges come from each trial's own Hydra config; DPO's best lr (5e-5) lies in
    the top 5% of a log range ending at 5.2e-5, its beta (0.5) inside [0.05, 2]; InSPO's
    standard weight (0.3) inside a linear [0, 1]."""
    spaces = {
        "dpo": {"objective.beta": "tag(log, interval(0.05, 2.0))",
                "optim.lr": "tag(log, interval(1.0e-5, 5.2e-5))"},
        "inspo": {"optim.lr": "tag(log, interval(1.0e-5, 5.0e-3))",
                  "reflection.reference_context": "choice(reflective, plain)",
                  "reflection.standard_weight": "interval(0.0, 1.0)"},
    }  # fmt: skip
    for method, params in spaces.items():
        for trial in (head / "tune" / method).iterdir():
            (trial / ".hydra").mkdir()
            cfg = {"hydra": {"job": {"name": "${hydra.x}"}, "sweeper": {"params": params}}}
            (trial / ".hydra" / "hydra.yaml").write_text(json.dumps(cfg))
    tuning = build(head)["tuning"]["methods"]
    dpo, inspo = tuning["dpo/off"], tuning["dpo/inspo"]
    assert dpo["space"] == {"beta": [0.05, 2.0, True], "lr": [1e-5, 5.2e-5, True]}
    assert dpo["best_at_edge"] == {
        "lr": {"value": 5e-5, "side": "high", "range": [1e-5, 5.2e-5], "log": True}
    }
    assert inspo["space"]["standard_weight"] == [0.0, 1.0, False]
    assert inspo["best_at_edge"] == {}
    cli([str(head), "--head-to-head"])
    md = (head / "head_to_head.md").read_text()
    assert "dpo/off's best lr (5e-05) lies at the high end of its searched range" in md
    assert "dpo/inspo's best" not in md


def test_trials_the_tuning_prompts_cannot_tell_from_the_best_are_counted(head):
    """DPO's best trial (1: 0.60, interval 0.56–0.64) ties trial 2 (0.60) and is clear of trial
    0 (0.55): one trial lies inside the best's interval."""
    best = head / "tune" / "dpo" / "1" / "summary.json"
    summary = json.loads(best.read_text())
    summary["metrics"].update({"eval/win_rate_low": 0.56, "eval/win_rate_high": 0.64})
    best.write_text(json.dumps(summary))
    dpo = build(head)["tuning"]["methods"]["dpo/off"]
    best = dpo["best"]
    assert (best["low"], best["high"], dpo["within_best_interval"]) == (0.56, 0.64, [2])
    cli([str(head), "--head-to-head"])
    assert "| 1 | 0.600 (0.560–0.640) | 1 (2) |" in (head / "head_to_head.md").read_text()


def test_a_one_trial_search_still_knows_what_it_searched(tmp_path):
    """With one trial per search nothing looks varied; what the search drew comes from its
    config, so a test run with other values is not called its search's best."""
    params = {"objective.beta": "tag(log, interval(0.05, 2.0))"}
    for method, refl in (("dpo", "off"), ("inspo", "inspo")):
        trial = tmp_path / "tune" / method / "0"
        write_run(trial, refl, "tune", {"eval/win_rate": 0.6}, beta=0.3)
        (trial / ".hydra").mkdir()
        (trial / ".hydra" / "hydra.yaml").write_text(
            json.dumps({"hydra": {"sweeper": {"params": params}}})
        )
        for setting, beta in (("tuned", 0.3), ("untuned", 0.5)):
            write_run(tmp_path / setting / method / "seed0", refl, "eval",
                      {"eval/win_rate": 0.6}, scores=[1, 0, 0, 0], texts=["ba"] * 4,
                      beta=beta)  # fmt: skip
    report = build(tmp_path)
    assert report["tuning"]["methods"]["dpo/off"]["searched"] == ["beta"]
    assert report["settings"]["tuned"]["best"] == {"dpo/off": True, "dpo/inspo": True}
    assert report["settings"]["untuned"]["best"] == {"dpo/off": False, "dpo/inspo": False}


def test_failed_runs_count_with_or_without_a_summary(head):
    """A trial whose process died before writing summary.json counts against its search's
    budget, with what its overrides set; a failed test run is named where its seed is left out
    of the pairing, not dropped."""
    trial = head / "tune" / "dpo" / "3"
    (trial / ".hydra").mkdir(parents=True)
    (trial / ".hydra" / "overrides.yaml").write_text("- objective.beta=0.25\n- optim.lr=0.0003\n")
    failed = head / "tuned" / "dpo" / "seed1"
    summary = json.loads((failed / "summary.json").read_text())
    summary.update(status="failed", error="round 4 found 226 of its 1600 pairs in 32776 prompts")
    (failed / "summary.json").write_text(json.dumps(summary))
    report = build(head)
    dpo = report["tuning"]["methods"]["dpo/off"]
    assert (dpo["n_trials"], dpo["n_failed"]) == (4, 1) and not report["tuning"]["equal_trials"]
    assert dpo["trials"][3]["config"] == {"beta": 0.25, "lr": 0.0003}
    assert "no summary.json" in dpo["trials"][3]["error"]
    tuned = report["settings"]["tuned"]["comparison"]
    assert tuned["seeds"] == [0, 2]
    why = "seed 1: the baseline's run failed (round 4 found 226"
    assert any(why in x for x in tuned["left_out"])
    cli([str(head), "--head-to-head"])
    md = (head / "head_to_head.md").read_text()
    assert "| 3 | failed: no summary.json" in md and "the baseline's run failed" in md
