"""inspo-train: compose the config, build data → trainer → models, fit, write the run folder.

Every run writes to its Hydra run directory:
    .hydra/config.yaml    the composed config
    data_report.json      rows read / used / skipped by reason, per split
    checkpoints/last.ckpt Lightning checkpoint (``ckpt_path=last`` resumes from it)
    summary.json          final metrics under their logged names + the run's choices
    policy/               the final policy (save_pretrained, safetensors) and its tokenizer
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from inspo.data.datamodule import PreferenceDataModule
from inspo.models.load import load_policy, load_tokenizer
from inspo.training.module import (
    REFLECTIONS,
    NonFiniteError,
    OptimConfig,
    PreferenceModule,
    make_reference,
    train_views,
)
from inspo.objectives import Objective
from inspo.config import config_dir
from inspo.training.reference import prepare_reference, reference_callbacks, resolve_auto

log = logging.getLogger(__name__)

# `${basename:PATH}`: the sweep presets name their wandb group after the sweep folder, which every
# job of one multirun shares (conf/experiment/ablate_*.yaml, objectives.yaml).
OmegaConf.register_new_resolver("basename", lambda path: Path(str(path)).name, replace=True)


def _sweep_group(mode: Any, sweep_dir: Any) -> str | None:
    """A multirun's jobs share the wandb group named after their sweep folder."""
    return Path(str(sweep_dir)).name if str(mode).endswith("MULTIRUN") else None


OmegaConf.register_new_resolver("sweep_group", _sweep_group, replace=True)

REFERENCE_KINDS = (
    "policy_init", "model", "none", "sync", "precomputed", "adapter_disabled",
)  # fmt: skip  # + auto, resolved


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any model is built."""


def build_objective(cfg: DictConfig) -> Objective:
    """The objective of ``objective._target_``; a parameter it does not take is a ConfigError
    that names the parameters it does take."""
    from hydra.errors import InstantiationException
    from hydra.utils import get_class

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
    if not isinstance(objective, Objective):
        raise ConfigError(f"objective._target_ must build an inspo Objective, got {objective!r}")
    return objective


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
    if not objective.requires_reference and kind != "none":
        raise ConfigError(
            f"objective {name} is reference-free but reference={kind}; use reference=none"
        )


def build_datamodule(cfg: DictConfig, tokenizer: Any, objective: Objective) -> PreferenceDataModule:
    d = cfg.data
    return PreferenceDataModule(
        source=instantiate(d.source, _partial_=True),
        tokenizer=tokenizer,
        train_split=d.train_split,
        val_split=d.val_split,
        batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size,
        max_length=d.max_length,
        max_prompt_length=d.max_prompt_length,
        template=cfg.reflection.template,
        reflection=cfg.reflection.mode != "off",
        train_views=train_views(
            cfg.reflection.mode,
            cfg.reference.context,
            objective.requires_reference,
            cfg.reflection.standard_weight,
            cfg.reflection.distill_weight,
        ),
        strict=d.strict,
        num_workers=d.num_workers,
        seed=cfg.seed,
        cache_dir=str(Path(cfg.paths.cache_dir) / "tokenized"),
        max_samples=d.max_samples,
        over_long=d.get("over_long", "truncate"),
        # reflective-layout SFT rows: only for a non-pairwise (SFT) objective
        sft_fraction=0.0 if objective.pairwise else cfg.reflection.get("sft_fraction", 0.0),
    )


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    logger = instantiate(cfg.logger) if cfg.logger.get("_target_") else False
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=cfg.checkpoint.every_n_train_steps,
    )
    strategy = instantiate(cfg.strategy) if cfg.get("strategy") else "auto"
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    return L.Trainer(
        **trainer_kwargs,
        strategy=strategy,
        logger=logger,
        callbacks=[checkpoint, LastValidation(), *reference_callbacks(cfg)],
        default_root_dir=str(run_dir),
    )


def build_module(cfg: DictConfig, objective: Objective, tokenizer: Any) -> PreferenceModule:
    resolve_auto(cfg, objective)  # idempotent: callers outside run() may pass reference=auto
    m = OmegaConf.to_container(cfg.model, resolve=True)
    m.pop("tokenizer", None)
    policy = load_policy(tokenizer=tokenizer, **m)
    ref_cfg = OmegaConf.to_container(cfg.reference, resolve=True)
    kind = ref_cfg.pop("kind")
    for key in ("context", "sync_every", "sync_alpha", "batch_size"):
        ref_cfg.pop(key, None)
    reference = make_reference(policy, kind, **ref_cfg)
    r = cfg.reflection
    module = PreferenceModule(
        policy,
        objective,
        reference,
        reflection=r.mode,
        reference_context=cfg.reference.context,
        reflective_weight=r.reflective_weight,
        standard_weight=r.standard_weight,
        distill_weight=r.distill_weight,
        optim=OptimConfig(**OmegaConf.to_container(cfg.optim, resolve=True)),
    )
    module.reference_in_checkpoint = kind == "sync"  # TR-DPO's reference is training state
    if kind == "adapter_disabled":  # LoRA: the reference is the policy with its adapter off
        if not cfg.model.get("lora"):
            raise ConfigError("reference=adapter_disabled needs a LoRA policy: set model.lora")
        module.adapter_reference = True
    return module


def run_choices(cfg: DictConfig) -> dict[str, Any]:
    """The choices a report groups runs by, recorded in summary.json."""
    obj = cfg.objective
    return {
        "objective": obj._target_.rsplit(".", 1)[-1],
        "scalarization": obj.get("scalarization"),
        "beta": obj.get("beta"),
        "reflection": cfg.reflection.mode,
        "reference": cfg.reference.kind,
        "reference_context": cfg.reference.context,
        "seed": cfg.seed,
        **extra_choices(cfg),
    }


def extra_choices(cfg: DictConfig) -> dict[str, Any]:
    """The rest of what a sweep report needs: config names, reflection knobs, reference knobs."""
    picked = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    obj, r, ref = cfg.objective, cfg.reflection, cfg.reference
    return {
        "objective_config": picked.get("objective"),
        "experiment": picked.get("experiment"),
        "gamma": obj.get("gamma"),
        "template": r.template,
        "reflective_weight": r.reflective_weight,
        "standard_weight": r.standard_weight,
        "distill_weight": r.distill_weight,
        "reference_name_or_path": ref.get("name_or_path"),
        "sync_every": ref.get("sync_every"),
        "sync_alpha": ref.get("sync_alpha"),
        "model": cfg.model.name_or_path or "tiny",
        "max_steps": cfg.trainer.max_steps,
        "lr": cfg.optim.lr,
        "wandb_group": cfg.get("wandb_group"),
        "tags": list(cfg.get("tags") or []),
    }


def run_tags(cfg: DictConfig) -> list[str]:
    """The user's ``tags`` plus ``key:value`` tags for objective, Ψ, reference and reflection."""
    obj = cfg.objective
    auto = {
        "objective": obj._target_.rsplit(".", 1)[-1],
        "psi": obj.get("scalarization") or "none",
        "reference": cfg.reference.kind,
        "reflection": cfg.reflection.mode,
    }
    if cfg.reflection.mode != "off":
        auto["reference_context"] = cfg.reference.context
    user = [t for t in (cfg.get("tags") or []) if t.split(":", 1)[0] not in auto]
    return [*user, *(f"{k}:{v}" for k, v in auto.items())]


def run_name(cfg: DictConfig) -> str:
    """``objective-Ψ-reflection-reference-seedN``: what a run is, readable in a wandb sweep."""
    picked = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    objective = picked.get("objective") or cfg.objective._target_.rsplit(".", 1)[-1]
    psi = cfg.objective.get("scalarization") or "none"
    return f"{objective}-{psi}-{cfg.reflection.mode}-{cfg.reference.kind}-seed{cfg.seed}"


def final_metrics(
    trainer: L.Trainer, reflection: str, train: dict[str, float] | None = None
) -> dict[str, float]:
    """The last value of every logged metric; ``train`` holds the train/* metrics as they were
    before a final ``trainer.validate`` (which clears them from ``callback_metrics``)."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics = {**(train or {}), **metrics}
    if reflection == "off":  # the standard form *is* the plain-context policy
        for k in [k for k in metrics if k.startswith("val/") and not k.startswith("val/plain/")]:
            metrics.setdefault("val/plain/" + k[len("val/") :], metrics[k])
    return metrics


def save_policy(module: PreferenceModule, tokenizer: Any, out: Path, trainer: L.Trainer) -> None:
    """Write the final policy with save_pretrained (gathering FSDP shards on rank 0)."""
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sharded = trainer.world_size > 1 and isinstance(trainer.strategy, ModelParallelStrategy)
    state = (
        get_model_state_dict(
            module.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if sharded
        else None
    )
    if trainer.is_global_zero:
        module.policy.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)


def compose_config(overrides: list[str], run_dir: str | Path) -> DictConfig:
    """Compose the train config outside a Hydra app (the demo's stages, tests).

    The result behaves as inside ``inspo-train``: ``${hydra:runtime.output_dir}`` is
    ``run_dir`` and the composed config is registered with HydraConfig.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(Path(run_dir).resolve())
        cfg.hydra.runtime.cwd = os.getcwd()
    HydraConfig.instance().set_config(cfg)
    return cfg


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train once; returns the summary written to summary.json."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    if not (run_dir / ".hydra").exists():  # composed outside a Hydra app: keep the config too
        (run_dir / ".hydra").mkdir()
        OmegaConf.save(job_cfg, run_dir / ".hydra" / "config.yaml")
    # Everything that can be wrong with the config fails here, before any model is built.
    objective = build_objective(cfg)
    resolve_auto(cfg, objective)  # reference=auto → none | policy_init
    check_config(cfg, objective)
    with open_dict(cfg):
        cfg.tags = run_tags(cfg)
        cfg.run_name = cfg.get("run_name") or run_name(cfg)
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    datamodule = build_datamodule(cfg, tokenizer, objective)
    trainer = build_trainer(cfg, run_dir)
    datamodule.setup("fit")
    if trainer.is_global_zero:
        print(datamodule.report)
        datamodule.report.save(run_dir / "data_report.json")
    if trainer.logger:
        trainer.logger.log_hyperparams(OmegaConf.to_container(job_cfg, resolve=True))
        trainer.logger.log_metrics(datamodule.report.flat_metrics(), step=0)

    module = build_module(cfg, objective, tokenizer)
    prepare_reference(cfg, module, datamodule)  # reference=precomputed: cached scores
    ckpt = cfg.ckpt_path
    if ckpt == "last" and not (run_dir / "checkpoints" / "last.ckpt").exists():
        log.info("ckpt_path=last but no checkpoint in %s: starting fresh", run_dir)
        ckpt = None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    except NonFiniteError as err:  # the last good checkpoint stays; no policy is written
        failed = {
            "status": "failed",
            "error": str(err),
            "metrics": final_metrics(trainer, cfg.reflection.mode),
            "choices": run_choices(cfg),
            "steps": trainer.global_step,
            "run_dir": str(run_dir),
        }
        if trainer.is_global_zero:
            write_json(run_dir / "summary.json", failed)
        raise
    train_metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")
    }
    last_val = next(c for c in trainer.callbacks if isinstance(c, LastValidation))
    if datamodule.val_split is not None and last_val.step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)

    summary = {
        "status": "finished",
        "metrics": final_metrics(trainer, cfg.reflection.mode, train_metrics),
        "choices": run_choices(cfg),
        "steps": trainer.global_step,
        "run_dir": str(run_dir),
    }
    if cfg.save_policy:
        save_policy(module, tokenizer, run_dir / "policy", trainer)
    # Single-process runs only (a sharded policy cannot generate on one rank): after a
    # multi-device run, evaluate the saved policy with `inspo-eval RUN_DIR`.
    if cfg.get("eval") and cfg.eval.generate and trainer.world_size == 1:
        from inspo.evaluation.stage import eval_stage  # generation, scores, win rates, KL (SPEC §5)

        summary["metrics"] |= eval_stage(
            cfg, module.policy, tokenizer, summary["metrics"], run_dir, trainer.logger
        )
    if trainer.is_global_zero:
        write_json(run_dir / "summary.json", summary)
    return summary


def write_json(path: Path, obj: Any) -> None:
    """JSON with NaN and ±inf as null: the file stays valid JSON for every reader."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    path.write_text(json.dumps(clean(obj), indent=2, allow_nan=False) + "\n")


class LastValidation(L.Callback):
    """Remembers the global step of the last validation, so a run validates once at its end."""

    step = -1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step


def close_loggers() -> None:
    """Always close wandb, even after an exception, so runs are never left dangling."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def quiet_libraries() -> None:
    """One progress bar per stage and the results: drop the libraries' tips, the per-load
    weight bars and the warning about the frozen reference being in eval mode (it is meant
    to be)."""
    import warnings

    import datasets
    import transformers

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    for name in ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: "litlogger" not in record.getMessage())


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Entry point; returns ``optimized_metric`` so Hydra sweepers can optimise it."""
    torch.set_float32_matmul_precision("high")
    quiet_libraries()
    try:
        summary = run(cfg)
    finally:
        close_loggers()
    value = summary["metrics"].get(cfg.optimized_metric)
    return None if value is None or math.isnan(value) else value


if __name__ == "__main__":
    main()
