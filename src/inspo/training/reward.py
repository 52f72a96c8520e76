"""Reward-model training: ``inspo-train objective=bradley_terry`` (or ``experiment=reward_model``).

The same run as preference training (data sources and formats, chat templates, packing,
logging, checkpoints and resume, hardware), with a reward model in place of the policy:

    1. the batch's plain view (x + y_w rows, then x + y_l rows) runs through the reward model,
       each row's reward read at its last token (:func:`inspo.models.reward.score_rewards`);
    2. the objective (:class:`~inspo.objectives.BradleyTerry`) maps the chosen and rejected
       rewards, and the data's ``margin`` column when it has one, to per-pair losses.

It logs TRL ``RewardTrainer``'s metrics (``accuracy``, ``margin``, ``mean_reward``,
``min_reward``, ``max_reward``) and ``std_reward``: per step under ``train/``, over the whole
validation split under ``val/``. The trained model is saved to ``RUN/reward_model/`` as an
ordinary ``AutoModelForSequenceClassification`` checkpoint with its tokenizer, which
``judge=reward_model judge.name_or_path=RUN/reward_model`` and ``eval.scorer=RUN/reward_model``
load as they are.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from transformers import PreTrainedModel

from inspo.config import ConfigError
from inspo.models.reward import load_reward_model, score_rewards
from inspo.models.scoring import Scoring, prepare_packing
from inspo.models.sharding import shard
from inspo.names import (
    ACCURACY,
    LOSS,
    MARGIN,
    MARGIN_COLUMN,
    MAX_REWARD,
    MEAN_REWARD,
    MIN_REWARD,
    PLAIN,
    PLAIN_ACCURACY,
    REWARD_ACCURACY,
    STD_REWARD,
    TRAIN,
    VAL,
    ReferenceKind,
)
from inspo.objectives import RewardObjective
from inspo.settings import OptimConfig, RunConfig, as_dict
from inspo.training.guards import NonFiniteError, check_gradients, finite_everywhere
from inspo.training.metrics import token_metrics
from inspo.training.module import DEFAULT_SCORING
from inspo.training.optim import build_optimizer
from inspo.training.run import Extension, save_pretrained

#: Shown in the progress bar.
PROGRESS = (LOSS, ACCURACY)
#: Where the trained reward model is saved, in the run folder.
SAVED_AS = "reward_model"


def reward_metrics(losses: Tensor, chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    """The loss (mean of the per-pair losses), the share of pairs whose chosen reward is the
    higher (``accuracy``), the mean chosen − rejected reward (``margin``) and the mean, std,
    min and max over every reward of the pairs, chosen and rejected."""
    rewards = torch.cat([chosen, rejected]).detach()
    return {
        LOSS: losses.detach().mean(),
        ACCURACY: (chosen > rejected).float().mean(),
        MARGIN: (chosen - rejected).detach().mean(),
        MEAN_REWARD: rewards.mean(),
        STD_REWARD: rewards.std(unbiased=False),
        MIN_REWARD: rewards.min(),
        MAX_REWARD: rewards.max(),
    }


class RewardModule(L.LightningModule):
    """Holds ``reward_model`` (trained) and a :class:`~inspo.objectives.RewardObjective`.

    ``optim``: :class:`~inspo.settings.OptimConfig`; ``scoring``: with ``scoring.packing``
    (``data.packing``) each batch's rows run as one sequence without padding, the model
    switched to packed rows here (:func:`~inspo.models.scoring.prepare_packing`), their
    attention computed by ``scoring.packing_kernel`` (``data.packing_kernel``).
    """

    def __init__(
        self,
        reward_model: PreTrainedModel,
        objective: RewardObjective,
        *,
        optim: OptimConfig | None = None,
        scoring: Scoring = DEFAULT_SCORING,
    ) -> None:
        super().__init__()
        self.optim = optim or OptimConfig()
        # Plain values only: a checkpoint's hyper-parameters load with weights_only.
        self.save_hyperparameters({"objective": repr(objective), "optim": as_dict(self.optim)})
        self.reward_model, self.objective = reward_model, objective
        if scoring.packing:
            prepare_packing(reward_model)
        self.scoring = scoring
        self._val: list[tuple[Tensor, Tensor, Tensor]] = []

    def rewards(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """Rewards of the batch's chosen and rejected rows [B], their per-pair losses, and the
        tokens the forward computed."""
        rewards, tokens = score_rewards(self.reward_model, batch[PLAIN], self.scoring)
        n = rewards.shape[0] // 2
        chosen, rejected = rewards[:n], rewards[n:]
        losses = self.objective(chosen, rejected, batch.get(MARGIN_COLUMN))
        return chosen, rejected, losses, token_metrics({"reward_model": tokens})

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        chosen, rejected, losses, tokens = self.rewards(batch)
        loss = losses.mean()
        if not finite_everywhere([loss], self.trainer.strategy, self.device):
            raise NonFiniteError(
                f"non-finite loss at step {self.global_step} (objective {self.objective!r}); "
                f"rewards finite: {bool(torch.isfinite(torch.cat([chosen, rejected])).all())}"
            )
        values = reward_metrics(losses, chosen, rejected) | tokens
        for name, value in values.items():
            self.log(f"{TRAIN}/{name}", value, prog_bar=name in PROGRESS, batch_size=len(losses))
        return loss

    # Validation metrics are over the whole split (gathered from every process), not means of
    # per-batch values: the std and the extremes of a split are not means of its batches'.
    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        chosen, rejected, losses, _ = self.rewards(batch)
        self._val.append((chosen.detach(), rejected.detach(), losses.detach()))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        chosen, rejected, losses = (torch.cat(t) for t in zip(*self._val, strict=True))
        if self.trainer.world_size > 1:
            gathered = (self.all_gather(t).flatten() for t in (chosen, rejected, losses))
            chosen, rejected, losses = gathered
        for name, value in reward_metrics(losses, chosen, rejected).items():
            self.log(f"{VAL}/{name}", value, prog_bar=name in PROGRESS)
        self._val = []

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        check_gradients(self.reward_model, self, self.objective)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.reward_model.parameters() if p.requires_grad]
        return build_optimizer(params, self.optim, self.trainer.estimated_stepping_batches)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        # Gradients freed right after the update, as in PreferenceModule.
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def configure_model(self) -> None:
        """FSDP2 under ``hardware=fsdp``; else a no-op."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None:
            bf16 = str(self.trainer.precision).startswith("bf16")
            shard([self.reward_model], mesh, bf16)


class RewardModelRun(Extension):
    """What a reward objective changes in :func:`inspo.training.run.run`: the model and module
    it trains, the metrics it reports and where it saves."""

    def check(self, settings: RunConfig, objective: Any) -> RunConfig:
        if settings.iterate is not None:
            raise ConfigError("iterate: a reward model trains on fixed pairs; use inspo-train")
        if settings.reflection.reflective:
            raise ConfigError(
                "reflection: a reward model is trained on the plain view: set reflection=off"
            )
        if settings.reference.kind not in (ReferenceKind.none, ReferenceKind.auto):
            raise ConfigError("reference: a reward model has no reference: set reference=none")
        if settings.model.lora is not None:
            raise ConfigError("model.lora: a reward model trains all its weights")
        if settings.eval.generate:
            raise ConfigError(
                "eval.generate: a reward model does not generate; use it as a judge "
                f"(judge=reward_model judge.name_or_path=RUN/{SAVED_AS}) or as eval.scorer"
            )
        if settings.optimized_metric == PLAIN_ACCURACY:  # the preference default: not logged here
            return dataclasses.replace(settings, optimized_metric=REWARD_ACCURACY)
        return settings

    def module(self, settings: RunConfig, objective: Any, tokenizer: Any) -> RewardModule:
        data = settings.data
        return RewardModule(
            load_reward_model(settings.model, tokenizer, settings.paths.cache),
            objective,
            optim=settings.optim,
            scoring=Scoring(packing=data.packing, packing_kernel=str(data.packing_kernel)),
        )

    def final_metrics(self, settings: RunConfig, trainer: L.Trainer, train: dict | None) -> dict:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        return {**(train or {}), **metrics}

    def save(self, module: Any, tokenizer: Any, run_dir: Path, trainer: L.Trainer) -> None:
        save_pretrained(module.reward_model, tokenizer, run_dir / SAVED_AS, trainer)
