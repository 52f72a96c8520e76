"""Every setting is typed, declared once and checked where it is declared: a bad value fails
before any model is built, in one line that names it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST, run_cli
from inspo.config import ConfigError, build_objective, compose_config, config_dir
from inspo.jsonio import json_line, write_json
from inspo.names import Reflection, View
from inspo.settings import (
    DataConfig,
    EvalConfig,
    IterateConfig,
    ModelConfig,
    ReferenceConfig,
    ReflectionConfig,
    RunConfig,
    SettingError,
    TrainerConfig,
    load_settings,
)

CONF = config_dir()


# --------------------------------------------------------------------------- entry points
@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("app", "overrides", "message"),
    [
        ("train", ["objective.beta=-1"], "objective.beta: must be > 0, got -1"),
        ("train", ["data.batch_size=0"], "data.batch_size: must be at least 1, got 0"),
        (
            "train",
            ["model=hf", "model.name_or_path=/missing/folder"],
            "model.name_or_path: no model at /missing/folder",
        ),
        (
            "train",
            ["data=jsonl", "data.source.path=/missing/file.jsonl"],
            "data file not found: /missing/file.jsonl",
        ),
        ("iterate", ["generation.temperature=-1"], "generation.temperature: must be at least 0"),
    ],
    ids=["beta", "batch_size", "model_path", "data_file", "generation"],
)
def test_a_bad_setting_fails_in_one_line_before_any_model(tmp_path, app, overrides, message):
    proc, built = run_cli(tmp_path, f"inspo.cli.{app}", *overrides, f"hydra.run.dir={tmp_path}/r")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"inspo-{app}: error: {message}"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert built == []  # nothing was built: no policy, no reference


def test_inspo_eval_refuses_a_bad_option_in_one_line(tmp_path, capsys):
    from inspo.cli.eval import cli

    cfg = compose_config(FAST, tmp_path / "run")
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.save(job, tmp_path / "run" / ".hydra" / "config.yaml")
    with pytest.raises(SystemExit) as exit_:
        cli([str(tmp_path / "run"), "--top-k", "-1"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "inspo-eval: error: top_k: must be at least 0, got -1\n"


# --------------------------------------------------------------------------- checks
def settings_error(*overrides: str, tmp_path: Path, name: str = "train") -> str:
    """The one-line error of the settings of a composed config (objective included)."""
    with pytest.raises(ConfigError) as err:
        settings = load_settings(compose_config(list(overrides), tmp_path, name=name))
        build_objective(settings.objective)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["objective=cdpo", "objective.label_smoothing=0.5"], "objective.label_smoothing: must"),
        (["objective=exo_pair", "objective.label_smoothing=0"], "objective.label_smoothing: EXO"),
        (["objective=discopop", "objective.tau=0"], "objective.tau: must be > 0"),
        (["objective=slic", "objective.nll_weight=-1"], "objective.nll_weight: must be at least"),
        (["objective=rdpo", "objective.alpha=-0.1"], "objective.alpha: must be at least 0"),
        (["objective=orpo", "objective.beta=-1"], "objective.beta: must be at least 0"),
        (["objective=ipo", "objective.scalarization=logit"], "objective.scalarization: unknown"),
        (["objective=nca_pair", "objective.scalarization=hinge"], "objective.scalarization: NCA"),
        (
            ["objective=rpo", "objective.terms.0.objective.beta=0"],
            "objective.terms.0.objective.beta",
        ),
        (["optim.lr=0"], "optim.lr: must be > 0, got 0.0"),
        (["optim.warmup_steps=-1"], "optim.warmup_steps: must be at least 0"),
        (["optim.betas=[0.9,1.0]"], "optim.betas: must lie in [0.0, 1.0), got 1.0"),
        (["trainer.max_steps=-2"], "trainer.max_steps: must be at least 0, or -1, got -2"),
        (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches: must be"),
        (["trainer.limit_val_batches=-1"], "trainer.limit_val_batches: must be at least 0"),
        (["trainer.limit_val_batches=1.5"], "trainer.limit_val_batches: a fraction is at most"),
        (["checkpoint.every_n_train_steps=0"], "checkpoint.every_n_train_steps: must be at"),
        (["data.max_length=63", "data.max_prompt_length=64"], "data.max_length: must be at least"),
        (["data.max_tokens_per_batch=0"], "data.max_tokens_per_batch: must be at least 1"),
        (["model.tiny.num_heads=3"], "model.tiny.hidden_size: must be a multiple of num_heads"),
        (["model.lora={r: 0}"], "model.lora.r: must be at least 1, got 0"),
        (["model.lora={rank: 8}"], "model.lora: unknown key(s) ['rank']; valid: r, alpha,"),
        (["model=hf"], "model.name_or_path: needs a Hub id or a local checkpoint"),
        (["reference=model"], "reference.name_or_path: required by reference=model"),
        (["reference=sync", "reference.sync_alpha=0"], "reference.sync_alpha: must lie in (0.0,"),
        (["reflection=inspo", "reflection.template=plain"], "reflection.template: unknown"),
        (["reflection.standard_weight=-1"], "reflection.standard_weight: must be at least 0"),
        (["eval.top_p=0"], "eval.top_p: must lie in (0.0, 1.0], got 0.0"),
        (["eval.reference=./no/such/model"], "eval.reference: no model at ./no/such/model"),
    ],
)
def test_each_setting_is_checked_where_it_is_declared(tmp_path, overrides, message):
    assert settings_error(*overrides, tmp_path=tmp_path).startswith(message)


def test_iterate_settings_are_checked(tmp_path):
    message = settings_error("iterate.samples_per_prompt=1", tmp_path=tmp_path, name="iterate")
    assert message == "iterate.samples_per_prompt: must be at least 2, got 1"
    message = settings_error("iterate.max_staleness=-1", tmp_path=tmp_path, name="iterate")
    assert message == "iterate.max_staleness: must be at least 0, got -1"


def test_a_required_argument_of_a_component_is_named(tmp_path):
    from inspo.config import build
    from inspo.data.sources import source_of

    settings = load_settings(compose_config(["data=jsonl"], tmp_path))
    with pytest.raises(SettingError, match=r"^data.source.path: needs a value \(\?\?\? in its"):
        source_of(settings.data)
    settings = load_settings(compose_config(["judge=python"], tmp_path, name="iterate"))
    with pytest.raises(SettingError, match=r"^judge.function: needs a value"):
        build(settings.judge, "judge")


def test_a_wrong_type_or_choice_fails_while_hydra_composes(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["reflection.mode=reflexive"], tmp_path)
    assert "expected one of [off, inspo, inspo_one_sided]" in str(err.value.__cause__)
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["data.batch_size=eight"], tmp_path)
    assert "data.batch_size" in str(err.value.__cause__)


def test_hub_ids_pass_and_local_paths_must_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "sft").mkdir(parents=True)
    for name in ("gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "runs/sft", "./runs/sft"):
        assert ModelConfig(name_or_path=name, tiny=None).name_or_path == name
    for name in ("/missing/folder", "./missing", "runs/sft/policy", "~/no/such/model"):
        with pytest.raises(SettingError, match=f"name_or_path: no model at {name}"):
            ModelConfig(name_or_path=name, tiny=None)


def test_choices_are_typed_and_strings_are_accepted():
    r = ReflectionConfig(mode="inspo", reference_context="plain")
    assert r.mode is Reflection.inspo and r.reference_context is View.plain
    assert r.mode == "inspo" and f"{r.mode}" == "inspo" and json.dumps(r.mode) == '"inspo"'
    with pytest.raises(SettingError, match="mode: unknown value 'reflexive'; valid: off, inspo,"):
        ReflectionConfig(mode="reflexive")
    assert ReferenceConfig(kind="sync").sync_every == 64
    assert IterateConfig(reference="previous").reference == "previous"


def test_the_composed_config_is_typed_by_the_settings(tmp_path):
    cfg = compose_config(["reflection=inspo"], tmp_path)
    assert OmegaConf.get_type(cfg.data) is DataConfig
    assert OmegaConf.get_type(cfg.trainer) is TrainerConfig
    settings = load_settings(cfg)
    assert isinstance(settings.eval, EvalConfig) and settings.reflection.mode is Reflection.inspo
    assert settings.model.tiny.seed == settings.seed  # null: the run's seed


# --------------------------------------------------------------------------- once
def schema_default(group: str) -> dict:
    cls = IterateConfig if group == "iterate" else type(getattr(RunConfig(), group))
    return OmegaConf.to_container(OmegaConf.structured(cls))


def restated(stated: dict, default: dict, where: str = "") -> list[str]:
    """The keys ``stated`` sets to the value ``default`` already has."""
    out = []
    for key, value in stated.items():
        if key in ("defaults", "_target_", "source", "prompts") or key not in default:
            continue
        if isinstance(value, dict) and isinstance(default[key], dict):
            out += restated(value, default[key], f"{where}{key}.")
        elif value == default[key]:
            out.append(f"{where}{key}")
    return out


@pytest.mark.parametrize(
    "group", ["data", "model", "reference", "reflection", "eval", "trainer", "optim", "iterate"]
)
def test_a_default_is_declared_once(group):
    """No file of conf/ restates a default of the settings: it lives in inspo.settings alone."""
    default = schema_default(group)
    files = [*CONF.glob(f"{group}/*.yaml"), *CONF.glob("hardware/*.yaml")]
    files += [CONF / "base.yaml", CONF / "iterate.yaml", CONF / "train.yaml"]
    for path in files:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        stated = data if path.parent.name == group else data.get(group) or {}
        assert not restated(stated, default), f"{path.relative_to(CONF)} restates defaults"


def test_sampling_defaults_exist_once():
    """Evaluation and generation backends share the declaration of their sampling settings."""
    from inspo.models.sampling import SamplingConfig
    from inspo.online.generation import HF
    from inspo.settings import Sampling

    for cls in (EvalConfig, HF, SamplingConfig):
        assert issubclass(cls, Sampling)
        assert cls().max_new_tokens == Sampling().max_new_tokens == 48


# --------------------------------------------------------------------------- JSON
def test_json_is_written_strict_and_whole(tmp_path):
    path = tmp_path / "out.json"
    write_json(path, {"a": math.nan, "b": [1.0, math.inf], "c": Path("x"), "d": View.plain})
    assert json.loads(path.read_text(), parse_constant=pytest.fail) == {
        "a": None,
        "b": [1.0, None],
        "c": "x",
        "d": "plain",
    }
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left
    assert json_line({"x": -math.inf}) == '{"x": null}\n'


# --------------------------------------------------------------------------- the module
def test_a_non_finite_standard_term_is_described_with_its_own_reference(tokenizer, small_model):
    """With the standard loss mixed in, each term keeps its own reference scores: a NaN in the
    plain view's reference names the standard term, not the trained view's."""
    from inspo.data.collate import PreferenceCollator
    from inspo.data.encode import Encoder
    from inspo.data.templates import resolve_template
    from inspo.models.load import frozen_copy
    from inspo.objectives import DPO
    from inspo.training.module import LossWeights, PreferenceModule, describe_terms

    enc = Encoder(tokenizer, resolve_template("default"), max_length=64, max_prompt_length=32)
    views = ("plain", "reflective")
    rows = [{**enc.encode("Q? A:", "yes", "no", views), "index": 0}]
    batch = PreferenceCollator(tokenizer.pad_token_id, views)(rows)
    reflection = ReflectionConfig(mode="inspo", standard_weight=0.5)
    module = PreferenceModule(small_model, DPO(), frozen_copy(small_model), reflection=reflection)
    assert module.weights == LossWeights(trained=1.0, standard=0.5, distill=0.0)
    with torch.no_grad():
        plain = module.reference_scores(batch, "plain")
    nan = {f: getattr(plain, f) for f in ("chosen", "rejected", "chosen_length", "rejected_length")}
    nan["chosen"] = torch.full_like(plain.chosen, math.nan)
    step = module.compute_loss({**batch, "reference_scores": {"plain": nan}})
    assert set(step.terms) == {"trained", "standard"}
    assert torch.isfinite(step.terms["trained"].output.losses).all()
    message = describe_terms(step.terms)
    assert message.startswith("standard term: not finite:")
    assert "reference log-probs of the chosen responses (pairs [0])" in message
    assert "policy log-probs" not in message and "trained term" not in message
