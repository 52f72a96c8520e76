"""An iterative or online run (``inspo-iterate``): an ordinary training run whose training
batches come from :class:`~inspo.online.rounds.Rounds` (each round built by
:class:`~inspo.online.builder.RoundBuilder`, kept by :class:`~inspo.online.store.RoundStore`).

Everything else is :func:`inspo.training.run.run`: the same objective, reflection, reference,
model, hardware and logger groups, the same checkpoints and summary.json (which gains
``rounds``, the per-round metrics also in ``iterate.json``). ``iterate.reference=previous`` is
TR-DPO's synced reference at α = 1 once per round: at each round's start, before its samples
are scored, the reference becomes the policy the last round ended with (kept in checkpoints, so
a resume is exact); the final validation compares the policy with the last round's reference.

Like :mod:`inspo.training.run`, this is a run's assembly: the generation backend, the judge and
the pairing are built here from their configs (before any model, so a bad value fails first),
and everything below receives them and typed settings.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from inspo.config import ConfigError, build, check_judge_fits, check_scorer_fits
from inspo.evaluation.stage import draw, eval_prompts, evaluate, initial_policy, save
from inspo.names import PLAIN, IterateReference, ReferenceKind
from inspo.objectives import Objective, RewardObjective
from inspo.online.builder import RoundBuilder
from inspo.online.datamodule import OnlineDataModule
from inspo.online.prompts import check_prompts, pool_rows
from inspo.online.rounds import RoundEnd, Rounds
from inspo.online.store import RoundStore
from inspo.settings import EvalConfig, ReferenceConfig, RunConfig, as_dict
from inspo.training.module import PreferenceModule
from inspo.training.reference import ReferenceSync
from inspo.training.run import Extension, build_datamodule, run


class Iterate(Extension):
    """The iterative loop as an extension of a training run."""

    def __init__(self) -> None:
        self.rounds: Rounds | None = None
        self.pool: list = []
        self.components: dict[str, Any] = {}
        self.settings: RunConfig | None = None

    def check(self, settings: RunConfig, objective: Objective) -> RunConfig:
        it = settings.iterate
        if it is None:
            raise ConfigError("iterate: missing; inspo-iterate composes conf/iterate.yaml")
        if isinstance(objective, RewardObjective):
            raise ConfigError(
                "objective: a reward model trains on fixed pairs: run objective=bradley_terry "
                "with inspo-train"
            )
        if settings.reference.kind is ReferenceKind.precomputed:
            raise ConfigError("reference: precomputed needs fixed data; an iterative run has none")
        if settings.trainer.accumulate_grad_batches != 1:
            raise ConfigError("trainer.accumulate_grad_batches: must be 1 in an iterative run")
        every = settings.checkpoint.every_n_train_steps
        if not it.save_rounds and every % it.steps_per_round:
            # A checkpoint inside a round could not resume: the policy that sampled the
            # round is gone, and without its folder nothing else holds the round's pairs.
            raise ConfigError(
                f"checkpoint.every_n_train_steps={every}: with iterate.save_rounds=false it must"
                f" be a multiple of iterate.steps_per_round={it.steps_per_round}, so that every"
                " checkpoint falls between rounds (or keep iterate.save_rounds=true)"
            )
        if settings.eval.n_prompts > 0:  # every round is evaluated on the data's prompts
            check_scorer_fits(settings.data.source, settings.eval.scorer, "or eval.n_prompts=0")
        check_judge_fits(prompt_source(settings), settings.judge)
        # Built now, before any model: a bad generation, judge or pairing value fails here.
        self.components = {
            key: build(getattr(settings, key), key) for key in ("generation", "judge", "pairing")
        }
        trainer = dataclasses.replace(settings.trainer, max_steps=it.total_steps)
        reference = settings.reference
        if it.reference is IterateReference.previous and objective.requires_reference:
            if reference.kind is not ReferenceKind.policy_init:
                raise ConfigError(
                    "iterate.reference: previous follows the policy: use reference=policy_init"
                    f" (got {reference.kind})"
                )
            every = it.steps_per_round
            reference = ReferenceConfig(kind=ReferenceKind.sync, sync_every=every, sync_alpha=1.0)
        self.settings = dataclasses.replace(settings, trainer=trainer, reference=reference)
        return self.settings

    def datamodule(
        self, settings: RunConfig, tokenizer: Any, objective: Objective
    ) -> OnlineDataModule:
        dm = build_datamodule(settings, tokenizer, objective, OnlineDataModule, train=False)
        data = settings.data
        # Called, not instantiated: a source's own error (a missing file) reaches the user as is.
        rows = pool_rows(instantiate(prompt_source(settings), _partial_=True)(), data.train_split)
        self.pool = check_prompts(
            rows, tokenizer, data.max_prompt_length, data.over_long, dm.report
        )
        return dm

    def attach(
        self,
        settings: RunConfig,
        module: PreferenceModule,
        datamodule: Any,
        trainer: L.Trainer,
    ) -> None:
        it, tokenizer = settings.iterate, datamodule.tokenizer
        backend = self.components["generation"]
        backend.bind(module.policy, tokenizer)
        builder = RoundBuilder(
            self.pool,
            backend,
            self.components["judge"].to(trainer.strategy.root_device),  # a model judge runs there
            self.components["pairing"],
            datamodule.encoder,
            datamodule.train_views,
            samples_per_prompt=it.samples_per_prompt,
            max_prompts_factor=it.max_prompts_factor,
            seed=settings.seed,
            share_reference=shares_reference_scores(settings.reference, module),
        )
        evaluator = None
        if settings.eval.n_prompts > 0:
            evaluator = round_evaluator(settings, datamodule.source, tokenizer, trainer)
        self.rounds = Rounds(
            it,
            builder,
            RoundStore(Path(HydraConfig.get().runtime.output_dir), it.save_rounds),
            batch_size=settings.data.batch_size,
            pad_id=tokenizer.pad_token_id,
            evaluate=evaluator,
            reference_sync=next(
                (c.catch_up for c in trainer.callbacks if isinstance(c, ReferenceSync)), None
            ),
        )
        datamodule.rounds = self.rounds
        # Before the checkpoint callbacks: a checkpoint taken at a round's end holds that round.
        trainer.callbacks.insert(0, RoundEnd(self.rounds))

    def final_metrics(self, settings: RunConfig, trainer: L.Trainer, train: dict | None) -> dict:
        """The run's final metrics with the last round's own (its samples' and its evaluation's)
        as the round recorded them: a validation after the last step clears the logged copies
        (and those are float32 roundings), and the evaluation is what a sweeper optimises."""
        metrics = super().final_metrics(settings, trainer, train)
        if self.rounds is not None and self.rounds.history:
            last = max(self.rounds.history, key=lambda h: h["round"])
            metrics.update(
                {k: v for k, v in last.items() if k != "round" and not k.startswith("time/")}
            )
        return metrics

    def finish(self, result: dict[str, Any]) -> None:
        it = self.settings.iterate
        result["rounds"] = self.rounds.history if self.rounds is not None else []
        recorded = {k: v for k, v in as_dict(it).items() if k != "prompts"}
        result["choices"]["iterate"] = recorded
        result["choices"]["iterate_reference"] = str(it.reference)  # what reports group by


def prompt_source(settings: RunConfig) -> Any:
    """Where the prompt pool comes from: ``iterate.prompts``, else the data's own pool
    (``data.prompts``), else the data source itself (its train split's prompts)."""
    for source in (settings.iterate.prompts, settings.data.prompts):
        if source is not None:
            return source
    return settings.data.source


def shares_reference_scores(reference: ReferenceConfig, module: PreferenceModule) -> bool:
    """Whether the reference's scores of the samples (a round takes them for its KL) can be the
    training batches' reference scores: the reference scores the plain view (the standard form,
    or InSPO with ``reference_context=plain``), and it is not a synced reference, which can move
    while a round trains (``reference=sync`` with any ``sync_every``)."""
    return (
        module.objective.requires_reference
        and module.reference_view == PLAIN
        and reference.kind is not ReferenceKind.sync
    )


def round_evaluator(settings: RunConfig, source: Any, tokenizer: Any, trainer: L.Trainer):
    """The per-round evaluation: the policy against the initial policy on the eval prompts, as
    the evaluation stage does (``eval.*``). On one process, or on the first of a data-parallel
    run; a sharded policy cannot sample on one process, so FSDP runs skip it (evaluate their
    saved policies with ``inspo-eval``)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    ecfg: EvalConfig = settings.eval
    prompts = eval_prompts(source, settings.data, tokenizer)[: ecfg.n_prompts]
    initial = initial_policy(settings.model, tokenizer, settings.paths.cache)
    baseline: list[str] = []  # the initial policy's samples: the same every round

    def evaluate_round(policy: Any, out_dir: Path | None) -> dict[str, float]:
        if isinstance(trainer.strategy, ModelParallelStrategy) or not trainer.is_global_zero:
            return {}
        was_training = policy.training
        try:
            reference = initial.to(next(policy.parameters()).device)
            if not baseline:
                baseline.extend(draw(reference, tokenizer, prompts, ecfg, "")[1])
            ev = evaluate(policy, reference, tokenizer, prompts, ecfg, reference_samples=baseline)
            if out_dir is not None:
                device = next(policy.parameters()).device
                save(ev, out_dir, ecfg, device, reference_generator="initial")
        finally:
            policy.train(was_training)
        return ev.metrics

    return evaluate_round


def iterate(cfg: DictConfig) -> dict[str, Any]:
    """Run the loop once; returns the summary written to summary.json."""
    return run(cfg, Iterate())
