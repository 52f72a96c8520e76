"""The Hydra config: where it lives, composing it outside an app, and what a run derives from
it before anything is built (its objective, its reference kind, its name and tags).

Everything that can be wrong with a config fails before any model is built: an unknown option,
key, type or choice at composition (naming the valid choices); a value out of range, a missing
path or an impossible combination of one group in :func:`inspo.settings.load_settings`; an
objective parameter it does not take or out of range in :func:`build_objective`; a reference
its objective cannot use in :func:`check_run`. Each is one :class:`ConfigError` whose message
starts with the setting it is about.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from inspo.names import ReferenceKind, Reflection
from inspo.objectives import Objective, RewardObjective
from inspo.settings import (
    ConfigError,
    ReferenceConfig,
    RunConfig,
    SettingError,
    require_values,
)

__all__ = ["ConfigError", "SettingError"]


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


def build(spec: Mapping[str, Any], key: str, **kwargs: Any) -> Any:
    """The component of ``spec`` (a ``_target_`` and its arguments: an objective, a judge, a
    generation backend, ...), configured at ``key``. A value its class refuses, or an argument
    it does not take, is a ConfigError naming the setting."""
    require_values(spec, key)
    try:
        return instantiate(spec, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, SettingError):
            raise SettingError(f"{key}.{cause.key}", cause.why) from None
        if isinstance(cause, ValueError):
            raise ConfigError(f"{key}: {cause}") from None
        if not isinstance(cause, TypeError) or "keyword argument" not in str(cause):
            raise
        cls = get_class(spec["_target_"])
        params = [p for p in inspect.signature(cls).parameters if p not in ("self", "kwargs")]
        given = [k for k in spec if k != "_target_" and not k.startswith("_") and k not in params]
        raise ConfigError(
            f"{key}: {cls.__name__} takes no parameter {', '.join(map(repr, given))}; "
            f"valid: {', '.join(params)}"
        ) from None


def build_objective(spec: Mapping[str, Any]) -> Objective | RewardObjective:
    """The objective of ``spec`` (``objective``: a ``_target_`` and its parameters), a
    policy's or a reward model's; see :func:`build`."""
    objective = build(spec, "objective")
    if not isinstance(objective, Objective | RewardObjective):
        raise ConfigError(
            "objective._target_ must build an inspo Objective or RewardObjective, "
            f"got {objective!r}"
        )
    return objective


def resolve_reference(reference: ReferenceConfig, objective: Objective) -> ReferenceConfig:
    """``reference=auto`` (the default) → ``none`` for reference-free objectives, else
    ``policy_init``; any other kind as it is. summary.json and the tags record the result."""
    if reference.kind is not ReferenceKind.auto:
        return reference
    kind = ReferenceKind.policy_init if objective.requires_reference else ReferenceKind.none
    return dataclasses.replace(reference, kind=kind)


def check_run(settings: RunConfig, objective: Objective) -> None:
    """Refuse combinations that cannot work, with a message that says what to change."""
    kind, name = settings.reference.kind, type(objective).__name__
    if objective.requires_reference and kind is ReferenceKind.none:
        raise ConfigError(
            f"reference: objective {name} needs a reference model but reference=none; "
            "use reference=policy_init (or model/sync), or a reference-free objective"
        )
    if not objective.requires_reference and kind not in (ReferenceKind.none, ReferenceKind.auto):
        raise ConfigError(
            f"reference: objective {name} is reference-free but reference={kind}; "
            "use reference=none"
        )
    if kind is ReferenceKind.adapter_disabled and settings.model.lora is None:
        raise ConfigError(
            "reference: reference=adapter_disabled needs a LoRA policy: set model.lora"
        )


def objective_name(spec: Mapping[str, Any]) -> str:
    """The objective's class name, from its ``_target_``."""
    return str(spec["_target_"]).rsplit(".", 1)[-1]


def scalarization(spec: Mapping[str, Any]) -> str:
    """The objective's Ψ, ``none`` where it has none."""
    return spec.get("scalarization") or "none"


def run_name(settings: RunConfig) -> str:
    """``objective-Ψ-reflection-reference-seedN``: what a run is, readable in a wandb sweep."""
    picked = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    objective = picked.get("objective") or objective_name(settings.objective)
    psi, mode = scalarization(settings.objective), settings.reflection.mode
    return f"{objective}-{psi}-{mode}-{settings.reference.kind}-seed{settings.seed}"


def run_tags(settings: RunConfig) -> list[str]:
    """The user's ``tags`` plus ``key:value`` tags for objective, Ψ, reference and reflection."""
    reflection = settings.reflection
    auto = {
        "objective": objective_name(settings.objective),
        "psi": scalarization(settings.objective),
        "reference": str(settings.reference.kind),
        "reflection": str(reflection.mode),
    }
    if reflection.mode is not Reflection.off:
        auto["reference_context"] = str(reflection.reference_context)
    user = [t for t in settings.tags if t.split(":", 1)[0] not in auto]
    return [*user, *(f"{k}:{v}" for k, v in auto.items())]


def name_run(settings: RunConfig, cfg: DictConfig) -> RunConfig:
    """The run's tags and name (the user's, else :func:`run_name`), set in ``settings`` and in
    the composed config, whose components (a logger's name and tags) interpolate them."""
    named = dataclasses.replace(
        settings, tags=run_tags(settings), run_name=settings.run_name or run_name(settings)
    )
    with open_dict(cfg):
        cfg.tags, cfg.run_name = named.tags, named.run_name
    return named
