"""PreferenceModule: a trainable policy, a frozen reference, and a pluggable objective.

Per training step (SPEC §2–4):
    1. one policy forward over every sequence of the policy's view (chosen and rejected rows
       concatenated), giving summed response log-probs and lengths;
    2. one reference forward under ``torch.no_grad()`` (skipped for reference-free objectives,
       reused from the batch when the reference scores were precomputed);
    3. ``objective(PairScores) -> per-pair losses``; the mean is the loss.

The view decides standard vs InSPO: ``plain`` scores y after x, ``reflective`` scores y after
R(x, y'). The objective never knows which one it got.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

from inspo.models.scoring import (
    hidden_sequence_logps,
    sequence_logps,
    shared_prompt_logps,
    split_lm_head,
    split_shared_prompt,
)
from inspo.models.load import freeze, frozen_copy
from inspo.objectives import Objective, ObjectiveOutput, PairScores

log = logging.getLogger(__name__)

Reflection = Literal["off", "inspo", "inspo_one_sided"]
REFLECTIONS = ("off", "inspo", "inspo_one_sided")
CONTEXTS = ("reflective", "plain")


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient: training stops at once, on every process."""


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    scheduler: Literal["constant", "cosine", "linear"] = "constant"


@dataclass
class ViewScores:
    """Summed log-probs and lengths of a view's chosen and rejected rows; all shape [B]."""

    chosen: Tensor
    rejected: Tensor
    chosen_length: Tensor
    rejected_length: Tensor


class PreferenceModule(L.LightningModule):
    """Holds ``policy`` (trained) and ``reference`` (frozen, or None when reference-free).

    Args:
        policy: any causal LM.
        objective: an :class:`~inspo.objectives.Objective`.
        reference: the frozen reference model; None for reference-free objectives or when the
            reference scores come precomputed in the batch.
        reflection: ``off`` (standard form), ``inspo`` (both responses scored in the context of
            the other) or ``inspo_one_sided`` (SPEC §3, eq. 22: only the rejected response,
            after the chosen one, against the reference's plain score).
        reference_context: for InSPO, the reference scores responses in the same reflective
            context (``reflective``) or after the prompt alone (``plain``).
        standard_weight, reflective_weight: L = w_r·L_reflective + w_s·L_standard.
        distill_weight: weight of the token-level KL(stop-grad π(·|R(x,y_l), y<t) ‖
            π(·|x, y<t)) on the chosen response, carrying the reflective behaviour into the
            plain context that inference uses.
    """

    def __init__(
        self,
        policy: PreTrainedModel,
        objective: Objective,
        reference: PreTrainedModel | None = None,
        *,
        reflection: Reflection = "off",
        reference_context: Literal["reflective", "plain"] = "reflective",
        reflective_weight: float = 1.0,
        standard_weight: float = 0.0,
        distill_weight: float = 0.0,
        optim: OptimConfig | None = None,
        logp_chunk: int = 1024,
    ) -> None:
        super().__init__()
        if reflection not in REFLECTIONS:
            raise ValueError(f"unknown reflection {reflection!r}; valid: {', '.join(REFLECTIONS)}")
        if reference_context not in CONTEXTS:
            raise ValueError(
                f"unknown reference.context {reference_context!r}; valid: {', '.join(CONTEXTS)}"
            )
        self.policy = policy
        self.reference = freeze(reference) if reference is not None else None
        self.objective = objective
        self.reflection = reflection
        self.reference_context = reference_context
        self.reflective_weight = reflective_weight
        self.standard_weight = standard_weight if reflection != "off" else 0.0
        self.distill_weight = distill_weight if reflection != "off" else 0.0
        self.optim = optim or OptimConfig()
        self.logp_chunk = logp_chunk
        self._last_reference: ViewScores | None = None

    # ------------------------------------------------------------------ views
    @property
    def policy_view(self) -> str:
        return policy_view(self.reflection)

    @property
    def reference_view(self) -> str:
        return reference_view(self.reflection, self.reference_context)

    def train_views(self) -> tuple[str, ...]:
        """The views a training batch must carry."""
        return train_views(
            self.reflection, self.reference_context, self.objective.requires_reference,
            self.standard_weight, self.distill_weight,
        )  # fmt: skip

    # ------------------------------------------------------------------ scoring
    #: Apply the LM head only at the positions that predict a scored token, on the decoder's
    #: hidden states (inspo.models.scoring.hidden_sequence_logps), when the model allows it
    #: (inspo.models.scoring.split_lm_head). Off: full logits, then chunked log-softmax.
    scored_lm_head: bool = True
    #: Run a pair's shared context once, not twice, when chosen and rejected rows of a view
    #: carry the same context (the plain view): the context's KV cache is reused by both
    #: responses (inspo.models.scoring.shared_prompt_logps). Same numbers, fewer tokens. Needs the
    #: scored-LM-head path and a plain KV cache; off under activation checkpointing.
    share_prompt: bool = True

    def _forward(
        self, model: PreTrainedModel, view: dict[str, Tensor], output: str = "logits"
    ) -> Tensor:
        # Positions count real tokens only, so left- and right-padded rows score the same.
        mask = view["attention_mask"]
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return model(
            input_ids=view["input_ids"],
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=False,
        )[output]

    def score_view(
        self, model: PreTrainedModel, view: dict[str, Tensor], rows: slice | None = None
    ) -> tuple[ViewScores, Tensor | None]:
        """Score every sequence of ``view`` in one forward pass; returns scores and logits
        (None when only the scored positions went through the LM head)."""
        if rows is not None:
            view = {k: v[rows] for k, v in view.items()}
        parts = split_lm_head(model) if self.scored_lm_head and self.distill_weight == 0 else None
        if parts is not None:  # LM head only where a scored token is predicted: no full logits
            logits = None
            scored = self._shared_prompt_scores(*parts, view) if rows is None else None
            if scored is not None:
                sums, counts = scored
            else:
                hidden = self._forward(parts[0], view, output="last_hidden_state")
                sums, counts = hidden_sequence_logps(
                    hidden, parts[1], view["input_ids"], view["loss_mask"]
                )
        else:
            logits = self._forward(model, view)
            sums, counts = sequence_logps(
                logits, view["input_ids"], view["loss_mask"], self.logp_chunk
            )
        n = sums.shape[0]
        half = n // 2 if rows is None else n
        zeros = torch.zeros_like(sums[:half])
        if rows is not None:  # only chosen rows were scored (non-pairwise objectives)
            return ViewScores(sums, zeros, counts, torch.ones_like(counts)), logits
        return ViewScores(sums[:half], sums[half:], counts[:half], counts[half:]), logits

    def _shared_prompt_scores(
        self, decoder: torch.nn.Module, weight: Tensor, view: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor] | None:
        checkpointed = getattr(decoder, "gradient_checkpointing", False) and decoder.training
        if not self.share_prompt or checkpointed:  # checkpointing drops the KV cache
            return None
        split = split_shared_prompt(view)
        return None if split is None else shared_prompt_logps(decoder, weight, split)

    @torch.no_grad()
    def reference_scores(self, batch: dict[str, Any], view: str) -> ViewScores:
        """The reference's scores: precomputed in the batch, or one no-grad forward."""
        pre = batch.get("reference_scores")
        if pre is not None and view in pre:
            return ViewScores(**pre[view])
        if self.reference is None and getattr(self, "adapter_reference", False):
            return self.adapter_disabled_scores(batch[view])
        if self.reference is None:
            raise RuntimeError("this objective needs reference scores but no reference is set")
        self.reference.eval()
        scores, _ = self.score_view(self.reference, batch[view])
        return scores

    @torch.no_grad()
    def adapter_disabled_scores(self, view: dict[str, Tensor]) -> ViewScores:
        """``reference.kind=adapter_disabled``: the LoRA policy's base model (adapter off, eval
        mode) is the reference, so no second copy of the weights is held."""
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self.policy.disable_adapter():
                scores, _ = self.score_view(self.policy, view)
        finally:
            self.policy.train(was_training)
        return scores

    def pair_scores(
        self, policy: ViewScores, reference: ViewScores | None, one_sided: bool = False
    ) -> PairScores:
        zeros = torch.zeros_like(policy.chosen)
        ref = reference or ViewScores(zeros, zeros, policy.chosen_length, policy.rejected_length)
        if one_sided:  # eq. 22: the chosen term is absent, so h = −r(y_l)
            return PairScores(
                zeros, policy.rejected, zeros, ref.rejected, policy.chosen_length,
                policy.rejected_length,
            )  # fmt: skip
        return PairScores(
            policy.chosen, policy.rejected, ref.chosen, ref.rejected,
            policy.chosen_length, policy.rejected_length,
        )  # fmt: skip

    def evaluate_view(
        self, batch: dict[str, Any], policy_view: str, reference_view: str, one_sided: bool = False
    ) -> tuple[ObjectiveOutput, ViewScores, Tensor]:
        """Objective output for the policy scored on one view against the reference on another."""
        rows = (
            None
            if self.objective.pairwise
            else slice(0, batch[policy_view]["input_ids"].shape[0] // 2)
        )
        # The reference's no-grad forward runs first: its activations are freed before the
        # policy's graph is built, so the peak is max(reference, policy), not their sum.
        ref = (
            self.reference_scores(batch, reference_view)
            if self.objective.requires_reference
            else None
        )
        self._last_reference = ref  # for the message when a loss turns out non-finite
        pol, logits = self.score_view(self.policy, batch[policy_view], rows)
        return self.objective(self.pair_scores(pol, ref, one_sided)), pol, logits

    # ------------------------------------------------------------------ steps
    def compute_loss(
        self, batch: dict[str, Any]
    ) -> tuple[Tensor, ObjectiveOutput, ViewScores, dict[str, Tensor]]:
        """The training loss of a batch, with what is needed to log it."""
        one_sided = self.reflection == "inspo_one_sided"
        out, pol, logits = self.evaluate_view(
            batch, self.policy_view, self.reference_view, one_sided
        )
        loss = out.losses.mean()
        if self.reflection != "off":
            loss = self.reflective_weight * loss
        extra = {}
        if self.standard_weight > 0:
            std, *_ = self.evaluate_view(batch, "plain", "plain")
            loss = loss + self.standard_weight * std.losses.mean()
            extra["loss_standard"] = std.losses.detach().mean()
        if self.distill_weight > 0:
            kl = self.distill_kl(batch, logits)
            loss = loss + self.distill_weight * kl
            extra["distill_kl"] = kl.detach()
        return loss, out, pol, extra

    def _step(self, batch: dict[str, Any], stage: str) -> Tensor:
        loss, out, pol, extra = self.compute_loss(batch)
        self.log_pair_metrics(stage, loss, out, pol, extra)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, out, pol, extra = self.compute_loss(batch)
        if not self._finite_everywhere([loss]):
            raise NonFiniteError(
                f"non-finite loss at step {self.global_step} (objective {self.objective!r}); "
                + describe_non_finite(out, pol, self._last_reference)
            )
        self.log_pair_metrics("train", loss, out, pol, extra)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        if not self._finite_everywhere(grads):
            raise NonFiniteError(
                f"non-finite gradient at step {self.global_step} (objective {self.objective!r}) "
                "with a finite loss; the weights were not updated"
            )

    def _finite_everywhere(self, tensors: list[Tensor]) -> bool:
        """True when every tensor is finite on every process (one all-reduce; all processes
        must stop together, or the others wait forever in the next collective)."""
        local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
        ok = torch.stack([torch.isfinite(t).all() for t in local]).all() if local else None
        bad = torch.zeros((), device=self.device) if ok is None else (~ok).float()
        return float(self.trainer.strategy.reduce(bad, reduce_op="sum")) == 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.reflection == "off":
            self._step(batch, "val")
            return
        # Reflective metrics are always the two-sided form, so one-sided runs are comparable.
        out, pol, _ = self.evaluate_view(batch, "reflective", self.reference_view_two_sided)
        self.log_pair_metrics("val", out.losses.mean(), out, pol, {})
        # At inference the model sees the prompt alone (SPEC §3): report that policy too.
        out, pol, _ = self.evaluate_view(batch, "plain", "plain")
        self.log_pair_metrics("val/plain", out.losses.mean(), out, pol, {})

    @property
    def reference_view_two_sided(self) -> str:
        return "reflective" if self.reference_context == "reflective" else "plain"

    def distill_kl(self, batch: dict[str, Any], reflective_logits: Tensor) -> Tensor:
        """Mean token KL(stop-grad teacher ‖ student) on the chosen response tokens.

        Teacher: the policy after R(x, y_l) (the logits of the main forward, detached);
        student: the policy after x alone. Token t of the response is aligned by its rank
        within the response, so the two contexts' different lengths do not matter.
        """
        b = batch["plain"]["input_ids"].shape[0] // 2
        plain = {k: v[:b] for k, v in batch["plain"].items()}
        student = self._forward(self.policy, plain)
        teacher = reflective_logits[:b].detach()
        t_mask = batch["reflective"]["loss_mask"][:b, 1:].bool()
        s_mask = plain["loss_mask"][:, 1:].bool()
        # Keep the first n_i response tokens of each row, n_i the shorter of the two counts.
        n = torch.minimum(t_mask.sum(1), s_mask.sum(1)).unsqueeze(1)
        t_mask = t_mask & (t_mask.cumsum(1) <= n)
        s_mask = s_mask & (s_mask.cumsum(1) <= n)
        t_logp = F.log_softmax(teacher[:, :-1][t_mask].float(), dim=-1)
        s_logp = F.log_softmax(student[:, :-1][s_mask].float(), dim=-1)
        return F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")

    def log_pair_metrics(
        self,
        stage: str,
        loss: Tensor,
        out: ObjectiveOutput,
        pol: ViewScores,
        extra: dict[str, Tensor],
    ) -> None:
        """TRL's metric names under ``stage/``: rewards/*, logps/*, loss."""
        on_step = stage == "train"
        bs = out.losses.shape[0]
        values = {
            "loss": loss.detach(),
            "rewards/chosen": out.chosen_rewards.mean(),
            "rewards/rejected": out.rejected_rewards.mean(),
            "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean(),
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().mean(),
            "logps/chosen": pol.chosen.detach().mean(),
            "logps/rejected": pol.rejected.detach().mean(),
            **{k: v.mean() for k, v in out.metrics.items()},
            **extra,
        }
        for name, value in values.items():
            self.log(
                f"{stage}/{name}",
                value,
                on_step=on_step,
                on_epoch=not on_step,
                prog_bar=name in ("loss", "rewards/accuracies") and stage != "val/plain",
                batch_size=bs,
                sync_dist=not on_step,
            )

    # ------------------------------------------------------------------ optimisation
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        # Free the gradients right after the update (as HF's Trainer does). Lightning would
        # zero them inside the next closure, after the forward: the next forward would then
        # hold a model-sized block of stale gradients on top of its activations.
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
        total = max(int(self.trainer.estimated_stepping_batches), 1)

        def factor(step: int) -> float:
            if step < o.warmup_steps:
                return (step + 1) / o.warmup_steps
            progress = (step - o.warmup_steps) / max(total - o.warmup_steps, 1)
            if o.scheduler == "cosine":
                return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            if o.scheduler == "linear":
                return max(1.0 - progress, 0.0)
            return 1.0

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ sharding (FSDP2)
    def configure_model(self) -> None:
        """FSDP2 under ``hardware=fsdp`` (Lightning's ModelParallelStrategy); a no-op otherwise.

        ``fully_shard`` goes on each decoder layer, then on the root, of the policy and of the
        frozen reference, over the ``data_parallel`` mesh dimension. Idempotent: Lightning calls
        this hook again for ``trainer.validate`` after ``fit``.
        """
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None:  # not under ModelParallelStrategy
            return
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        dp_mesh = mesh["data_parallel"]
        mp = None
        if str(self.trainer.precision).startswith("bf16-mixed"):
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for model in (self.policy, self.reference):
            if model is None or isinstance(model, FSDPModule):
                continue
            for layer in decoder_layers(model):
                fully_shard(layer, mesh=dp_mesh, mp_policy=mp or MixedPrecisionPolicy())
            fully_shard(model, mesh=dp_mesh, mp_policy=mp or MixedPrecisionPolicy())
        if self.reference is not None and not getattr(self, "reference_in_checkpoint", False):
            # Checkpoints hold no ``reference.*`` keys, and the strategy loads the model state
            # before on_load_checkpoint could fill them in.
            self.strict_loading = False

    # ------------------------------------------------------------------ checkpoints
    #: Keep ``reference.*`` in checkpoints: True for ``reference=sync`` (TR-DPO), whose
    #: reference changes during training, so a resumed run continues from the synced weights.
    reference_in_checkpoint: bool = False

    def setup(self, stage: str) -> None:
        # Objectives with running statistics (BCO-pair's δ) average them over all processes.
        strategy = self.trainer.strategy
        self.objective.all_mean = lambda t: strategy.reduce(t, reduce_op="mean")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["objective_state"] = self.objective.state_dict()
        # A frozen reference is rebuilt from its source, so it is not stored (except for sync).
        sd = checkpoint.get("state_dict")
        if sd is not None and not self.reference_in_checkpoint:
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
            self.reference.eval()  # dropout off in the reference, always
        return self


def describe_non_finite(
    out: ObjectiveOutput, policy: ViewScores, reference: ViewScores | None
) -> str:
    """Which inputs of the loss were not finite: policy or reference log-probs, the margin."""
    checks = {
        "policy log-probs of the chosen responses": policy.chosen,
        "policy log-probs of the rejected responses": policy.rejected,
        "the margin z": out.metrics.get("z"),
    }
    if reference is not None:
        checks["reference log-probs of the chosen responses"] = reference.chosen
        checks["reference log-probs of the rejected responses"] = reference.rejected
    bad = [
        f"{name} (pairs {torch.nonzero(~torch.isfinite(t)).flatten().tolist()})"
        for name, t in checks.items()
        if t is not None and not torch.isfinite(t).all()
    ]
    if bad:
        return "not finite: " + "; ".join(bad)
    return (
        "its inputs (policy and reference log-probs, margin) are finite: the objective's own "
        "arithmetic produced it"
    )


def policy_view(reflection: str) -> str:
    """The view the policy is scored on: ``plain`` (standard form) or ``reflective`` (InSPO)."""
    return "plain" if reflection == "off" else "reflective"


def reference_view(reflection: str, reference_context: str) -> str:
    """The view the reference is scored on."""
    if reflection == "inspo_one_sided":
        return "plain"  # eq. 22 compares against S_ref(y_l | x)
    return policy_view(reflection) if reference_context == "reflective" else "plain"


def train_views(
    reflection: str,
    reference_context: str,
    requires_reference: bool,
    standard_weight: float = 0.0,
    distill_weight: float = 0.0,
) -> tuple[str, ...]:
    """The views a training batch must carry; the data module builds exactly these."""
    views = {policy_view(reflection)}
    if requires_reference:
        views.add(reference_view(reflection, reference_context))
    if reflection != "off" and (standard_weight > 0 or distill_weight > 0):
        views.add("plain")  # the standard loss and the distillation student see x alone
    return tuple(v for v in ("reflective", "plain") if v in views)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP shards one by one: modules whose class is in the model's
    ``_no_split_modules`` (the HF convention), else ``model.model.layers``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if not layers:
        layers = list(getattr(getattr(model, "model", None), "layers", None) or ())
    return layers


def make_reference(policy: PreTrainedModel, kind: str, **kwargs: Any) -> PreTrainedModel | None:
    """The reference model for ``reference=kind`` (``policy_init``, ``model``, ``none``,
    ``sync``, ``precomputed``: the model whose scores are cached, see inspo.training.reference)."""
    if kind in ("none", "adapter_disabled"):  # adapter_disabled: the policy's own base model
        return None
    own = kind == "precomputed" and not kwargs.get("name_or_path")  # the initial policy's scores
    if kind in ("policy_init", "sync") or own:
        return frozen_copy(policy)
    if kind in ("model", "precomputed"):
        from inspo.models.load import load_policy

        return freeze(load_policy(**kwargs))
    raise ValueError(
        f"unknown reference kind {kind!r}; valid: policy_init, model, none, sync, precomputed"
    )
