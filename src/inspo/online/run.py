"""An iterative or online run (``inspo-iterate``): an ordinary training run whose training
batches come from :class:`~inspo.online.rounds.Rounds` (each round built by
:class:`~inspo.online.builder.RoundBuilder`, kept by :class:`~inspo.online.store.RoundStore`).

Everything else is :func:`inspo.training.run.run`: the same objective, reflection, reference,
model, hardware and logger groups, the same checkpoints and summary.json (which gains
``rounds``, the per-round metrics also in ``iterate.json``). ``iterate.reference=previous`` is
TR-DPO's synced reference at α = 1 once per round: at each round's start, before its samples
are scored, the reference becomes the policy the last round ended with (kept in checkpoints, so
a resume is exact); the final validation compares the policy with the last round's reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from inspo.config import ConfigError
from inspo.evaluation.stage import EvalConfig, draw, eval_prompts, evaluate, initial_policy
from inspo.names import PLAIN
from inspo.objectives import Objective, RewardObjective
from inspo.online.builder import RoundBuilder
from inspo.online.datamodule import OnlineDataModule
from inspo.online.prompts import check_prompts, pool_rows
from inspo.online.rounds import IterateConfig, RoundEnd, Rounds
from inspo.online.store import RoundStore
from inspo.training.module import PreferenceModule
from inspo.training.reference import ReferenceSync
from inspo.training.run import Extension, build_datamodule, run


class Iterate(Extension):
    """The iterative loop as an extension of a training run."""

    def __init__(self, cfg: DictConfig) -> None:
        settings = OmegaConf.to_container(cfg.iterate, resolve=True)
        settings.pop("prompts")
        self.icfg = IterateConfig(**settings)
        self.rounds: Rounds | None = None
        self.pool: list = []

    def check(self, cfg: DictConfig, objective: Objective) -> None:
        icfg = self.icfg
        if isinstance(objective, RewardObjective):
            raise ConfigError(
                "a reward model trains on fixed pairs: run objective=bradley_terry with inspo-train"
            )
        if cfg.reference.kind == "precomputed":
            raise ConfigError("reference=precomputed needs fixed data; an iterative run has none")
        if cfg.trainer.accumulate_grad_batches != 1:
            raise ConfigError("iterate: trainer.accumulate_grad_batches must be 1")
        if icfg.reference not in ("initial", "previous"):
            raise ConfigError(
                f"iterate.reference must be initial or previous, not {icfg.reference}"
            )
        with open_dict(cfg):
            cfg.trainer.max_steps = icfg.rounds * icfg.steps_per_round
            if icfg.reference == "previous" and objective.requires_reference:
                if cfg.reference.kind != "policy_init":
                    raise ConfigError(
                        "iterate.reference=previous follows the policy: use reference=policy_init"
                        f" (got {cfg.reference.kind})"
                    )
                every = icfg.steps_per_round
                cfg.reference = {"kind": "sync", "sync_every": every, "sync_alpha": 1.0}

    def datamodule(self, cfg: DictConfig, tokenizer: Any, objective: Objective) -> OnlineDataModule:
        dm = build_datamodule(cfg, tokenizer, objective, OnlineDataModule, train_split=None)
        rows = pool_rows(instantiate(prompt_source(cfg)), cfg.data.train_split)
        self.pool = check_prompts(
            rows, tokenizer, cfg.data.max_prompt_length, cfg.data.over_long, dm.report
        )
        return dm

    def attach(
        self, cfg: DictConfig, module: PreferenceModule, datamodule: Any, trainer: L.Trainer
    ) -> None:
        tokenizer = datamodule.tokenizer
        backend = instantiate(cfg.generation)
        backend.bind(module.policy, tokenizer)
        builder = RoundBuilder(
            self.pool,
            backend,
            instantiate(cfg.judge),
            instantiate(cfg.pairing),
            datamodule.encoder,
            datamodule.train_views,
            samples_per_prompt=self.icfg.samples_per_prompt,
            max_prompts_factor=self.icfg.max_prompts_factor,
            seed=cfg.seed,
            share_reference=shares_reference_scores(cfg, module),
        )
        self.rounds = Rounds(
            self.icfg,
            builder,
            RoundStore(Path(HydraConfig.get().runtime.output_dir), self.icfg.save_rounds),
            batch_size=cfg.data.batch_size,
            pad_id=tokenizer.pad_token_id,
            evaluate=round_evaluator(cfg, tokenizer, trainer) if cfg.eval.n_prompts > 0 else None,
            reference_sync=next(
                (c.catch_up for c in trainer.callbacks if isinstance(c, ReferenceSync)), None
            ),
        )
        datamodule.rounds = self.rounds
        # Before the checkpoint callbacks: a checkpoint taken at a round's end holds that round.
        trainer.callbacks.insert(0, RoundEnd(self.rounds))

    def finish(self, result: dict[str, Any]) -> None:
        result["rounds"] = self.rounds.history if self.rounds is not None else []
        result["choices"]["iterate"] = {**vars(self.icfg)}
        result["choices"]["iterate_reference"] = self.icfg.reference  # what reports group by


def prompt_source(cfg: DictConfig) -> DictConfig:
    """Where the prompt pool comes from: ``iterate.prompts``, else the data's own pool
    (``data.prompts``), else the data source itself (its train split's prompts)."""
    for source in (cfg.iterate.get("prompts"), cfg.data.get("prompts")):
        if source is not None:
            return source
    return cfg.data.source


def shares_reference_scores(cfg: DictConfig, module: PreferenceModule) -> bool:
    """Whether the reference's scores of the samples (a round takes them for its KL) can be the
    training batches' reference scores: the reference scores the plain view (the standard form,
    or InSPO with ``reference_context=plain``), and it is not a synced reference, which can move
    while a round trains (``reference=sync`` with any ``sync_every``)."""
    return (
        module.objective.requires_reference
        and module.reference_view == PLAIN
        and cfg.reference.kind != "sync"
    )


def round_evaluator(cfg: DictConfig, tokenizer: Any, trainer: L.Trainer):
    """The per-round evaluation: the policy against the initial policy on the eval prompts, as
    the evaluation stage does (``eval.*``). On one process, or on the first of a data-parallel
    run; a sharded policy cannot sample on one process, so FSDP runs skip it (evaluate their
    saved policies with ``inspo-eval``)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    ecfg = EvalConfig.from_cfg(cfg.eval)
    prompts = eval_prompts(cfg, tokenizer)[: ecfg.n_prompts]
    initial = initial_policy(cfg, tokenizer)
    baseline: list[str] = []  # the initial policy's samples: the same every round

    def evaluate_round(policy: Any, out_dir: Path | None) -> dict[str, float]:
        if isinstance(trainer.strategy, ModelParallelStrategy) or not trainer.is_global_zero:
            return {}
        was_training = policy.training
        try:
            reference = initial.to(next(policy.parameters()).device)
            if not baseline:
                baseline.extend(draw(reference, tokenizer, prompts, ecfg.sampling(), ecfg, "")[1])
            metrics, _ = evaluate(
                policy,
                reference,
                tokenizer,
                prompts,
                ecfg,
                out_dir=out_dir,
                reference_generator="initial",
                reference_samples=baseline,
            )
        finally:
            policy.train(was_training)
        return metrics

    return evaluate_round


def iterate(cfg: DictConfig) -> dict[str, Any]:
    """Run the loop once; returns the summary written to summary.json."""
    return run(cfg, Iterate(cfg))
