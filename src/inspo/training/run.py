"""One training run, the assembly: the composed config becomes typed settings (checked), then
data → trainer → models are built from them, fitted, and the run folder written.

Every run writes to its Hydra run directory:
    .hydra/config.yaml    the composed config
    data_report.json      rows read / used / skipped by reason, per split
    checkpoints/last.ckpt Lightning checkpoint (``ckpt_path=last`` resumes from it)
    summary.json          see :func:`summary`
    policy/               the final policy (save_pretrained, safetensors) and its tokenizer
"""

from __future__ import annotations

import dataclasses
import json
import logging
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
    check_run,
    name_run,
    objective_name,
    resolve_reference,
)
from inspo.data.datamodule import PreferenceDataModule
from inspo.data.sources import source_of
from inspo.jsonio import write_json
from inspo.models.load import load_model, model_tokenizer
from inspo.models.scoring import Scoring
from inspo.names import EOS_RATE, VAL, VAL_PLAIN, ReferenceKind, Reflection
from inspo.objectives import Objective, RewardObjective
from inspo.settings import ModelConfig, RunConfig, load_settings
from inspo.training.checkpoints import StreamingCheckpointIO
from inspo.training.guards import RunFailure
from inspo.training.module import PreferenceModule
from inspo.training.reference import make_reference, prepare_reference, reference_callbacks
from inspo.training.views import train_views

log = logging.getLogger(__name__)


def prepare(
    cfg: DictConfig, extension: Extension | None = None
) -> tuple[RunConfig, Objective | RewardObjective, Extension]:
    """The run's typed settings, its objective and the kind of run it is (``extension``; None:
    :func:`extension_for` the objective), everything checked: whatever can be wrong with the
    config fails here, before any model is built, as one ConfigError naming the setting. The
    run's name, tags and optimised metric are written back into ``cfg`` (the logger's
    interpolations and the entry point read them)."""
    settings = load_settings(cfg)
    objective = build_objective(settings.objective)
    extension = extension or extension_for(objective)
    reference = resolve_reference(settings.reference, objective)
    settings = dataclasses.replace(settings, reference=reference)
    check_run(settings, objective)
    settings = name_run(extension.check(settings, objective), cfg)
    with open_dict(cfg):
        cfg.optimized_metric = settings.optimized_metric
    return settings, objective, extension


def build_datamodule(
    settings: RunConfig,
    tokenizer: Any,
    objective: Objective,
    cls: type[PreferenceDataModule] = PreferenceDataModule,
    train: bool = True,
) -> PreferenceDataModule:
    """The data module of ``settings.data`` (``train=False``: no training split, for a run
    whose training batches come from elsewhere)."""
    r, data = settings.reflection, settings.data
    if not train:
        data = dataclasses.replace(data, train_split=None)
    weights = (r.standard_weight, r.distill_weight) if r.reflective else (0.0, 0.0)
    views = train_views(r.mode, objective.requires_reference, r.reference_context, *weights)
    return cls(
        source_of(data),
        tokenizer,
        data,
        reflective=r.reflective,
        train_views=views,
        template=r.template,
        # reflective-layout rows are for the SFT stage only
        sft_fraction=0.0 if objective.pairwise else r.sft_fraction,
        seed=settings.seed,
        cache_dir=str(Path(settings.paths.cache_dir) / "tokenized"),
    )


def build_trainer(
    settings: RunConfig, logger_cfg: Any, strategy_cfg: Any, run_dir: Path
) -> L.Trainer:
    """Lightning's Trainer of ``settings.trainer``, with the run's logger and strategy (built
    from their configs) and its checkpoint callbacks."""
    logger = instantiate(logger_cfg) if logger_cfg and logger_cfg.get("_target_") else False
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=settings.checkpoint.every_n_train_steps,
    )
    strategy = instantiate(strategy_cfg) if strategy_cfg else "auto"
    callbacks = [checkpoint, LastValidation(), *reference_callbacks(settings.reference)]
    trainer = dataclasses.asdict(settings.trainer)
    if settings.trainer.enable_progress_bar:
        # tqdm's bar counts steps; Rich's (Lightning's default when rich is installed) reads
        # "Epoch 0/-2" when the steps, not the epochs, bound the run (max_epochs=-1).
        callbacks.append(TQDMProgressBar())
    if settings.data.val_split is None:  # no validation loop, rather than an empty loader per stage
        trainer["limit_val_batches"] = 0
    return L.Trainer(
        **trainer,
        strategy=strategy,
        logger=logger,
        callbacks=callbacks,
        plugins=[StreamingCheckpointIO()],
        default_root_dir=str(run_dir),
    )


def build_module(settings: RunConfig, objective: Objective, tokenizer: Any) -> PreferenceModule:
    """The policy of ``settings.model``, its reference and the training module around them."""
    reference = resolve_reference(settings.reference, objective)  # callers may pass auto
    policy, data = load_model(settings.model, tokenizer, settings.paths.cache), settings.data
    kind = reference.kind
    return PreferenceModule(
        policy,
        objective,
        make_reference(policy, reference, settings.model),
        reflection=settings.reflection,
        optim=settings.optim,
        adapter_reference=kind is ReferenceKind.adapter_disabled,
        reference_in_checkpoint=kind is ReferenceKind.sync,  # TR-DPO's reference is training state
        # the scorer packs each view's rows (inspo.models.packing); their attention: per row
        # on CPU, varlen on GPU
        scoring=Scoring(packing=data.packing, packing_kernel=str(data.packing_kernel)),
    )


def run_choices(settings: RunConfig) -> dict[str, Any]:
    """The choices a report groups runs by. The reflective knobs are None for the standard
    form, where they do not apply."""
    picked = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    obj, r, ref = settings.objective, settings.reflection, settings.reference
    knobs = ("reference_context", "reflective_weight", "standard_weight", "distill_weight")
    return {
        "objective": objective_name(obj),
        "objective_config": picked.get("objective"),
        "experiment": picked.get("experiment"),
        "scalarization": obj.get("scalarization"),
        "beta": obj.get("beta"),
        "gamma": obj.get("gamma"),
        "reflection": str(r.mode),
        **{k: (getattr(r, k) if r.reflective else None) for k in knobs},
        "template": r.template if r.reflective or r.sft_fraction > 0 else None,
        "reference": str(ref.kind),
        "reference_name_or_path": ref.name_or_path,
        "sync_every": ref.sync_every if ref.kind is ReferenceKind.sync else None,
        "sync_alpha": ref.sync_alpha if ref.kind is ReferenceKind.sync else None,
        "seed": settings.seed,
        # the prompts the evaluation scored: tune (a search's trials) or the test prompts
        "eval_split": settings.data.eval_split,
        "model": model_label(settings.model),
        "max_steps": settings.trainer.max_steps,
        "lr": settings.optim.lr,
        "wandb_group": settings.wandb_group,
        "tags": list(settings.tags),
    }


def model_label(model: ModelConfig) -> str:
    """The model a run started from, as reports name it: its GGUF file, path or ``tiny``."""
    return model.gguf_file or model.name_or_path or "tiny"


def summary(
    settings: RunConfig, trainer: L.Trainer, metrics: dict[str, float], error: str | None = None
) -> dict[str, Any]:
    """summary.json: ``status`` (finished | failed), ``error`` (why it failed), ``metrics`` (the
    last value of every logged metric, by its logged name; evaluation adds ``eval/...``),
    ``choices`` (:func:`run_choices`), ``steps`` (optimiser steps done) and ``run_dir``."""
    out = {"status": "failed" if error else "finished", "metrics": metrics}
    if error:
        out["error"] = error
    run_dir = HydraConfig.get().runtime.output_dir
    choices = run_choices(settings)
    return {**out, "choices": choices, "steps": trainer.global_step, "run_dir": run_dir}


def final_metrics(trainer: L.Trainer, reflection: Reflection, train: dict | None = None) -> dict:
    """The last value of every logged metric; ``train`` holds the train/* metrics as they were
    before a final ``trainer.validate`` (which clears them from ``callback_metrics``)."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics = {**(train or {}), **metrics}
    if reflection is Reflection.off:  # the standard form *is* the plain-context policy
        prefix = f"{VAL}/"
        pair = [k for k in metrics if k.startswith(prefix) and not k.startswith(VAL_PLAIN)]
        for k in [k for k in pair if k != EOS_RATE]:  # TRL's name for a sample metric
            metrics.setdefault(f"{VAL_PLAIN}/{k[len(prefix) :]}", metrics[k])
    return metrics


def save_pretrained(model: Any, tokenizer: Any, out: Path, trainer: L.Trainer) -> None:
    """Write a trained model and its tokenizer with save_pretrained (gathering FSDP shards on
    rank 0). A sharded model is gathered on one process too: its parameters are DTensors and
    the storage of their unsharded copies is freed between forwards."""
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = None
    if isinstance(trainer.strategy, ModelParallelStrategy):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
    if trainer.is_global_zero:
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)


class Extension:
    """What a kind of run changes in :func:`run` (the iterative loop and reward-model training
    are two): what it refuses or changes in the settings (and the components it builds from
    them, before any model), its own data module, the module it trains, what it attaches once
    the models exist, the metrics it reports, where it saves, what it adds to the summary."""

    def check(self, settings: RunConfig, objective: Objective) -> RunConfig:
        """Refuse settings this kind of run cannot use (before any model is built); return
        the settings it runs with."""
        if settings.iterate is not None:
            raise ConfigError("iterate: this config sets iterate.*: run it with inspo-iterate")
        return settings

    def datamodule(
        self, settings: RunConfig, tokenizer: Any, objective: Objective
    ) -> PreferenceDataModule:
        return build_datamodule(settings, tokenizer, objective)

    def module(
        self, settings: RunConfig, objective: Objective, tokenizer: Any
    ) -> L.LightningModule:
        return build_module(settings, objective, tokenizer)

    def final_metrics(self, settings: RunConfig, trainer: L.Trainer, train: dict | None) -> dict:
        return final_metrics(trainer, settings.reflection.mode, train)

    def save(self, module: Any, tokenizer: Any, run_dir: Path, trainer: L.Trainer) -> None:
        """Write the trained model (``save_policy=true``): the policy to ``RUN/policy``."""
        save_pretrained(module.policy, tokenizer, run_dir / "policy", trainer)

    def attach(
        self,
        settings: RunConfig,
        module: PreferenceModule,
        datamodule: Any,
        trainer: L.Trainer,
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
    (None: :func:`extension_for` the objective). The composed config ``cfg`` stops here:
    everything below receives typed settings (:mod:`inspo.settings`)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    if not (run_dir / ".hydra").exists():  # composed outside a Hydra app: keep the config too
        (run_dir / ".hydra").mkdir()
        OmegaConf.save(job_cfg, run_dir / ".hydra" / "config.yaml")
    settings, objective, extension = prepare(cfg, extension)  # every bad setting fails here
    if settings.ckpt_path == "last":
        done = finished_summary(run_dir, settings.trainer.max_steps)
        if done is not None:  # resubmitted after it finished (a requeue): nothing to redo
            print(f"{run_dir} finished all {done['steps']} steps already; summary.json kept")
            return done
    L.seed_everything(settings.seed, workers=True)
    model = settings.model
    tokenizer = model_tokenizer(model, settings.paths.cache)  # a GGUF file converts here, once
    datamodule = extension.datamodule(settings, tokenizer, objective)
    datamodule.setup("fit")  # bad data fails before the trainer and the models exist
    if settings.eval.generate and settings.eval.n_prompts > 0:
        from inspo.evaluation.stage import eval_split

        eval_split(datamodule.raw, settings.data)  # not after training: the split it scores
    trainer = build_trainer(settings, cfg.logger, cfg.strategy, run_dir)
    if trainer.is_global_zero:
        print(datamodule.report)
        datamodule.report.save(run_dir / "data_report.json")
    if trainer.logger:
        trainer.logger.log_hyperparams(
            OmegaConf.to_container(job_cfg, resolve=True, enum_to_str=True)
        )
        trainer.logger.log_metrics(datamodule.report.flat_metrics(), step=0)

    module = extension.module(settings, objective, tokenizer)
    cache = settings.paths.cache_dir
    prepare_reference(module, datamodule, settings.reference, model, cache)  # precomputed
    extension.attach(settings, module, datamodule, trainer)
    ckpt = settings.ckpt_path
    if ckpt == "last" and not (run_dir / "checkpoints" / "last.ckpt").exists():
        log.info("ckpt_path=last but no checkpoint in %s: starting fresh", run_dir)
        ckpt = None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    except RunFailure as err:  # diverged or collapsed: the last good checkpoint stays, no policy
        if trainer.is_global_zero:
            metrics = extension.final_metrics(settings, trainer, None)
            write_json(run_dir / "summary.json", summary(settings, trainer, metrics, str(err)))
        raise
    train_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "train/" in k}
    last_val = next(c for c in trainer.callbacks if isinstance(c, LastValidation))
    if datamodule.val_split is not None and last_val.step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)

    metrics = extension.final_metrics(settings, trainer, train_metrics)
    result = summary(settings, trainer, metrics)
    if settings.save_policy:
        extension.save(module, tokenizer, run_dir, trainer)
    # Single-process runs only (a sharded policy cannot generate on one rank): after a
    # multi-device run, evaluate the saved policy with `inspo-eval RUN_DIR`.
    if settings.eval.generate and trainer.world_size == 1:
        from inspo.evaluation.stage import eval_stage

        result["metrics"] |= eval_stage(
            settings, module.policy, tokenizer, result["metrics"], run_dir, trainer.logger
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


class LastValidation(L.Callback):
    """Remembers the global step of the last validation, so a run validates once at its end."""

    step = -1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step
