"""PreferenceModule: a trainable policy, a frozen reference, and a pluggable objective.

A training step:
    1. the reference's scores of its view: precomputed in the batch, or one no-grad forward
       (skipped for reference-free objectives);
    2. one policy forward over every sequence of its view (chosen and rejected rows together);
    3. ``objective(PairScores) -> per-pair losses``; the loss is their mean, mixed with the
       standard-form loss and the self-distillation term when those weights are set.

The view decides standard vs InSPO (see :mod:`inspo.training.views`); the objective never
knows which one it got.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any

import lightning as L
import torch
from torch import Tensor
from transformers import PreTrainedModel

from inspo.models.load import freeze
from inspo.models.scoring import Scoring, TokenCount, ViewScores, score_pairs, score_sequences
from inspo.models.sharding import shard
from inspo.names import PLAIN, REFERENCE_CONTEXTS, REFLECTIONS, REFLECTIVE, TRAIN, VAL, VAL_PLAIN
from inspo.objectives import Objective, ObjectiveOutput, PairScores
from inspo.training.distill import distill_kl
from inspo.training.guards import NonFiniteError, describe_non_finite, finite_everywhere
from inspo.training.metrics import PROGRESS, pair_metrics, token_metrics
from inspo.training.optim import OptimConfig, build_optimizer
from inspo.training.reference import reference_model
from inspo.training.views import policy_view, reference_view, train_views


class PreferenceModule(L.LightningModule):
    """Holds ``policy`` (trained) and ``reference`` (frozen, or None).

    ``reference`` is None when the objective is reference-free, when its scores are
    precomputed (they come in the batch), and with ``adapter_reference`` (the LoRA policy with
    its adapter off). ``reflection``: ``off``, ``inspo`` (each response scored after the other)
    or ``inspo_one_sided`` (only the rejected one, after the chosen one, against the
    reference's plain score; eq. 22 of the InSPO paper). ``reference_context``: for InSPO, the
    reference scores in the reflective context or after the prompt alone (``plain``).
    L = reflective_weight·L_reflective + standard_weight·L_standard + distill_weight·KL, the
    KL(stop-grad π(·|R(x,y_l), y<t) ‖ π(·|x, y<t)) on the chosen response carrying the
    reflective behaviour into the plain context. ``reference_in_checkpoint``: keep the
    reference in checkpoints (``reference=sync``, whose reference is training state).
    ``optim``: :class:`~inspo.training.optim.OptimConfig` fields; ``scored_lm_head``,
    ``share_prompt``, ``logp_chunk``, ``packing`` (``data.packing``), ``packing_kernel``
    (``data.packing_kernel``): :class:`~inspo.models.scoring.Scoring`.
    """

    def __init__(
        self,
        policy: PreTrainedModel,
        objective: Objective,
        reference: PreTrainedModel | None = None,
        *,
        reflection: str = "off",
        reference_context: str = REFLECTIVE,
        reflective_weight: float = 1.0,
        standard_weight: float = 0.0,
        distill_weight: float = 0.0,
        optim: dict[str, Any] | None = None,
        adapter_reference: bool = False,
        reference_in_checkpoint: bool = False,
        scored_lm_head: bool = True,
        share_prompt: bool = True,
        logp_chunk: int = 1024,
        packing: bool = False,
        packing_kernel: str = "auto",
    ) -> None:
        super().__init__()
        if reflection not in REFLECTIONS:
            raise ValueError(f"unknown reflection {reflection!r}; valid: {', '.join(REFLECTIONS)}")
        if reference_context not in REFERENCE_CONTEXTS:
            valid = ", ".join(REFERENCE_CONTEXTS)
            raise ValueError(f"unknown reference context {reference_context!r}; valid: {valid}")
        self.save_hyperparameters(ignore=["policy", "objective", "reference"])
        self.hparams["objective"] = repr(objective)
        self.policy, self.objective = policy, objective
        self.reference = freeze(reference) if reference is not None else None
        reflective = reflection != "off"
        self.mix = (reflective_weight if reflective else 1.0, standard_weight * reflective)
        self.distill_weight = distill_weight * reflective
        self.optim = OptimConfig(**(optim or {}))
        self.scoring = Scoring(scored_lm_head, share_prompt, logp_chunk, packing, packing_kernel)
        self.policy_view = policy_view(reflection)
        self.reference_view = reference_view(reflection, reference_context)
        self.train_views = train_views(
            reflection,
            objective.requires_reference,
            reference_context,
            standard_weight,
            distill_weight,
        )
        self._last_reference: ViewScores | None = None  # for a non-finite loss's message
        # What the current training step computed, per model ("policy", "reference").
        self.step_tokens: dict[str, TokenCount] = {}

    # ------------------------------------------------------------------ scores and losses
    def score_view(self, model: torch.nn.Module, view: dict[str, Tensor]) -> ViewScores:
        return score_pairs(model, view, self.scoring)[0]

    def _count(self, model: str, tokens: TokenCount | None) -> None:
        if tokens is not None:
            seen = self.step_tokens.get(model)
            self.step_tokens[model] = tokens if seen is None else seen + tokens

    @torch.no_grad()
    def reference_scores(self, batch: dict[str, Any], view: str) -> ViewScores:
        """The reference's scores: precomputed in the batch, or one no-grad forward."""
        pre = batch.get("reference_scores")
        if pre is not None and view in pre:
            return ViewScores(**pre[view])
        with self.reference_model() as reference:
            return self.score_view(reference, batch[view])

    def reference_model(self) -> AbstractContextManager[torch.nn.Module]:
        """The model that scores as π_ref (:func:`inspo.training.reference.reference_model`)."""
        return reference_model(self.policy, self.reference, self.hparams.adapter_reference)

    def evaluate_view(
        self,
        batch: dict[str, Any],
        policy_view: str,
        reference_view: str,
        one_sided: bool = False,
        need_logits: bool = False,
    ) -> tuple[ObjectiveOutput, ViewScores, Tensor | None]:
        """The objective on the policy scored on one view against the reference on another."""
        # The reference's no-grad forward runs first: its activations are freed before the
        # policy's graph is built, so the peak is max(reference, policy), not their sum.
        ref = None
        if self.objective.requires_reference:
            ref = self.reference_scores(batch, reference_view)
            self._count("reference", ref.tokens)
        self._last_reference = ref
        chosen_only = not self.objective.pairwise
        view = batch[policy_view]
        pol, logits = score_pairs(
            self.policy, view, self.scoring, chosen_only=chosen_only, need_logits=need_logits
        )
        self._count("policy", pol.tokens)
        return self.objective(pair_scores(pol, ref, one_sided)), pol, logits

    def compute_loss(
        self, batch: dict[str, Any]
    ) -> tuple[Tensor, ObjectiveOutput, ViewScores, dict[str, Tensor]]:
        """The training loss of a batch, with what is needed to log it."""
        one_sided = self.hparams.reflection == "inspo_one_sided"
        views = (self.policy_view, self.reference_view)
        out, pol, logits = self.evaluate_view(batch, *views, one_sided, self.distill_weight > 0)
        loss, extra = self.mix[0] * out.losses.mean(), {}
        if self.mix[1] > 0:
            std, *_ = self.evaluate_view(batch, PLAIN, PLAIN)
            loss = loss + self.mix[1] * std.losses.mean()
            extra["loss_standard"] = std.losses.detach().mean()
        if self.distill_weight > 0:  # teacher: the reflective logits; student: plain context
            n, plain = pol.chosen.shape[0], batch[PLAIN]
            chosen = {k: v[:n] for k, v in plain.items()}
            how = replace(self.scoring, share_prompt=False)  # chosen rows only: no pairs
            scored = score_sequences(self.policy, chosen, how, need_logits=True)
            student = scored.logits
            self._count("policy", scored.tokens)
            teacher_mask = batch[self.policy_view]["loss_mask"][:n]
            kl = distill_kl(logits[:n], teacher_mask, student, plain["loss_mask"][:n])
            loss = loss + self.distill_weight * kl
            extra["distill_kl"] = kl.detach()
        return loss, out, pol, extra

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self.step_tokens = {}
        loss, out, pol, extra = self.compute_loss(batch)
        if not finite_everywhere([loss], self.trainer.strategy, self.device):
            reason = describe_non_finite(out, pol, self._last_reference)
            where = f"step {self.global_step} (objective {self.objective!r})"
            raise NonFiniteError(f"non-finite loss at {where}; {reason}")
        values = pair_metrics(loss, out, pol, extra) | token_metrics(self.step_tokens)
        self.log_metrics(TRAIN, values, out.losses.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.hparams.reflection == "off":
            loss, out, pol, extra = self.compute_loss(batch)
            self.log_metrics(VAL, pair_metrics(loss, out, pol, extra), out.losses.shape[0])
            return
        # Reflective metrics are always the two-sided form, so one-sided runs are comparable.
        context = self.hparams.reference_context
        for stage, views in ((VAL, (REFLECTIVE, context)), (VAL_PLAIN, (PLAIN, PLAIN))):
            out, pol, _ = self.evaluate_view(batch, *views)
            values = pair_metrics(out.losses.mean(), out, pol, {})
            self.log_metrics(stage, values, out.losses.shape[0])

    def log_metrics(self, stage: str, values: dict[str, Tensor], batch_size: int) -> None:
        """``stage/name``: per step in training, epoch means (synced) in validation."""
        on_step = stage == TRAIN
        kw = {"on_step": on_step, "on_epoch": not on_step, "batch_size": batch_size}
        for name, value in values.items():
            shown = name in PROGRESS and stage != VAL_PLAIN
            self.log(f"{stage}/{name}", value, prog_bar=shown, sync_dist=not on_step, **kw)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        if not finite_everywhere(grads, self.trainer.strategy, self.device):
            raise NonFiniteError(
                f"non-finite gradient at step {self.global_step} (objective {self.objective!r}) "
                "with a finite loss; the weights were not updated"
            )

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return build_optimizer(params, self.optim, self.trainer.estimated_stepping_batches)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        # Free the gradients right after the update (as HF's Trainer does). Lightning would
        # zero them inside the next closure, after the forward: the next forward would then
        # hold a model-sized block of stale gradients on top of its activations.
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ lifecycle
    def setup(self, stage: str) -> None:
        # Objectives with running statistics (BCO-pair's δ) average them over all processes.
        strategy = self.trainer.strategy
        self.objective.all_mean = lambda t: strategy.reduce(t, reduce_op="mean")

    def configure_model(self) -> None:
        """FSDP2 under ``hardware=fsdp`` (Lightning's ModelParallelStrategy); else a no-op."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None:
            return
        shard([self.policy, self.reference], mesh, str(self.trainer.precision).startswith("bf16"))
        if self.reference is not None and not self.hparams.reference_in_checkpoint:
            # Checkpoints hold no reference.* keys, and the strategy loads the model state
            # before on_load_checkpoint could fill them in.
            self.strict_loading = False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["objective_state"] = self.objective.state_dict()
        sd = checkpoint.get("state_dict")
        if sd is not None and not self.hparams.reference_in_checkpoint:
            for key in [k for k in sd if k.startswith("reference.")]:
                del sd[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.objective.load_state_dict(checkpoint.get("objective_state", {}))
        sd = checkpoint.get("state_dict")
        if sd is not None and self.reference is not None:
            for key, value in self.reference.state_dict().items():
                sd.setdefault(f"reference.{key}", value)

    def train(self, mode: bool = True) -> PreferenceModule:
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # dropout and batch statistics off in the reference, always
        return self


def pair_scores(policy: ViewScores, reference: ViewScores | None, one_sided: bool) -> PairScores:
    """The objective's inputs; zeros stand in for an absent reference. One-sided (eq. 22 of the
    InSPO paper): the chosen term is absent, so h = −r(y_l)."""
    zeros = torch.zeros_like(policy.chosen)
    ref = reference or ViewScores(zeros, zeros, policy.chosen_length, policy.rejected_length)
    chosen, ref_chosen = (zeros, zeros) if one_sided else (policy.chosen, ref.chosen)
    lengths = (policy.chosen_length, policy.rejected_length)
    return PairScores(chosen, policy.rejected, ref_chosen, ref.rejected, *lengths)
