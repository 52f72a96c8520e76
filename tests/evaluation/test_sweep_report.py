"""inspo-report on a hand-made sweep folder with known numbers, and (slow) on a real sweep."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, REPO
from inspo.cli.report import cli
from inspo.evaluation.sweep_report import symmetric_kl
from inspo.models.load import byte_tokenizer, load_policy, tiny_llama

# group dpo/off: 3 runs (win rates 0.2, 0.4, 0.9); group dpo/inspo: 2 runs (0.6, 0.6).
RUNS = {
    "0": ("off", "logistic", "policy_init", 0.2, 10.0, 0),
    "1": ("off", "hinge", "policy_init", 0.4, 12.0, 0),
    "2": ("off", "logistic", "sync", 0.9, 20.0, 1),
    "3": ("inspo", "logistic", "policy_init", 0.6, 8.0, 5),
    "4": ("inspo", "hinge", "sync", 0.6, 8.0, 5),
}


def fake_sweep(root):
    tok = byte_tokenizer()
    for name, (refl, psi, ref, wr, length, seed) in RUNS.items():
        d = root / name
        (d / "eval").mkdir(parents=True)
        choices = {"objective": "DPO", "objective_config": "dpo", "reflection": refl,
                   "scalarization": psi, "reference": ref, "seed": 0}  # fmt: skip
        metrics = {"eval/win_rate": wr, "eval/length/policy": length, "eval/kl": wr / 10,
                   "eval/score/policy": wr - 0.5, "eval/seconds": 3.0}  # fmt: skip
        (d / "summary.json").write_text(json.dumps({"choices": choices, "metrics": metrics}))
        gens = [
            {"instruction": "Word with b, k, t: ", "output": "bakoti", "generator": "ref"},
            {"instruction": "Word with d, f, g: ", "output": "", "generator": "ref"},
        ]
        (d / "eval" / "reference_generations.json").write_text(json.dumps(gens))
        model = tiny_llama(tokenizer=tok, hidden_size=32, num_layers=2, num_heads=2, seed=seed)
        model.save_pretrained(d / "policy")
        tok.save_pretrained(d / "policy")


@torch.no_grad()
def hand_symmetric_kl(model_a, model_b, tok, inputs):
    """KL(a‖b) + KL(b‖a) of the next-token distributions at each response position of
    ``inputs`` (the prompt's last position for an empty response), averaged over positions;
    written with F.kl_div, apart from inspo.evaluation.sweep_report."""
    values = []
    for prompt, response in inputs:
        x = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
        y = tok(response, add_special_tokens=False)["input_ids"] if response else []
        ids = torch.tensor([x + y])
        la, lb = (m(input_ids=ids).logits[0].log_softmax(-1) for m in (model_a, model_b))
        for t in range(len(x) - 1, len(x) - 1 + max(len(y), 1)):
            kl_ab = F.kl_div(lb[t], la[t], log_target=True, reduction="sum")  # KL(a‖b)
            kl_ba = F.kl_div(la[t], lb[t], log_target=True, reduction="sum")
            values.append(float(kl_ab + kl_ba))
    return sum(values) / len(values)


def test_report_figures(tmp_path):
    fake_sweep(tmp_path)
    report = cli([str(tmp_path), "--out", str(tmp_path / "out")])
    groups = report["groups"]
    assert set(groups) == {"dpo/off", "dpo/inspo"}
    off, ins = groups["dpo/off"], groups["dpo/inspo"]
    assert off["runs"] == ["0", "1", "2"] and ins["runs"] == ["3", "4"]
    wr = off["metrics"]["eval/win_rate"]
    assert wr["mean"] == pytest.approx(0.5)
    assert wr["spread"] == pytest.approx(0.7)
    assert wr["std"] == pytest.approx(math.sqrt((0.09 + 0.01 + 0.16) / 2))
    assert wr["n"] == 3
    length = off["metrics"]["eval/length/policy"]
    assert (length["mean"], length["spread"]) == (pytest.approx(14.0), pytest.approx(10.0))
    assert ins["metrics"]["eval/win_rate"] == {"mean": 0.6, "spread": 0.0, "std": 0.0, "n": 2}
    assert ins["metrics"]["eval/kl"]["mean"] == pytest.approx(0.06)
    assert "eval/seconds" not in report["metrics"]  # bookkeeping, not an evaluation metric
    assert off["varying"] == {"scalarization": ["hinge", "logistic"],
                              "reference": ["policy_init", "sync"]}  # fmt: skip
    # Identical policies (same seed): divergence exactly 0; different ones: > 0.
    assert ins["divergence"] == 0.0 and ins["divergence_pairs"] == 1
    assert off["divergence"] > 0 and off["divergence_pairs"] == 3
    # dpo/off holds seeds 0, 0, 1: pairs (0, 0), (0, 1), (0, 1), so the mean is ⅔ of the
    # symmetric KL between seed 0 and seed 1 on the reference's samples.
    tok = byte_tokenizer()
    seed0, seed1 = (tiny_llama(tokenizer=tok, hidden_size=32, num_layers=2, num_heads=2, seed=s)
                    for s in (0, 1))  # fmt: skip
    inputs = [("Word with b, k, t: ", "bakoti"), ("Word with d, f, g: ", "")]
    d01 = hand_symmetric_kl(seed0, seed1, tok, inputs)
    assert off["divergence"] == pytest.approx(2 / 3 * d01, rel=1e-5)
    out = tmp_path / "out"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["groups"]["dpo/off"]["metrics"]["eval/win_rate"]["spread"] == pytest.approx(0.7)
    md = (out / "report.md").read_text()
    assert "| dpo/off | 0.5000 | 0.7000 | 0.3606 | 3 |" in md
    assert "| dpo/inspo | 0.6000 | 0.0000 | 0.0000 | 2 |" in md
    # The summary: one row per group, mean (spread) of each headline metric present.
    assert "| group | n | win rate | gold score | length | KL | divergence |" in md
    assert "| dpo/off | 3 | 0.500 (0.700) | 0.000 (0.700) | 14.000 (10.000) | 0.050 (0.070) |" in md
    assert "| dpo/inspo | 2 | 0.600 (0.000) |" in md
    for png in ("frontier.png", "winrate_length.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
        assert f"]({png})" in md
    assert "eval.generate=true" not in md  # nothing is missing


def test_plots_only_with_their_data(tmp_path):
    """A sweep without the evaluation stage has nothing to plot: no empty frames, and the
    report says which setting produces them; a sweep with only some metrics gets those plots."""
    runs = {"a": {}, "b": {"eval/win_rate": 0.6, "eval/length/policy": 9.0}}
    for name, extra in runs.items():
        (tmp_path / name).mkdir()
        choices = {"objective": "DPO", "objective_config": "dpo", "reflection": "off"}
        metrics = {"val/plain/rewards/accuracies": 0.7, **extra}
        (tmp_path / name / "summary.json").write_text(
            json.dumps({"choices": choices, "metrics": metrics})
        )
    out = tmp_path / "no_eval"
    cli([str(tmp_path / "a"), "--no-divergence", "--out", str(out)])
    md = (out / "report.md").read_text()
    assert not list(out.glob("*.png"))
    assert "](frontier.png)" not in md and "](winrate_length.png)" not in md
    assert md.count("eval.generate=true") == 2
    # Win rate and length but no KL: the win-rate plot only.
    out = tmp_path / "partial"
    cli([str(tmp_path), "--no-divergence", "--out", str(out)])
    md = (out / "report.md").read_text()
    assert sorted(p.name for p in out.glob("*.png")) == ["winrate_length.png"]
    assert "](winrate_length.png)" in md and "](frontier.png)" not in md
    assert md.count("eval.generate=true") == 1 and "`eval/kl`" in md


def test_symmetric_kl_hand_case():
    import torch

    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.25, 0.75]]).log()
    want = (
        0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75) + 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    )
    assert symmetric_kl(p, q) == pytest.approx(want)
    assert symmetric_kl(p, p) == 0.0


def test_group_by_extra_choice(tmp_path):
    fake_sweep(tmp_path)
    report = cli([str(tmp_path), "--group-by", "reference", "--no-divergence",
                   "--out", str(tmp_path / "o")])  # fmt: skip
    assert set(report["groups"]) == {
        "dpo/off/reference=policy_init", "dpo/off/reference=sync",
        "dpo/inspo/reference=policy_init", "dpo/inspo/reference=sync",
    }  # fmt: skip
    assert report["groups"]["dpo/off/reference=policy_init"]["metrics"]["eval/win_rate"][
        "mean"
    ] == pytest.approx(0.3)


@pytest.mark.slow
@pytest.mark.subprocess
def test_reduced_real_sweep_and_report(tmp_path):
    """2 Ψ × 2 reflections, a few steps each, with the eval stage on, then the report."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "inspo.cli.train", "-m", *FAST, "trainer.max_steps=3",
           "objective.scalarization=logistic,hinge", "reflection=off,inspo",
           "eval.generate=true", "eval.n_prompts=8", "eval.max_new_tokens=8",
           "eval.progress=false", f"hydra.sweep.dir={sweep}",
           f"paths.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, timeout=900)
    report = cli([str(sweep)])
    assert set(report["groups"]) == {"dpo/off", "dpo/inspo"}
    gens = json.loads(next(sweep.rglob("reference_generations.json")).read_text())
    inputs = [(g["instruction"], g["output"]) for g in gens]
    tok = byte_tokenizer()
    for g in report["groups"].values():
        assert len(g["runs"]) == 2
        assert g["metrics"]["eval/win_rate"]["n"] == 2
        assert g["varying"] == {"scalarization": ["hinge", "logistic"]}
        # Two different Ψ moved the same start differently: their divergence, by hand.
        a, b = (load_policy(str(sweep / run / "policy")) for run in g["runs"])
        want = hand_symmetric_kl(a, b, tok, inputs)
        assert want > 0 and g["divergence_pairs"] == 1
        assert g["divergence"] == pytest.approx(want, rel=1e-4)
    assert (sweep / "report.md").exists() and (sweep / "frontier.png").exists()


@pytest.mark.slow
@pytest.mark.subprocess
def test_research_script_end_to_end(tmp_path):
    """benchmarks/research.sh, every stage, on a cut-down grid: both SFT starts, the sweep
    (one Ψ), the remedies with the seed-0 baselines copied from the sweep, both reports."""
    out = tmp_path / "research"
    env = {**os.environ, "OUT": str(out), "SEEDS": "0",
           "SWEEP_ARGS": "objective.scalarization=logistic",  # the sweep's runs only
           "PATH": f"{Path(sys.executable).parent}:" + os.environ["PATH"]}  # fmt: skip
    fast = [a for a in FAST if a != "logger=csv"]  # research.sh sets the logger itself
    args = [*fast, "trainer.max_steps=2", "eval.n_prompts=8", "eval.max_new_tokens=8",
            f"paths.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    done = subprocess.run(["bash", "benchmarks/research.sh", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (out / "sft/policy").is_dir() and (out / "sft_reflective/policy").is_dir()
    sweep = json.loads((out / "sweep/report.json").read_text())
    assert set(sweep["groups"]) == {"dpo/off", "dpo/inspo", "ipo/off", "ipo/inspo"}
    remedies = json.loads((out / "remedies/report.json").read_text())
    assert len(remedies["runs"]) == 6  # 4 remedies + InSPO-DPO and DPO baselines
    assert done.stdout.count("copied from") == 2  # the baselines were not rerun
    standard = json.loads((out / "remedies/standard_weight/seed0/summary.json").read_text())
    assert standard["choices"]["standard_weight"] == 0.5
    sft_fraction = json.loads((out / "remedies/sft_fraction/seed0/summary.json").read_text())
    assert sft_fraction["choices"]["model"].endswith("sft_reflective/policy")


def test_per_round_curves_of_iterative_runs(tmp_path):
    """A sweep of iterative runs: per group, the mean and std of each series after every round
    (a run with fewer rounds counts where it has them), and rounds.png."""
    series = {"a": [0.5, 0.7], "b": [0.6, 0.9], "c": [0.4]}
    for name, rates in series.items():
        d = tmp_path / name
        d.mkdir()
        choices = {"objective": "DPO", "reflection": "off" if name != "c" else "inspo",
                   "iterate_reference": "initial"}  # fmt: skip
        rounds = [{"round": float(k), "eval/win_rate": w, "objective/scores": 2 * w}
                  for k, w in enumerate(rates)]  # fmt: skip
        summary = {"choices": choices, "metrics": {"eval/win_rate": rates[-1]}, "rounds": rounds}
        (d / "summary.json").write_text(json.dumps(summary))
    report = cli([str(tmp_path), "--no-divergence"])
    off = report["groups"]["DPO/off"]["rounds"]
    assert [s["mean"] for s in off["eval/win_rate"]] == pytest.approx([0.55, 0.8])
    assert off["eval/win_rate"][1]["std"] == pytest.approx(
        math.sqrt(((0.7 - 0.8) ** 2 + (0.9 - 0.8) ** 2) / 1)
    )
    assert [s["mean"] for s in off["objective/scores"]] == pytest.approx([1.1, 1.6])
    assert [s["n"] for s in report["groups"]["DPO/inspo"]["rounds"]["eval/win_rate"]] == [1]
    md = (tmp_path / "report.md").read_text()
    assert "## Per round" in md and "| 2 | 0.800 ± 0.141 |" in md
    assert (tmp_path / "rounds.png").exists()
