"""Every name that more than one module uses, defined once: views, modes, kinds, metric names.

Metric names follow TRL where TRL has the quantity (``rewards/margins``, ``logps/chosen``,
``objective/scores``), so curves line up with what researchers already read.
"""

from __future__ import annotations

# --------------------------------------------------------------------------- views of a pair
# plain: y after x (the standard form, and the policy at inference); reflective: y after
# R(x, y'), the prompt and the other response (InSPO).
PLAIN = "plain"
REFLECTIVE = "reflective"
VIEWS = (REFLECTIVE, PLAIN)  # the order a batch lists them in

# --------------------------------------------------------------------------- config choices
REFLECTIONS = ("off", "inspo", "inspo_one_sided")
REFERENCE_KINDS = (
    "auto",
    "policy_init",
    "model",
    "none",
    "sync",
    "precomputed",
    "adapter_disabled",
)
REFERENCE_CONTEXTS = (REFLECTIVE, PLAIN)

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

# Evaluation of a policy by sampling (evaluation.stage), in summary.json and reports.
EVAL_WIN_RATE = "eval/win_rate"
EVAL_LC_WIN_RATE = "eval/lc_win_rate"
EVAL_SCORE = "eval/score/policy"
EVAL_LENGTH = "eval/length/policy"
EVAL_KL = "eval/kl"
EVAL_VALID = "eval/valid/policy"
EVAL_PLAIN_ACCURACY = "eval/pref_accuracy/plain"
EVAL_REFLECTIVE_ACCURACY = "eval/pref_accuracy/reflective"

# Online and iterative rounds: the samples a round or step trains on (TRL's online names).
SCORES = "objective/scores"
SCORES_MARGIN = "objective/scores_margin"
SAMPLE_KL = "objective/kl"
SAMPLE_ENTROPY = "objective/entropy"
EOS_RATE = "val/contain_eos_token"

# Reward-model training (inspo.training.reward), under TRL RewardTrainer's names; std_reward is
# ours (TRL logs the min and max). Logged under train/ (per step) and val/ (the whole split).
ACCURACY = "accuracy"
MARGIN = "margin"
MEAN_REWARD = "mean_reward"
STD_REWARD = "std_reward"
MIN_REWARD = "min_reward"
MAX_REWARD = "max_reward"
REWARD_ACCURACY = f"{VAL}/{ACCURACY}"  # held-out accuracy of a reward model
