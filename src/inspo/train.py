"""inspo-train: compose the config, build data → trainer → models, fit, write the run folder.

Every run writes to its Hydra run directory:
    .hydra/config.yaml    the composed config
    data_report.json      rows read / used / skipped by reason, per split
    checkpoints/last.ckpt Lightning checkpoint (``ckpt_path=last`` resumes from it)
    summary.json          final metrics under their logged names + the run's choices
    policy/               the final policy (save_pretrained, safetensors) and its tokenizer
"""

from __future__ import annotations

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

from inspo.datamodule import PreferenceDataModule
from inspo.models import load_policy, load_tokenizer
from inspo.module import REFLECTIONS, OptimConfig, PreferenceModule, make_reference, train_views
from inspo.objectives import Objective
from inspo.paths import config_dir
from inspo.reference import prepare_reference, reference_callbacks, resolve_auto

log = logging.getLogger(__name__)

# `${basename:PATH}`: the sweep presets name their wandb group after the sweep folder, which every
# job of one multirun shares (conf/experiment/ablate_*.yaml, objectives.yaml).
OmegaConf.register_new_resolver("basename", lambda path: Path(str(path)).name, replace=True)

REFERENCE_KINDS = (
    "policy_init", "model", "none", "sync", "precomputed", "adapter_disabled",
)  # fmt: skip  # + auto, resolved


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any model is built."""


def build_objective(cfg: DictConfig) -> Objective:
    objective = instantiate(cfg.objective)
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
        callbacks=[checkpoint, *reference_callbacks(cfg)],
        default_root_dir=str(run_dir),
    )


def build_module(cfg: DictConfig, objective: Objective, tokenizer: Any) -> PreferenceModule:
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


def final_metrics(trainer: L.Trainer, reflection: str) -> dict[str, float]:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
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
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    if datamodule.val_split is not None:
        trainer.validate(module, datamodule=datamodule, verbose=False)

    summary = {
        "metrics": final_metrics(trainer, cfg.reflection.mode),
        "choices": run_choices(cfg),
        "steps": trainer.global_step,
        "run_dir": str(run_dir),
    }
    if cfg.save_policy:
        save_policy(module, tokenizer, run_dir / "policy", trainer)
    # Single-process runs only (a sharded policy cannot generate on one rank): after a
    # multi-device run, evaluate the saved policy with `inspo-eval RUN_DIR`.
    if cfg.get("eval") and cfg.eval.generate and trainer.world_size == 1:
        from inspo.eval import eval_stage  # generation, scores, win rates, KL (SPEC §5)

        summary["metrics"] |= eval_stage(
            cfg, module.policy, tokenizer, summary["metrics"], run_dir, trainer.logger
        )
    if trainer.is_global_zero:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def close_loggers() -> None:
    """Always close wandb, even after an exception, so runs are never left dangling."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Entry point; returns ``optimized_metric`` so Hydra sweepers can optimise it."""
    torch.set_float32_matmul_precision("high")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        summary = run(cfg)
    finally:
        close_loggers()
    value = summary["metrics"].get(cfg.optimized_metric)
    return None if value is None or math.isnan(value) else value


if __name__ == "__main__":
    main()
