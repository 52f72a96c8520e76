"""Every config option composes; mistakes fail at composition, naming the valid choices."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import inspo.objectives
from inspo.config import ConfigError, build_objective, compose_config, config_dir

CONF = config_dir()
GROUPS = ["objective", "reflection", "reference", "model", "data", "hardware", "logger"]
ITERATE_GROUPS = ["generation", "judge", "pairing"]  # inspo-iterate's own
# Options that need a value the user must supply (marked ??? in the file).
REQUIRED = {
    ("model", "hf"): ["model.name_or_path=gpt2"],
    ("reference", "model"): ["reference.name_or_path=gpt2"],
    ("data", "jsonl"): ["data.source.path=rows.jsonl"],
    ("judge", "reward_model"): ["judge.name_or_path=rm"],
    ("judge", "llm"): ["judge.backend.name_or_path=m"],
    ("judge", "python"): ["judge.function=mod.fn"],
    ("judge", "pairwise"): ["judge.function=mod.fn"],
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_config_dir_is_the_repository_conf():
    assert Path(__file__).resolve().parents[1] / "conf" == CONF
    assert {"train.yaml"} <= {p.name for p in CONF.iterdir()}


def stated(path: Path) -> dict:
    """The values an option file sets itself: no defaults list, no Hydra settings, and no
    interpolations or ??? (those resolve elsewhere)."""
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    data.pop("defaults", None)
    data.pop("hydra", None)

    def concrete(v):
        if isinstance(v, dict):
            return {k: concrete(x) for k, x in v.items() if concrete(x) is not _SKIP}
        if isinstance(v, str) and ("${" in v or v == "???"):
            return _SKIP
        return v

    return concrete(data)


_SKIP = object()


def assert_applied(expected: dict, composed: dict, where: str) -> None:
    for key, value in expected.items():
        assert key in composed, f"{where}: {key} missing"
        if isinstance(value, dict) and isinstance(composed[key], dict):
            assert_applied(value, composed[key], f"{where}.{key}")
        else:
            assert composed[key] == value, f"{where}.{key}: {composed[key]!r} != {value!r}"


@pytest.mark.parametrize(
    ("group", "option"),
    [(g, o) for g in GROUPS + ITERATE_GROUPS for o in options(g)],
    ids=lambda x: str(x),
)
def test_every_option_composes(tmp_path, group, option):
    """Choosing an option puts exactly what its file states into the composed config."""
    name = "iterate" if group in ITERATE_GROUPS else "train"
    overrides = [f"{group}={option}", *REQUIRED.get((group, option), [])]
    cfg = compose_config(overrides, tmp_path, name=name)
    composed = OmegaConf.to_container(cfg, resolve=False)
    expected = stated(CONF / group / f"{option}.yaml")
    if group == "hardware":  # a _global_ package: it sets trainer.* and strategy
        assert_applied(expected, composed, group)
        assert "accelerator" in cfg.trainer
        return
    if not expected:  # an option that is the settings' defaults (inspo.settings)
        default = OmegaConf.structured(OmegaConf.get_type(cfg[group]))
        assert composed[group] == OmegaConf.to_container(default), f"{group}/{option}.yaml"
    assert_applied(expected, composed[group], group)


@pytest.mark.parametrize("objective", options("objective"))
def test_every_objective_config_instantiates(tmp_path, objective):
    cfg = compose_config([f"objective={objective}"], tmp_path)
    obj = build_objective(cfg.objective)
    assert type(obj).__module__.startswith("inspo.objectives.")
    assert getattr(inspo.objectives, type(obj).__name__) is type(obj)  # the _target_ path


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(tmp_path, experiment):
    """An experiment's own settings win over the groups it is composed with."""
    expected = stated(CONF / "experiment" / f"{experiment}.yaml")
    name = "iterate" if "iterate" in expected else "train"  # the app the experiment is for
    cfg = compose_config([f"experiment={experiment}"], tmp_path, name=name)
    assert_applied(expected, OmegaConf.to_container(cfg, resolve=False), experiment)


def test_unknown_option_names_the_valid_choices(tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["objective=dpoo"], tmp_path)
    msg = str(err.value)
    assert "objective/dpoo" in msg and "dpo" in msg and "ipo" in msg


def test_an_iterate_experiment_is_refused_by_inspo_train(tmp_path):
    from inspo.training.run import run

    with pytest.raises(ConfigError, match="inspo-iterate"):
        run(compose_config(["experiment=online"], tmp_path))


def test_misspelt_key_fails(tmp_path):
    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        compose_config(["trainer.max_stepz=3"], tmp_path)
    with pytest.raises(ConfigCompositionException, match="betaa"):
        compose_config(["objective.betaa=0.2"], tmp_path)


def test_misspelt_objective_parameter_fails_before_any_model(tmp_path):
    cfg = compose_config(["+objective.betaa=0.2"], tmp_path)
    with pytest.raises(ConfigError, match="DPO takes no parameter 'betaa'; valid: beta, scal"):
        build_objective(cfg.objective)


@pytest.mark.subprocess
def test_the_wheel_ships_every_config(tmp_path):
    """A non-editable install finds its configs at inspo/conf (see inspo.config)."""
    import subprocess
    import sys
    import zipfile

    repo = CONF.parent
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(repo), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("inspo-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".yaml")}
    expected = {"inspo/conf/" + str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml")}
    assert expected and shipped == expected
    # Every module of the package, subpackages included (a missing __init__ drops a room).
    modules = {str(p.relative_to(repo / "src")) for p in (repo / "src" / "inspo").rglob("*.py")}
    assert "inspo/config.py" in modules and modules <= set(zipfile.ZipFile(wheel).namelist())
