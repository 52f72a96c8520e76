"""The tuned head-to-head's presets: the same search budget for every method, trials scored on
the tuning prompts and test runs on the test prompts, and the searches and the whole script run
(tiny, with the FAST overrides)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import FAST, REPO
from inspo.config import compose_config

PAIRS = [("tune_dpo", "tune_inspo", "train"),
         ("tune_iterative_dpo", "tune_iterative_inspo", "iterate")]  # fmt: skip
TINY = [*FAST, "++data.source.n_tune=8", "trainer.max_steps=2", "eval.n_prompts=8",
        "eval.max_new_tokens=8"]  # fmt: skip


def compose(experiment: str, name: str, tmp_path: Path, *overrides: str):
    return compose_config([f"experiment={experiment}", *overrides], tmp_path, name)


@pytest.mark.parametrize(("dpo", "inspo", "name"), PAIRS)
def test_every_method_gets_the_same_search_budget(dpo, inspo, name, tmp_path):
    a, b = (compose(e, name, tmp_path).hydra.sweeper for e in (dpo, inspo))
    assert a._target_.endswith("OptunaSweeper") and a.direction == "maximize"
    for key in ("n_trials", "n_jobs", "max_failure_rate", "sampler"):
        assert a[key] == b[key], key  # the same number of trials, drawn the same way
    assert a.sampler.seed is not None and a.n_jobs == 1
    # InSPO's space is DPO's with its own knobs added; the plain reference context is a candidate.
    assert {k: v for k, v in b.params.items() if k in a.params} == a.params
    assert set(b.params) - set(a.params) == {
        "reflection.reference_context",
        "reflection.standard_weight",
    }
    assert "plain" in b.params["reflection.reference_context"]
    assert set(a.params) >= {"objective.beta", "optim.lr"}


@pytest.mark.parametrize(
    ("tune", "setting", "name"),
    [("tune_dpo", "fair", "train"), ("tune_inspo", "fair", "train"),
     ("tune_iterative_dpo", "fair_iterative", "iterate")],
)  # fmt: skip
def test_trials_score_the_tuning_prompts_and_test_runs_the_test_prompts(
    tune, setting, name, tmp_path
):
    trial, test = compose(tune, name, tmp_path), compose(setting, name, tmp_path)
    assert (trial.data.eval_split, trial.optimized_metric) == ("tune", "eval/win_rate")
    assert test.data.eval_split == "eval"
    # Everything but the prompts it is scored on (and the method) is the test runs' setting.
    drop = ("data", "optimized_metric", "task_name", "reflection", "wandb_group", "hydra", "sweep")
    same = {k: v for k, v in OmegaConf.to_container(trial).items() if k not in drop}
    test_same = {k: v for k, v in OmegaConf.to_container(test).items() if k not in drop}
    assert same == {**test_same, "eval": {**test_same["eval"], "n_prompts": 512}}
    data = OmegaConf.to_container(trial.data)
    assert data.pop("eval_split") == "tune" and data["source"].pop("n_tune") == 512
    assert {**data, "eval_split": "eval"} == test.data
    # The untuned comparison: the demo's DPO hyperparameters.
    assert (test.objective.beta, test.optim.lr) == (0.5, 5e-5)


@pytest.mark.subprocess
def test_a_search_runs_its_trials_on_the_tuning_prompts(tmp_path):
    """`inspo-train -m experiment=tune_inspo` (2 tiny trials): each trial a different InSPO
    configuration scored on the tuning prompts, and Optuna's pick is the best of them."""
    sweep = tmp_path / "tune"
    cmd = [sys.executable, "-m", "inspo.cli.train", "-m", "experiment=tune_inspo", *TINY,
           "hydra.sweeper.n_trials=2", "save_policy=false", f"hydra.sweep.dir={sweep}",
           f"paths.cache_dir={tmp_path}/c"]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in range(2)]
    assert not (sweep / "2").exists()
    for t in trials:
        c, n = t["choices"], t["metrics"]["eval/n_prompts"]
        assert (c["eval_split"], c["reflection"], n) == ("tune", "inspo", 8)
    keys = ("beta", "lr", "reference_context", "standard_weight")
    configs = [tuple(t["choices"][k] for k in keys) for t in trials]
    assert configs[0] != configs[1]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == max(t["metrics"]["eval/win_rate"] for t in trials)


@pytest.mark.subprocess
def test_an_iterative_search_scores_each_trial_after_its_last_round(tmp_path):
    """`inspo-iterate -m experiment=tune_iterative_dpo` (one tiny trial of 2 one-step rounds,
    validated once more after the last step): the trial returns its last round's win rate on
    the tuning prompts, so Optuna completes it (it counted as failed when the validation
    cleared the logged evaluation: the search then ended with no completed trial)."""
    sweep = tmp_path / "tune"
    # A random model's samples rarely end or differ in gold reward: a judge that tells them apart.
    loop = ["iterate.rounds=2", "iterate.steps_per_round=1", "data.batch_size=4",
            "generation.max_new_tokens=6", "judge=python", "judge.function=fake_judges.distinct",
            "trainer.val_check_interval=50"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "online")}
    cmd = [sys.executable, "-m", "inspo.cli.iterate", "-m", "experiment=tune_iterative_dpo",
           *TINY, *loop, "hydra.sweeper.n_trials=1", "save_policy=false",
           f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path}/c"]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    trial = json.loads((sweep / "0" / "summary.json").read_text())
    assert trial["choices"]["eval_split"] == "tune" and len(trial["rounds"]) == 2
    assert trial["metrics"]["eval/win_rate"] == trial["rounds"][-1]["eval/win_rate"]
    assert trial["metrics"]["eval/n_prompts"] == 8
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == trial["metrics"]["eval/win_rate"]


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.timeout(3600)  # 15 tiny runs (about 8 min on 2 idle cores), twice the script
def test_fair_script_end_to_end(tmp_path):
    """benchmarks/fair.sh, every stage, tiny: SFT per seed, two searches of 2 trials, the best
    of each and the untuned pair rerun on 2 seeds, and the head-to-head report."""
    out = tmp_path / "fair"
    env = {**os.environ, "OUT": str(out), "SEEDS": "0 1", "N_TRIALS": "2",
           "PATH": f"{Path(sys.executable).parent}:" + os.environ["PATH"]}  # fmt: skip
    fast = [a for a in TINY if a != "logger=csv"]  # fair.sh sets the logger itself
    args = [*fast, "trainer.max_steps=2", f"paths.cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(["bash", "benchmarks/fair.sh", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + (out / "fair.log").read_text()[-2000:]
    report = json.loads((out / "head_to_head.json").read_text())
    assert report["tuning"]["counts"] == {"dpo/off": 2, "dpo/inspo": 2}
    for setting in ("tuned", "untuned"):
        assert report["settings"][setting]["comparison"]["seeds"] == [0, 1]
    assert report["settings"]["tuned"]["best"] == {"dpo/off": True, "dpo/inspo": True}
    untuned = report["settings"]["untuned"]["configs"]["dpo/inspo"]
    assert [(c["beta"], c["lr"], c["reference_context"]) for c in untuned] == [
        (0.5, 5e-5, "reflective")
    ]
    log = (out / "fair.log").read_text()
    assert "commit: " in log and "CPU time of this invocation's runs" in log
    # A second invocation finds everything done and reruns nothing.
    again = subprocess.run(["bash", "benchmarks/fair.sh", *args], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0 and " done" not in again.stdout


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.timeout(3600)
def test_fair_script_in_the_loop(tmp_path):
    """LOOP=iterative benchmarks/fair.sh, tiny, one seed and one trial per search, with the
    loop's own overrides on the command line (the SFT start, an inspo-train run, must not take
    them): every stage runs and the report pairs the seed in both settings."""
    out = tmp_path / "fair"
    env = {**os.environ, "OUT": str(out), "SEEDS": "0", "N_TRIALS": "1", "LOOP": "iterative",
           "PATH": f"{Path(sys.executable).parent}:" + os.environ["PATH"],
           "PYTHONPATH": str(REPO / "tests" / "online")}  # fmt: skip
    fast = [a for a in TINY if a not in ("logger=csv", "trainer.max_steps=2")]
    loop = [
        "iterate.rounds=2",
        "iterate.steps_per_round=1",
        "data.batch_size=4",
        "generation.max_new_tokens=6",
        "judge=python",
        "judge.function=fake_judges.distinct",
    ]
    args = [*fast, *loop, f"paths.cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(["bash", "benchmarks/fair.sh", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + (out / "fair.log").read_text()[-2000:]
    report = json.loads((out / "head_to_head.json").read_text())
    assert report["tuning"]["counts"] == {"dpo/off": 1, "dpo/inspo": 1}
    assert "iterate_reference" in report["tuning"]["methods"]["dpo/inspo"]["searched"]
    for setting in ("tuned", "untuned"):
        assert report["settings"][setting]["comparison"]["seeds"] == [0]
    sft = json.loads((out / "sft" / "seed0" / "summary.json").read_text())
    assert sft["choices"]["objective_config"] == "sft"
