"""Every name that more than one module uses, defined once: views, modes, kinds, metric names.

Metric names follow TRL where TRL has the quantity (``rewards/margins``, ``logps/chosen``,
``objective/scores``), so curves line up with what researchers already read.
"""

from __future__ import annotations

from enum import Enum


# --------------------------------------------------------------------------- choices
class Choice(str, Enum):
    """A setting's closed set of values. Members are strings (``Reflection.off == "off"``), so
    configs, JSON and file names hold the plain value; Hydra checks a composed value against the
    members (by name, so each member's name is its value)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def valid(cls) -> str:
        return ", ".join(m.value for m in cls)


# --------------------------------------------------------------------------- views of a pair
# plain: y after x (the standard form, and the policy at inference); reflective: y after
# R(x, y'), the prompt and the other response (InSPO).
PLAIN = "plain"
REFLECTIVE = "reflective"
VIEWS = (REFLECTIVE, PLAIN)  # the order a batch lists them in


class View(Choice):
    """A view of a pair (``reflection.reference_context`` picks the reference's)."""

    reflective = REFLECTIVE
    plain = PLAIN


# --------------------------------------------------------------------------- config choices
class Reflection(Choice):
    """``reflection.mode``: the standard form, InSPO, or InSPO's one-sided form (eq. 22)."""

    off = "off"
    inspo = "inspo"
    inspo_one_sided = "inspo_one_sided"


class ReferenceKind(Choice):
    """``reference.kind`` (see :mod:`inspo.training.reference`)."""

    auto = "auto"
    policy_init = "policy_init"
    model = "model"
    none = "none"
    sync = "sync"
    precomputed = "precomputed"
    adapter_disabled = "adapter_disabled"


class IterateReference(Choice):
    """``iterate.reference``: the starting policy throughout, or the last round's policy."""

    initial = "initial"
    previous = "previous"


class Scheduler(Choice):
    """``optim.scheduler``: the learning rate after warm-up."""

    constant = "constant"
    cosine = "cosine"
    linear = "linear"


class OverLong(Choice):
    """``data.over_long``: a row whose scored response is cut is kept (counted) or dropped."""

    truncate = "truncate"
    drop = "drop"


class PackingKernel(Choice):
    """``data.packing_kernel``: how a packed sequence's attention is computed
    (:mod:`inspo.models.varlen_attention`)."""

    auto = "auto"  # blocks on CPU; on CUDA varlen in bf16/fp16 where installed, else flex
    blocks = "blocks"  # sdpa per row, no [T, T] mask
    flex = "flex"  # flex_attention with a block mask
    varlen = "varlen"  # flash-attention's varlen kernel


class Dtype(Choice):
    """``model.dtype``: the weights' floating-point type."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


REFLECTIONS = tuple(m.value for m in Reflection)
REFERENCE_KINDS = tuple(m.value for m in ReferenceKind)
REFERENCE_CONTEXTS = (REFLECTIVE, PLAIN)
#: ``eval.scorer``: the built-in task's gold reward (anything else names a reward model).
GOLD = "gold"
#: ``eval.device``: the CUDA device when there is one, else the CPU.
AUTO_DEVICE = "auto"

# --------------------------------------------------------------------------- data rows
ERROR = "_error"  # key of a row a source could not read; its value is the reason
# The built-in task's tuning prompts (data.eval_split=tune): what a hyperparameter search is
# scored on, disjoint from the test prompts (``eval``) and from training.
TUNE_SPLIT = "tune"
# An optional number per pair: how much more the chosen response is preferred (a reward model's
# Bradley–Terry margin, as TRL's RewardTrainer reads it). Kept with the row and in its batch.
MARGIN_COLUMN = "margin"

# --------------------------------------------------------------------------- metrics
# Pair metrics, logged under a stage: train/..., val/... (the trained view) and val/plain/...
# (the plain-context policy of a reflective run: the model at inference).
TRAIN, VAL, VAL_PLAIN = "train", "val", "val/plain"
LOSS = "loss"
REWARDS_CHOSEN = "rewards/chosen"
REWARDS_REJECTED = "rewards/rejected"
REWARDS_MARGINS = "rewards/margins"
REWARDS_ACCURACIES = "rewards/accuracies"
LOGPS_CHOSEN = "logps/chosen"
LOGPS_REJECTED = "logps/rejected"
# What a training step computed: positions run through the policy and a live reference
# (padding included, a shared context once), and the share of them that were padding.
TOKENS_COMPUTED = "tokens/computed"
TOKENS_PADDING_SHARE = "tokens/padding_share"
PLAIN_ACCURACY = f"{VAL_PLAIN}/{REWARDS_ACCURACIES}"  # held-out accuracy of the plain policy
VIEW_ACCURACY = f"{VAL}/{REWARDS_ACCURACIES}"  # ...of the trained view

# Evaluation of a policy by sampling (evaluation.stage), in summary.json and reports. The
# reference is the policy the samples are compared with (by default the run's initial policy).
EVAL = "eval/"  # every evaluation metric's prefix
EVAL_WIN_RATE = "eval/win_rate"
EVAL_WIN_RATE_LOW = "eval/win_rate_low"  # Wilson 95% interval
EVAL_WIN_RATE_HIGH = "eval/win_rate_high"
EVAL_LC_WIN_RATE = "eval/lc_win_rate"
EVAL_LC_IDENTIFIED = "eval/lc_identified"  # 0.0: the length difference did not vary
EVAL_SCORE = "eval/score/policy"
EVAL_SCORE_REFERENCE = "eval/score/reference"
EVAL_LENGTH = "eval/length/policy"
EVAL_LENGTH_REFERENCE = "eval/length/reference"
EVAL_KL = "eval/kl"
EVAL_KL_SE = "eval/kl_se"
EVAL_VALID = "eval/valid/policy"
EVAL_VALID_REFERENCE = "eval/valid/reference"
EVAL_N_PROMPTS = "eval/n_prompts"
EVAL_SECONDS = "eval/seconds"
EVAL_SAMPLES = "eval/samples"  # the wandb table of sample generations
EVAL_PLAIN_ACCURACY = "eval/pref_accuracy/plain"
EVAL_REFLECTIVE_ACCURACY = "eval/pref_accuracy/reflective"

# Online and iterative rounds: the samples a round or step trains on (TRL's online names).
SCORES = "objective/scores"
SCORES_MARGIN = "objective/scores_margin"
SAMPLE_KL = "objective/kl"
SAMPLE_ENTROPY = "objective/entropy"
EOS_RATE = "val/contain_eos_token"
# Optimiser steps between the policy that sampled a pair and the step that trains on it, mean
# and largest over the pairs a round trains on (inspo.online.carry).
PAIR_STALENESS = "objective/pair_staleness"
PAIR_STALENESS_MAX = "objective/pair_staleness_max"

# Reward-model training (inspo.training.reward), under TRL RewardTrainer's names; std_reward is
# ours (TRL logs the min and max). Logged under train/ (per step) and val/ (the whole split).
ACCURACY = "accuracy"
MARGIN = "margin"
MEAN_REWARD = "mean_reward"
STD_REWARD = "std_reward"
MIN_REWARD = "min_reward"
MAX_REWARD = "max_reward"
REWARD_ACCURACY = f"{VAL}/{ACCURACY}"  # held-out accuracy of a reward model
