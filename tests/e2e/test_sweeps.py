"""Sweep presets (conf/experiment): what they sweep, and a reduced multirun end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import FAST, REPO

CONF = REPO / "conf"


def raw(cfg, key: str):
    return OmegaConf.to_container(cfg, resolve=False)[key]


def sweep_params(experiment: str) -> tuple[dict[str, list[str]], Any]:
    """The experiment's ``hydra.sweeper.params``, parsed as the basic sweeper does."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return {o.get_key_element(): list(o.sweep_string_iterator()) for o in parsed}, cfg


def sweep_group(experiment: str) -> str:
    """The wandb group a preset's multirun jobs share (all of them: it names the sweep folder)."""
    from inspo.config import compose_config

    cfg = compose_config([f"experiment={experiment}", "hydra.mode=MULTIRUN",
                          "hydra.sweep.dir=/runs/SWEEP"], "/runs/SWEEP/0")  # fmt: skip
    return cfg.wandb_group


def test_ablate_scalarization_sweeps_every_psi_for_dpo_both_forms():
    from inspo.objectives import SCALARIZATIONS

    params, cfg = sweep_params("ablate_scalarization")
    assert params == {"objective.scalarization": list(SCALARIZATIONS),
                      "reflection": ["off", "inspo"]}  # fmt: skip
    assert cfg.objective._target_ == "inspo.objectives.DPO"
    assert sweep_group("ablate_scalarization") == "ablate_scalarization_SWEEP"


def test_ablate_reference_sweeps_reference_context_and_reflection():
    params, _ = sweep_params("ablate_reference")
    assert params["reference"] == ["policy_init", "precomputed", "sync"]
    assert params["++reflection.reference_context"] == ["reflective", "plain"]
    assert params["reflection"] == ["off", "inspo"]
    assert sweep_group("ablate_reference") == "ablate_reference_SWEEP"


def test_objectives_sweep_covers_every_objective_config_with_auto_reference():
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from inspo.objectives import RewardObjective

    params, cfg = sweep_params("objectives")
    policy_objectives = {  # a reward model's objective trains no policy: not in the sweep
        p.stem
        for p in (CONF / "objective").glob("*.yaml")
        if not issubclass(get_class(OmegaConf.load(p)._target_), RewardObjective)
    }
    assert "bradley_terry" not in policy_objectives and "dpo" in policy_objectives
    assert set(params["objective"]) == policy_objectives
    assert params["reflection"] == ["off", "inspo"]
    assert cfg.reference.kind == "auto"
    assert sweep_group("objectives") == "objectives_SWEEP"


@pytest.mark.slow
@pytest.mark.subprocess
def test_reduced_scalarization_sweep_end_to_end(tmp_path):
    """Hydra multirun of the preset with 2 Ψ: 4 runs, each with summary.json and its choices."""
    sweep_dir = tmp_path / "multirun"
    cmd = [
        sys.executable, "-m", "inspo.cli.train", "-m", "experiment=ablate_scalarization",
        "objective.scalarization=logistic,hinge", *FAST, "trainer.max_steps=2",
        "save_policy=false", f"hydra.sweep.dir={sweep_dir}", f"paths.cache_dir={tmp_path}/c",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in runs] == ["0", "1", "2", "3"]
    seen, groups = set(), set()
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        c = summary["choices"]
        assert summary["steps"] == 2
        assert (c["objective"], c["reference"], c["experiment"]) == (
            "DPO",
            "policy_init",
            "ablate_scalarization",
        )
        seen.add((c["scalarization"], c["reflection"]))
        groups.add(c["wandb_group"])
        assert f"psi:{c['scalarization']}" in c["tags"]
        assert f"reflection:{c['reflection']}" in c["tags"]
        assert "objective:DPO" in c["tags"] and "reference:policy_init" in c["tags"]
        assert (run / ".hydra" / "config.yaml").exists()
    assert seen == {(p, r) for p in ("logistic", "hinge") for r in ("off", "inspo")}
    assert groups == {"ablate_scalarization_multirun"}  # one wandb group: the sweep folder's name


def test_an_ad_hoc_multirun_groups_its_wandb_runs_and_names_each_by_its_choices(tmp_path):
    """`inspo-train -m objective=dpo reflection=off,inspo logger=wandb` with no preset: the jobs
    share the group named after the sweep folder, and each run's name says its choices."""
    from hydra.utils import instantiate

    from inspo.config import build_objective, compose_config, name_run, resolve_reference
    from inspo.settings import load_settings

    sweep = ["hydra.mode=MULTIRUN", f"hydra.sweep.dir={tmp_path}/2026-11-23_10-00-00"]
    cfg = compose_config(["logger=wandb", "objective=ipo", "reflection=inspo", "seed=3", *sweep],
                         tmp_path / "0")  # fmt: skip
    assert cfg.wandb_group == "train_2026-11-23_10-00-00"  # {task_name}_{sweep folder}
    settings = load_settings(cfg)
    settings.reference = resolve_reference(settings.reference, build_objective(settings.objective))
    assert name_run(settings, cfg).run_name == "ipo-squared-inspo-policy_init-seed3"
    assert cfg.run_name == "ipo-squared-inspo-policy_init-seed3"  # the logger interpolates it
    logger = instantiate(cfg.logger)  # lazily initialised: no wandb run is started here
    assert logger._wandb_init["group"] == "train_2026-11-23_10-00-00"
    assert logger._wandb_init["name"] == "ipo-squared-inspo-policy_init-seed3"
    # A single run belongs to no group unless it names one.
    single = compose_config(["logger=wandb"], tmp_path / "single")
    assert single.wandb_group is None
