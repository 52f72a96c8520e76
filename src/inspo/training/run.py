"""One training run: build data → trainer → models from the config, fit, write the run folder.

Every run writes to its Hydra run directory:
    .hydra/config.yaml    the composed config
    data_report.json      rows read / used / skipped by reason, per split
    checkpoints/last.ckpt Lightning checkpoint (``ckpt_path=last`` resumes from it)
    summary.json          see :func:`summary`
    policy/               the final policy (save_pretrained, safetensors) and its tokenizer
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf, open_dict

from inspo.config import (
    ConfigError,
    build_objective,
    check_config,
    objective_name,
    resolve_auto,
    run_name,
    run_tags,
)
from inspo.data.datamodule import PreferenceDataModule
from inspo.models.load import load_policy, load_tokenizer
from inspo.names import EOS_RATE, VAL, VAL_PLAIN
from inspo.objectives import Objective, RewardObjective
from inspo.training.guards import NonFiniteError
from inspo.training.module import PreferenceModule
from inspo.training.reference import make_reference, prepare_reference, reference_callbacks
from inspo.training.views import train_views

log = logging.getLogger(__name__)

#: Reflection knobs (``conf/reflection/``) and who takes them; absent knobs keep the
#: constructors' defaults, so ``reflection=off`` carries none.
MODULE_KNOBS = ("reference_context", "reflective_weight", "standard_weight", "distill_weight")
DATA_KNOBS = ("template", "sft_fraction")


def knobs(cfg: DictConfig, names: tuple[str, ...]) -> dict[str, Any]:
    return {k: cfg.reflection[k] for k in names if k in cfg.reflection}


def build_datamodule(
    cfg: DictConfig,
    tokenizer: Any,
    objective: Objective,
    cls: type[PreferenceDataModule] = PreferenceDataModule,
    train_split: str | None = "data",
) -> PreferenceDataModule:
    """The data module of ``cfg.data`` (``train_split="data"``: the config's train split; None:
    no training split, for a run whose training data come from elsewhere)."""
    d, weights = cfg.data, knobs(cfg, MODULE_KNOBS)
    weights.pop("reflective_weight", None)  # scales a loss; changes no view
    views = train_views(cfg.reflection.mode, objective.requires_reference, **weights)
    data_knobs = knobs(cfg, DATA_KNOBS)
    if objective.pairwise:  # reflective-layout rows are for the SFT stage only
        data_knobs.pop("sft_fraction", None)
    return cls(
        source=instantiate(d.source, _partial_=True),
        tokenizer=tokenizer,
        train_split=d.train_split if train_split == "data" else train_split,
        val_split=d.val_split,
        batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size,
        max_length=d.max_length,
        max_prompt_length=d.max_prompt_length,
        reflection=cfg.reflection.mode != "off",
        train_views=views,
        strict=d.strict,
        num_workers=d.num_workers,
        seed=cfg.seed,
        cache_dir=str(Path(cfg.paths.cache_dir) / "tokenized"),
        max_samples=d.max_samples,
        over_long=d.over_long,
        packing=d.packing,
        group_by_length=d.group_by_length,
        group_size=d.group_size,
        max_tokens_per_batch=d.max_tokens_per_batch,
        **data_knobs,
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
    settings = OmegaConf.to_container(cfg.trainer, resolve=True)
    callbacks = [checkpoint, LastValidation(), *reference_callbacks(cfg)]
    if settings["enable_progress_bar"]:
        # tqdm's bar counts steps; Rich's (Lightning's default when rich is installed) reads
        # "Epoch 0/-2" when the steps, not the epochs, bound the run (max_epochs=-1).
        callbacks.append(TQDMProgressBar())
    if cfg.data.val_split is None:  # no validation loop, rather than an empty loader per stage
        settings["limit_val_batches"] = 0
    return L.Trainer(
        **settings,
        strategy=strategy,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=str(run_dir),
    )


def build_module(cfg: DictConfig, objective: Objective, tokenizer: Any) -> PreferenceModule:
    resolve_auto(cfg, objective)  # idempotent: callers outside run() may pass reference=auto
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model.pop("tokenizer")
    policy = load_policy(tokenizer=tokenizer, **model)
    kind = cfg.reference.kind
    reference = make_reference(policy, cfg.reference)
    return PreferenceModule(
        policy,
        objective,
        reference,
        reflection=cfg.reflection.mode,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        adapter_reference=kind == "adapter_disabled",
        reference_in_checkpoint=kind == "sync",  # TR-DPO's reference is training state
        packing=cfg.data.packing,  # the scorer packs each view's rows (inspo.models.packing)
        packing_kernel=cfg.data.packing_kernel,  # their attention: per row on CPU, varlen on GPU
        **knobs(cfg, MODULE_KNOBS),
    )


def run_choices(cfg: DictConfig) -> dict[str, Any]:
    """The choices a report groups runs by."""
    picked = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    obj, r, ref = cfg.objective, cfg.reflection, cfg.reference
    return {
        "objective": objective_name(cfg),
        "objective_config": picked.get("objective"),
        "experiment": picked.get("experiment"),
        "scalarization": obj.get("scalarization"),
        "beta": obj.get("beta"),
        "gamma": obj.get("gamma"),
        "reflection": r.mode,
        **{k: r.get(k) for k in (*MODULE_KNOBS, "template")},
        "reference": ref.kind,
        "reference_name_or_path": ref.get("name_or_path"),
        "sync_every": ref.get("sync_every"),
        "sync_alpha": ref.get("sync_alpha"),
        "seed": cfg.seed,
        "eval_split": cfg.data.get("eval_split"),  # tune (a search's trials) or the test prompts
        "model": cfg.model.name_or_path or "tiny",
        "max_steps": cfg.trainer.max_steps,
        "lr": cfg.optim.lr,
        "wandb_group": cfg.get("wandb_group"),
        "tags": list(cfg.get("tags") or []),
    }


def summary(
    cfg: DictConfig, trainer: L.Trainer, metrics: dict[str, float], error: str | None = None
) -> dict[str, Any]:
    """summary.json: ``status`` (finished | failed), ``error`` (why it failed), ``metrics`` (the
    last value of every logged metric, by its logged name; evaluation adds ``eval/...``),
    ``choices`` (:func:`run_choices`), ``steps`` (optimiser steps done) and ``run_dir``."""
    out = {"status": "failed" if error else "finished", "metrics": metrics}
    if error:
        out["error"] = error
    run_dir = HydraConfig.get().runtime.output_dir
    return {**out, "choices": run_choices(cfg), "steps": trainer.global_step, "run_dir": run_dir}


def final_metrics(trainer: L.Trainer, reflection: str, train: dict | None = None) -> dict:
    """The last value of every logged metric; ``train`` holds the train/* metrics as they were
    before a final ``trainer.validate`` (which clears them from ``callback_metrics``)."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics = {**(train or {}), **metrics}
    if reflection == "off":  # the standard form *is* the plain-context policy
        prefix = f"{VAL}/"
        pair = [k for k in metrics if k.startswith(prefix) and not k.startswith(VAL_PLAIN)]
        for k in [k for k in pair if k != EOS_RATE]:  # TRL's name for a sample metric
            metrics.setdefault(f"{VAL_PLAIN}/{k[len(prefix) :]}", metrics[k])
    return metrics


def save_pretrained(model: Any, tokenizer: Any, out: Path, trainer: L.Trainer) -> None:
    """Write a trained model and its tokenizer with save_pretrained (gathering FSDP shards on
    rank 0)."""
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = None
    if trainer.world_size > 1 and isinstance(trainer.strategy, ModelParallelStrategy):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
    if trainer.is_global_zero:
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)


class Extension:
    """What a kind of run changes in :func:`run` (the iterative loop and reward-model training
    are two): its own data module, the module it trains, what it attaches once the models
    exist, the metrics it reports, where it saves, what it adds to the summary."""

    def check(self, cfg: DictConfig, objective: Objective) -> None:
        """Refuse settings this kind of run cannot use (before any model is built)."""

    def datamodule(
        self, cfg: DictConfig, tokenizer: Any, objective: Objective
    ) -> PreferenceDataModule:
        return build_datamodule(cfg, tokenizer, objective)

    def module(self, cfg: DictConfig, objective: Objective, tokenizer: Any) -> L.LightningModule:
        return build_module(cfg, objective, tokenizer)

    def final_metrics(self, cfg: DictConfig, trainer: L.Trainer, train: dict | None) -> dict:
        return final_metrics(trainer, cfg.reflection.mode, train)

    def save(self, module: Any, tokenizer: Any, run_dir: Path, trainer: L.Trainer) -> None:
        """Write the trained model (``save_policy=true``): the policy to ``RUN/policy``."""
        save_pretrained(module.policy, tokenizer, run_dir / "policy", trainer)

    def attach(
        self, cfg: DictConfig, module: PreferenceModule, datamodule: Any, trainer: L.Trainer
    ) -> None:
        """Called once the policy, reference and trainer exist, before fitting."""

    def finish(self, result: dict[str, Any]) -> None:
        """Add to the summary before it is written."""


def extension_for(objective: Objective | RewardObjective) -> Extension:
    """The kind of run ``inspo-train`` makes of an objective: a reward objective trains a reward
    model (:mod:`inspo.training.reward`), any other a policy."""
    if isinstance(objective, RewardObjective):
        from inspo.training.reward import RewardModelRun  # it builds on this module

        return RewardModelRun()
    return Extension()


def run(cfg: DictConfig, extension: Extension | None = None) -> dict[str, Any]:
    """Train once; returns the summary written to summary.json. ``extension``: the kind of run
    (None: :func:`extension_for` the objective)."""
    if "iterate" in cfg and extension is None:
        raise ConfigError("this config sets iterate.*: run it with inspo-iterate")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    if not (run_dir / ".hydra").exists():  # composed outside a Hydra app: keep the config too
        (run_dir / ".hydra").mkdir()
        OmegaConf.save(job_cfg, run_dir / ".hydra" / "config.yaml")
    # Everything that can be wrong with the config fails here, before any model is built.
    objective = build_objective(cfg)
    extension = extension or extension_for(objective)
    resolve_auto(cfg, objective)
    check_config(cfg, objective)
    extension.check(cfg, objective)
    if cfg.ckpt_path == "last":
        done = finished_summary(run_dir, cfg.trainer.max_steps)
        if done is not None:  # resubmitted after it finished (a requeue): nothing to redo
            print(f"{run_dir} finished all {done['steps']} steps already; summary.json kept")
            return done
    with open_dict(cfg):
        cfg.tags = run_tags(cfg)
        cfg.run_name = cfg.get("run_name") or run_name(cfg)
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    datamodule = extension.datamodule(cfg, tokenizer, objective)
    trainer = build_trainer(cfg, run_dir)
    datamodule.setup("fit")
    if trainer.is_global_zero:
        print(datamodule.report)
        datamodule.report.save(run_dir / "data_report.json")
    if trainer.logger:
        trainer.logger.log_hyperparams(OmegaConf.to_container(job_cfg, resolve=True))
        trainer.logger.log_metrics(datamodule.report.flat_metrics(), step=0)

    module = extension.module(cfg, objective, tokenizer)
    prepare_reference(cfg, module, datamodule)  # reference=precomputed: cached scores
    extension.attach(cfg, module, datamodule, trainer)
    ckpt = cfg.ckpt_path
    if ckpt == "last" and not (run_dir / "checkpoints" / "last.ckpt").exists():
        log.info("ckpt_path=last but no checkpoint in %s: starting fresh", run_dir)
        ckpt = None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    except NonFiniteError as err:  # the last good checkpoint stays; no policy is written
        if trainer.is_global_zero:
            metrics = extension.final_metrics(cfg, trainer, None)
            write_json(run_dir / "summary.json", summary(cfg, trainer, metrics, str(err)))
        raise
    train_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "train/" in k}
    last_val = next(c for c in trainer.callbacks if isinstance(c, LastValidation))
    if datamodule.val_split is not None and last_val.step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)

    result = summary(cfg, trainer, extension.final_metrics(cfg, trainer, train_metrics))
    if cfg.save_policy:
        extension.save(module, tokenizer, run_dir, trainer)
    # Single-process runs only (a sharded policy cannot generate on one rank): after a
    # multi-device run, evaluate the saved policy with `inspo-eval RUN_DIR`.
    if cfg.eval.generate and trainer.world_size == 1:
        from inspo.evaluation.stage import eval_stage

        result["metrics"] |= eval_stage(
            cfg, module.policy, tokenizer, result["metrics"], run_dir, trainer.logger
        )
    extension.finish(result)
    if trainer.is_global_zero:
        write_json(run_dir / "summary.json", result)
    return result


def finished_summary(run_dir: Path, max_steps: int) -> dict[str, Any] | None:
    """The summary of a run that finished all ``max_steps`` steps in ``run_dir``, else None.
    Resuming it would restore the last checkpoint, train nothing and write a summary without
    what only the finished run measured (its evaluation, its last training metrics)."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    done = saved.get("status") == "finished" and saved.get("steps") == max_steps
    return saved if done else None


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
