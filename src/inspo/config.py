"""The Hydra config: where it lives, composing it outside an app, checking it, and the names a
run derives from it.

Everything that can be wrong with a config fails here, before any model is built: an unknown
option or key fails at composition (naming the valid choices), an objective parameter it does
not take or a reference its objective cannot use fails in :func:`check_config`.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from inspo.names import REFERENCE_KINDS, REFLECTIONS
from inspo.objectives import Objective, RewardObjective


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any model is built."""


def config_dir() -> Path:
    """``inspo/conf`` inside an installed wheel, else the repository's top-level ``conf/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"inspo's Hydra configs (train.yaml) not found near {here}")


def _sweep_group(mode: Any, task_name: Any, sweep_dir: Any) -> str | None:
    """The wandb group a multirun's jobs share: ``{task_name}_{sweep folder}``; none for a
    single run."""
    return f"{task_name}_{Path(str(sweep_dir)).name}" if str(mode).endswith("MULTIRUN") else None


OmegaConf.register_new_resolver("sweep_group", _sweep_group, replace=True)


def compose_config(overrides: list[str], run_dir: str | Path, name: str = "train") -> DictConfig:
    """Compose config ``name`` outside a Hydra app (the demo's stages, tests).

    The result behaves as inside ``inspo-train``: ``${hydra:runtime.output_dir}`` is
    ``run_dir`` and the composed config is registered with HydraConfig.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose(name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(Path(run_dir).resolve())
        cfg.hydra.runtime.cwd = os.getcwd()
    HydraConfig.instance().set_config(cfg)
    return cfg


def build_objective(cfg: DictConfig) -> Objective | RewardObjective:
    """The objective of ``objective._target_`` (a policy's, or a reward model's); a parameter it
    does not take is a ConfigError that names the parameters it does take."""
    try:
        objective = instantiate(cfg.objective)
    except InstantiationException as e:
        if not isinstance(e.__cause__, TypeError) or "keyword argument" not in str(e.__cause__):
            raise
        cls = get_class(cfg.objective._target_)
        params = [p for p in inspect.signature(cls).parameters if p not in ("self", "kwargs")]
        given = [k for k in cfg.objective if k != "_target_" and k not in params]
        raise ConfigError(
            f"objective {cls.__name__} takes no parameter {', '.join(map(repr, given))}; "
            f"valid: {', '.join(params)}"
        ) from e
    if not isinstance(objective, Objective | RewardObjective):
        raise ConfigError(
            "objective._target_ must build an inspo Objective or RewardObjective, "
            f"got {objective!r}"
        )
    return objective


def resolve_auto(cfg: DictConfig, objective: Objective) -> None:
    """``reference=auto`` (the default) → ``none`` for reference-free objectives, else
    ``policy_init``; idempotent. summary.json and the tags record the resolved kind."""
    if cfg.reference.kind == "auto":
        with open_dict(cfg):
            cfg.reference.kind = "policy_init" if objective.requires_reference else "none"


def check_config(cfg: DictConfig, objective: Objective) -> None:
    """Refuse combinations that cannot work, with a message that says what to change."""
    mode, kind = cfg.reflection.mode, cfg.reference.kind
    if mode not in REFLECTIONS:
        raise ConfigError(f"unknown reflection.mode {mode!r}; valid: {', '.join(REFLECTIONS)}")
    if kind not in REFERENCE_KINDS:
        raise ConfigError(f"unknown reference.kind {kind!r}; valid: {', '.join(REFERENCE_KINDS)}")
    name = type(objective).__name__
    if objective.requires_reference and kind == "none":
        raise ConfigError(
            f"objective {name} needs a reference model but reference=none; "
            "use reference=policy_init (or model/sync), or a reference-free objective"
        )
    if not objective.requires_reference and kind not in ("none", "auto"):
        raise ConfigError(
            f"objective {name} is reference-free but reference={kind}; use reference=none"
        )
    if kind == "adapter_disabled" and not cfg.model.get("lora"):
        raise ConfigError("reference=adapter_disabled needs a LoRA policy: set model.lora")


def objective_name(cfg: DictConfig) -> str:
    """The objective's class name, from ``objective._target_``."""
    return cfg.objective._target_.rsplit(".", 1)[-1]


def run_name(cfg: DictConfig) -> str:
    """``objective-Ψ-reflection-reference-seedN``: what a run is, readable in a wandb sweep."""
    picked = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    objective = picked.get("objective") or objective_name(cfg)
    psi = cfg.objective.get("scalarization") or "none"
    return f"{objective}-{psi}-{cfg.reflection.mode}-{cfg.reference.kind}-seed{cfg.seed}"


def run_tags(cfg: DictConfig) -> list[str]:
    """The user's ``tags`` plus ``key:value`` tags for objective, Ψ, reference and reflection."""
    auto = {
        "objective": objective_name(cfg),
        "psi": cfg.objective.get("scalarization") or "none",
        "reference": cfg.reference.kind,
        "reflection": cfg.reflection.mode,
    }
    if cfg.reflection.mode != "off":
        auto["reference_context"] = cfg.reflection.reference_context
    user = [t for t in (cfg.get("tags") or []) if t.split(":", 1)[0] not in auto]
    return [*user, *(f"{k}:{v}" for k, v in auto.items())]
