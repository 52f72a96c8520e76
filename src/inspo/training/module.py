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
from typing import Any, NamedTuple

import lightning as L
import torch
from torch import Tensor
from transformers import PreTrainedModel

from inspo.models.load import freeze
from inspo.models.scoring import (
    Scoring,
    TokenCount,
    ViewScores,
    prepare_packing,
    score_pairs,
    score_sequences,
)
from inspo.models.sharding import shard
from inspo.names import PLAIN, REFLECTIVE, TRAIN, VAL, VAL_PLAIN, Reflection
from inspo.objectives import Objective, ObjectiveOutput, PairScores
from inspo.settings import OptimConfig, ReflectionConfig, as_dict
from inspo.training.distill import distill_kl
from inspo.training.guards import (
    NonFiniteError,
    check_gradients,
    describe_non_finite,
    finite_everywhere,
)
from inspo.training.metrics import PROGRESS, pair_metrics, token_metrics
from inspo.training.optim import build_optimizer
from inspo.training.reference import reference_model
from inspo.training.views import policy_view, reference_view, train_views

DEFAULT_SCORING = Scoring()


class Term(NamedTuple):
    """One term of the loss: the objective on the policy scored on one view against the
    reference scored on another (None without a reference), and the policy's logits when
    asked for."""

    output: ObjectiveOutput
    policy: ViewScores
    reference: ViewScores | None
    logits: Tensor | None = None


class StepLoss(NamedTuple):
    """A batch's training loss, the trained view's output and policy scores (what is logged),
    ``extra`` (the loss mix's other terms, logged by name) and every term by name
    (``trained``, and ``standard`` when the standard-form loss is mixed in)."""

    loss: Tensor
    output: ObjectiveOutput
    policy: ViewScores
    extra: dict[str, Tensor]
    terms: dict[str, Term]


class LossWeights(NamedTuple):
    """L = trained·L_trained + standard·L_standard + distill·KL (see :class:`PreferenceModule`)."""

    trained: float
    standard: float
    distill: float

    @classmethod
    def of(cls, r: ReflectionConfig) -> LossWeights:
        """Reflective runs weigh their terms as ``reflection`` says; the standard form trains
        its one loss."""
        if not r.reflective:
            return cls(1.0, 0.0, 0.0)
        return cls(r.reflective_weight, r.standard_weight, r.distill_weight)


class PreferenceModule(L.LightningModule):
    """Holds ``policy`` (trained) and ``reference`` (frozen, or None).

    ``reference`` is None when the objective is reference-free, when its scores are
    precomputed (they come in the batch), and with ``adapter_reference`` (the LoRA policy with
    its adapter off). ``reflection`` (:class:`~inspo.settings.ReflectionConfig`): ``mode``
    ``off``, ``inspo`` (each response scored after the other) or ``inspo_one_sided`` (only the
    rejected one, after the chosen one, against the reference's plain score; eq. 22 of the
    InSPO paper); ``reference_context``: for InSPO, the reference scores in the reflective
    context or after the prompt alone (``plain``); the loss weights
    L = reflective_weight·L_reflective + standard_weight·L_standard + distill_weight·KL, the
    KL(stop-grad π(·|R(x,y_l), y<t) ‖ π(·|x, y<t)) on the chosen response carrying the
    reflective behaviour into the plain context. ``optim``:
    :class:`~inspo.settings.OptimConfig`. ``reference_in_checkpoint``: keep the reference in
    checkpoints (``reference=sync``, whose reference is training state). ``scoring``:
    :class:`~inspo.models.scoring.Scoring`; with ``scoring.packing`` (``data.packing``) the
    policy and the reference are switched to packed rows here (:func:`prepare_packing`).
    """

    def __init__(
        self,
        policy: PreTrainedModel,
        objective: Objective,
        reference: PreTrainedModel | None = None,
        *,
        reflection: ReflectionConfig | None = None,
        optim: OptimConfig | None = None,
        adapter_reference: bool = False,
        reference_in_checkpoint: bool = False,
        scoring: Scoring = DEFAULT_SCORING,
    ) -> None:
        super().__init__()
        self.reflection = reflection = reflection or ReflectionConfig(mode=Reflection.off)
        self.optim = optim or OptimConfig()
        # Plain values only: a checkpoint's hyper-parameters load with weights_only.
        self.save_hyperparameters(
            {
                "objective": repr(objective),
                "reflection": str(reflection.mode),
                "reference_context": str(reflection.reference_context),
                "adapter_reference": adapter_reference,
                "reference_in_checkpoint": reference_in_checkpoint,
                "settings": as_dict(reflection) | {"optim": as_dict(self.optim)},
            }
        )
        self.policy, self.objective = policy, objective
        self.reference = freeze(reference) if reference is not None else None
        self.weights = LossWeights.of(reflection)
        if scoring.packing:  # each model packs only if it can (else one warning, padded)
            for model in (policy, self.reference):
                if model is not None:
                    prepare_packing(model)
        self.scoring = scoring
        self.policy_view = policy_view(reflection.mode)
        self.reference_view = reference_view(reflection.mode, reflection.reference_context)
        self.train_views = train_views(
            reflection.mode,
            objective.requires_reference,
            reflection.reference_context,
            self.weights.standard,
            self.weights.distill,
        )
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
    ) -> Term:
        """The objective on the policy scored on one view against the reference on another."""
        # The reference's no-grad forward runs first: its activations are freed before the
        # policy's graph is built, so the peak is max(reference, policy), not their sum.
        ref = None
        if self.objective.requires_reference:
            ref = self.reference_scores(batch, reference_view)
            self._count("reference", ref.tokens)
        chosen_only = not self.objective.pairwise
        view = batch[policy_view]
        pol, logits = score_pairs(
            self.policy, view, self.scoring, chosen_only=chosen_only, need_logits=need_logits
        )
        self._count("policy", pol.tokens)
        return Term(self.objective(pair_scores(pol, ref, one_sided)), pol, ref, logits)

    def compute_loss(self, batch: dict[str, Any]) -> StepLoss:
        """The training loss of a batch, with what is needed to log it."""
        one_sided = self.reflection.mode is Reflection.inspo_one_sided
        views = (self.policy_view, self.reference_view)
        w = self.weights
        trained = self.evaluate_view(batch, *views, one_sided, w.distill > 0)
        terms, extra = {"trained": trained}, {}
        loss = w.trained * trained.output.losses.mean()
        if w.standard > 0:
            terms["standard"] = std = self.evaluate_view(batch, PLAIN, PLAIN)
            loss = loss + w.standard * std.output.losses.mean()
            extra["loss_standard"] = std.output.losses.detach().mean()
        if w.distill > 0:  # teacher: the reflective logits; student: plain context
            pol, plain = trained.policy, batch[PLAIN]
            n = pol.chosen.shape[0]
            chosen = {k: v[:n] for k, v in plain.items()}
            how = replace(self.scoring, share_prompt=False)  # chosen rows only: no pairs
            scored = score_sequences(self.policy, chosen, how, need_logits=True)
            self._count("policy", scored.tokens)
            teacher_mask = batch[self.policy_view]["loss_mask"][:n]
            kl = distill_kl(trained.logits[:n], teacher_mask, scored.logits, plain["loss_mask"][:n])
            loss = loss + w.distill * kl
            extra["distill_kl"] = kl.detach()
        return StepLoss(loss, trained.output, trained.policy, extra, terms)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self.step_tokens = {}
        step = self.compute_loss(batch)
        if not finite_everywhere([step.loss], self.trainer.strategy, self.device):
            where = f"step {self.global_step} (objective {self.objective!r})"
            raise NonFiniteError(f"non-finite loss at {where}; {describe_terms(step.terms)}")
        values = pair_metrics(step.loss, step.output, step.policy, step.extra)
        values |= token_metrics(self.step_tokens)
        self.log_metrics(TRAIN, values, step.output.losses.shape[0])
        return step.loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if not self.reflection.reflective:
            step = self.compute_loss(batch)
            values = pair_metrics(step.loss, step.output, step.policy, step.extra)
            self.log_metrics(VAL, values, step.output.losses.shape[0])
            return
        # Reflective metrics are always the two-sided form, so one-sided runs are comparable.
        context = self.reflection.reference_context
        for stage, views in ((VAL, (REFLECTIVE, context)), (VAL_PLAIN, (PLAIN, PLAIN))):
            term = self.evaluate_view(batch, *views)
            out = term.output
            values = pair_metrics(out.losses.mean(), out, term.policy, {})
            self.log_metrics(stage, values, out.losses.shape[0])

    def log_metrics(self, stage: str, values: dict[str, Tensor], batch_size: int) -> None:
        """``stage/name``: per step in training, epoch means (synced) in validation."""
        on_step = stage == TRAIN
        kw = {"on_step": on_step, "on_epoch": not on_step, "batch_size": batch_size}
        for name, value in values.items():
            shown = name in PROGRESS and stage != VAL_PLAIN
            self.log(f"{stage}/{name}", value, prog_bar=shown, sync_dist=not on_step, **kw)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        check_gradients(self.policy, self, self.objective)

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


def describe_terms(terms: dict[str, Term]) -> str:
    """Which loss term was not finite, and which of its inputs (each term with its own
    reference scores)."""
    bad = {k: t for k, t in terms.items() if not torch.isfinite(t.output.losses).all()}
    return "; ".join(
        f"{name} term: {describe_non_finite(t.output, t.policy, t.reference)}"
        for name, t in (bad or terms).items()
    )


def pair_scores(policy: ViewScores, reference: ViewScores | None, one_sided: bool) -> PairScores:
    """The objective's inputs; zeros stand in for an absent reference. One-sided (eq. 22 of the
    InSPO paper): the chosen term is absent, so h = −r(y_l)."""
    zeros = torch.zeros_like(policy.chosen)
    ref = reference or ViewScores(zeros, zeros, policy.chosen_length, policy.rejected_length)
    chosen, ref_chosen = (zeros, zeros) if one_sided else (policy.chosen, ref.chosen)
    lengths = (policy.chosen_length, policy.rejected_length)
    return PairScores(chosen, policy.rejected, ref_chosen, ref.rejected, *lengths)
