"""Every setting of a run: its type, its one default and its check, declared once here.

Each group of ``conf/`` that is not a component (``optim``, ``trainer``, ``checkpoint``,
``paths``, ``data``, ``model``, ``reference``, ``reflection``, ``eval``, ``iterate``, and the
top-level keys) is a dataclass below. The dataclasses are **Hydra structured configs**:
:data:`SCHEMA`, the root :class:`RunConfig`, is registered in Hydra's ConfigStore and is the
first entry of ``conf/base.yaml``'s defaults list, so every composed config is typed by it.
Why this way round, rather than YAML files instantiated into classes:

- a default exists once, here: the YAML files of ``conf/`` state only what an option changes
  (``conf/data/synthetic.yaml``: its source and its sizes), and ``inspo-train --cfg job``
  prints every key with the value it will run with;
- Hydra checks types and choices while it composes (``data.batch_size=abc``,
  ``reflection.mode=bad`` fail naming the key and, for a choice, the valid values), and an
  unknown key fails as before;
- the code below a run's assembly (:mod:`inspo.training.run`, :mod:`inspo.online.run`) receives
  these same classes, built by :func:`load_settings`, whose ``__post_init__`` checks ranges,
  paths and combinations: every bad value fails there, before any model is built, in one line
  that names the setting (``data.batch_size: must be at least 1, got 0``).

Components chosen by ``_target_`` (objectives, judges, pairings, generation backends, data
sources, loggers, strategies) are their own typed settings: Hydra instantiates the class, whose
constructor checks its arguments, and their YAML files list the arguments a user overrides.

Adding a setting: a field (type, default, check in ``__post_init__``) on the dataclass of its
group here, then its use in the code that receives that dataclass. A group's YAML states the
field only where an option needs another value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from inspo.names import (
    AUTO_DEVICE,
    GOLD,
    PLAIN_ACCURACY,
    Choice,
    Dtype,
    IterateReference,
    OverLong,
    PackingKernel,
    ReferenceKind,
    Reflection,
    Scheduler,
    View,
)


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any model is built. The message starts
    with the setting it is about."""


class SettingError(ConfigError):
    """One setting's value is wrong: ``key`` (its path, as on the command line) and ``why``."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key}: {why}")
        self.key, self.why = key, why


# --------------------------------------------------------------------------- checks
def at_least(key: str, value: float | None, low: float) -> None:
    if value is not None and value < low:
        raise SettingError(key, f"must be at least {low}, got {value}")


def positive(key: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise SettingError(key, f"must be > 0, got {value}")


def within(key: str, value: float, low: float, high: float, closed: str = "[]") -> None:
    """``low <= value <= high``, each end open or closed as ``closed`` says (``"(]"``, ...)."""
    above = value >= low if closed[0] == "[" else value > low
    below = value <= high if closed[1] == "]" else value < high
    if not (above and below):
        raise SettingError(key, f"must lie in {closed[0]}{low}, {high}{closed[1]}, got {value}")


def choice(kind: type[Choice], key: str, value: Any) -> Any:
    """``value`` as a member of ``kind`` (a string names one), or a SettingError listing them."""
    if value == MISSING:  # a schema's required choice, before an option sets it
        return value
    try:
        return kind(value)
    except ValueError:
        raise SettingError(key, f"unknown value {value!r}; valid: {kind.valid()}") from None


def nested(cls: type, key: str, value: Any) -> Any:
    """A mapping as the settings class ``cls`` (its keys checked); None or ``cls`` as given."""
    if value is None or isinstance(value, cls):
        return value
    unknown = sorted(set(value) - {f.name for f in fields(cls)})
    if unknown:
        valid = ", ".join(f.name for f in fields(cls))
        raise SettingError(key, f"unknown key(s) {unknown}; valid: {valid}")
    try:
        return cls(**value)
    except SettingError as e:
        raise SettingError(f"{key}.{e.key}", e.why) from None


def looks_local(name: str) -> bool:
    """A filesystem path rather than a Hub id (``org/name`` or ``name``): it starts with ``/``,
    ``.`` or ``~``, or has more than one ``/``."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def model_path(key: str, name: str | None) -> None:
    """A model given as a local path must exist; a Hub id is left to ``from_pretrained``."""
    if name and looks_local(name) and not Path(name).expanduser().exists():
        raise SettingError(key, f"no model at {name} (cwd {Path.cwd()})")


# --------------------------------------------------------------------------- optimisation
@dataclass
class OptimConfig:
    """``optim``: AdamW with linear warm-up, then a constant, cosine or linear schedule."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 10
    scheduler: Scheduler = Scheduler.constant

    def __post_init__(self) -> None:
        positive("lr", self.lr)
        at_least("weight_decay", self.weight_decay, 0)
        if len(self.betas) != 2:
            raise SettingError("betas", f"must be two numbers, got {list(self.betas)}")
        for b in self.betas:
            within("betas", b, 0.0, 1.0, "[)")
        at_least("warmup_steps", self.warmup_steps, 0)
        self.scheduler = choice(Scheduler, "scheduler", self.scheduler)


@dataclass
class TrainerConfig:
    """``trainer``: the arguments of Lightning's ``Trainer``. ``accelerator``, ``devices`` and
    ``precision`` are the ``hardware`` option's (``conf/hardware/``). Any other Trainer
    argument needs a field here."""

    accelerator: str = MISSING
    devices: Any = MISSING
    precision: Any = MISSING
    num_nodes: int = 1
    max_steps: int = 250
    max_epochs: int = -1
    val_check_interval: Any = 1.0  # a float is a fraction of an epoch; an int counts steps
    check_val_every_n_epoch: int | None = 1
    log_every_n_steps: int = 10
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    num_sanity_val_steps: int = 0
    limit_val_batches: Any = 1.0  # a float is a fraction of the val split; an int counts batches
    enable_progress_bar: bool = True
    enable_model_summary: bool = False
    deterministic: Any = False

    def __post_init__(self) -> None:
        if self.max_steps < -1:  # -1: no step limit (max_epochs then ends the run)
            raise SettingError("max_steps", f"must be at least 0, or -1, got {self.max_steps}")
        at_least("num_nodes", self.num_nodes, 1)
        at_least("log_every_n_steps", self.log_every_n_steps, 1)
        at_least("gradient_clip_val", self.gradient_clip_val, 0)
        at_least("accumulate_grad_batches", self.accumulate_grad_batches, 1)
        at_least("check_val_every_n_epoch", self.check_val_every_n_epoch, 1)
        positive("val_check_interval", self.val_check_interval)
        at_least("limit_val_batches", self.limit_val_batches, 0)
        if isinstance(self.limit_val_batches, float) and self.limit_val_batches > 1:
            raise SettingError(
                "limit_val_batches",
                f"a fraction is at most 1.0 (an int counts batches), got {self.limit_val_batches}",
            )


@dataclass
class CheckpointConfig:
    """``checkpoint``: ``checkpoints/last.ckpt`` every this many optimiser steps (and at the
    end of the run)."""

    every_n_train_steps: int = 50

    def __post_init__(self) -> None:
        at_least("every_n_train_steps", self.every_n_train_steps, 1)


@dataclass
class PathsConfig:
    """``paths``: ``cache_dir`` holds tokenised data and precomputed reference scores
    (``conf/base.yaml``: ``$INSPO_CACHE``, else ``logs/.cache`` of the working directory)."""

    cache_dir: str = MISSING

    @property
    def cache(self) -> str | None:
        """``cache_dir``, or None where it has no value (a finished run's saved config, read
        outside Hydra): the default cache (``$INSPO_CACHE``, else ``logs/.cache``) then."""
        return None if self.cache_dir == MISSING else self.cache_dir


# --------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    """``data`` (``conf/data/``): where the rows come from and how they are batched.

    ``source``: a ``_target_`` returning ``{split: rows}`` (:mod:`inspo.data.sources`);
    ``prompts``: the prompt pool of an iterative run on this data, a source of prompt-only or
    pair rows (None: the prompts of ``source``'s train split; ``iterate.prompts`` overrides it);
    ``eval_split``: the prompts the evaluation samples on (the val split's when absent);
    ``over_long``: a row whose scored response is cut is kept and counted (``truncate``) or
    skipped (``drop``); ``strict``: the first bad row is a start-up error;
    ``max_samples``: at most this many used rows per split; ``packing``: each view's rows run
    as one sequence without padding (:mod:`inspo.models.packing`; the same scores; a model that
    cannot pack is scored padded, with one warning); ``packing_kernel``: how a packed
    sequence's attention is computed (``auto``: per row on CPU; on CUDA flash-attention's
    varlen kernel in bf16/fp16 where installed, else flex attention; the same numbers);
    ``group_by_length``: batches of pairs of similar length (mega-batches of ``group_size``
    batches); ``max_tokens_per_batch``: as many pairs per batch as fit this many computed
    tokens (None: ``batch_size`` pairs).
    """

    source: Any = None
    prompts: Any = None
    train_split: str | None = "train"
    val_split: str | None = "val"
    eval_split: str | None = "val"
    batch_size: int = 8
    eval_batch_size: int = 16
    max_length: int = 512
    max_prompt_length: int = 256
    over_long: OverLong = OverLong.truncate
    strict: bool = False
    num_workers: int = 0
    max_samples: int | None = None
    packing: bool = True
    packing_kernel: PackingKernel = PackingKernel.auto
    group_by_length: bool = False
    group_size: int = 50
    max_tokens_per_batch: int | None = None

    def __post_init__(self) -> None:
        at_least("batch_size", self.batch_size, 1)
        at_least("eval_batch_size", self.eval_batch_size, 1)
        at_least("max_prompt_length", self.max_prompt_length, 1)
        if self.max_length < self.max_prompt_length:
            raise SettingError(
                "max_length",
                f"must be at least max_prompt_length ({self.max_prompt_length}), "
                f"got {self.max_length}",
            )
        self.over_long = choice(OverLong, "over_long", self.over_long)
        self.packing_kernel = choice(PackingKernel, "packing_kernel", self.packing_kernel)
        at_least("num_workers", self.num_workers, 0)
        at_least("max_samples", self.max_samples, 1)
        at_least("group_size", self.group_size, 1)
        at_least("max_tokens_per_batch", self.max_tokens_per_batch, 1)


# --------------------------------------------------------------------------- models
@dataclass
class TinyConfig:
    """``model.tiny``: the embedded random-init Llama with a byte tokenizer
    (:func:`inspo.models.load.tiny_llama`): 3.2 M parameters at these sizes, 0.8 M at
    ``hidden_size=128`` (the demo's). ``seed``: its initialisation (None: the run's ``seed``)."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    max_position_embeddings: int = 512
    seed: int | None = None
    vocab_size: int = 259  # the byte tokenizer's: 256 bytes, <pad>, <s>, </s>
    intermediate_size: int | None = None  # None: 8/3 of hidden_size, a multiple of 8

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_layers", "num_heads", "max_position_embeddings"):
            at_least(key, getattr(self, key), 1)
        at_least("vocab_size", self.vocab_size, 1)
        at_least("intermediate_size", self.intermediate_size, 1)
        if self.hidden_size % self.num_heads:
            raise SettingError(
                "hidden_size",
                f"must be a multiple of num_heads ({self.num_heads}), got {self.hidden_size}",
            )


@dataclass
class LoraConfig:
    """``model.lora`` (the peft extra): only the adapter trains."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: Any = "all-linear"

    def __post_init__(self) -> None:
        at_least("r", self.r, 1)
        within("dropout", self.dropout, 0.0, 1.0, "[)")


@dataclass
class ModelConfig:
    """``model`` (``conf/model/``): the policy. ``name_or_path``: a Hub id or a local
    checkpoint (None: the tiny model of ``tiny``); ``gguf_file``: a GGUF file in the folder
    ``name_or_path`` (or a path to one), dequantized to ``dtype`` once and cached as an ordinary
    checkpoint under ``paths.cache_dir/gguf`` (:mod:`inspo.models.gguf`; ``model=smollm2``);
    ``tokenizer``: its own path (None: the model's; with neither, the built-in byte tokenizer);
    ``disable_dropout``: dropout off in
    policy and reference, as TRL (with it on, the margin is noise); ``lora``: train a LoRA
    adapter (with ``reference=adapter_disabled``, the base model with the adapter off is the
    reference, no second copy)."""

    name_or_path: str | None = None
    gguf_file: str | None = None
    tokenizer: str | None = None
    tiny: TinyConfig | None = field(default_factory=TinyConfig)
    dtype: Dtype = Dtype.fp32
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    disable_dropout: bool = True
    # Any, not LoraConfig | None: OmegaConf cannot merge a command-line mapping into a
    # structured node that is None (model.lora='{r: 8}'); the mapping is built here instead.
    lora: Any = None

    def __post_init__(self) -> None:
        self.dtype = choice(Dtype, "dtype", self.dtype)
        self.lora = nested(LoraConfig, "lora", self.lora)
        model_path("name_or_path", self.name_or_path)
        model_path("tokenizer", self.tokenizer)
        if self.gguf_file is not None:
            from inspo.models.gguf import GGUFError, gguf_path

            try:
                gguf_path(self.name_or_path, self.gguf_file)
            except GGUFError as e:
                raise SettingError("gguf_file", str(e)) from None
        elif self.name_or_path is None and self.tiny is None:
            raise SettingError("name_or_path", "needs a Hub id or a local checkpoint (model=hf)")

    @property
    def is_tiny(self) -> bool:
        """The embedded tiny model (no checkpoint and no GGUF file)."""
        return self.name_or_path is None and self.gguf_file is None


@dataclass
class ReferenceConfig:
    """``reference`` (``conf/reference/``; the kinds: :mod:`inspo.training.reference`).

    ``name_or_path``: the reference of ``kind=model``, or the model whose scores
    ``kind=precomputed`` caches (None: the initial policy); ``dtype``, ``trust_remote_code``:
    for such a model (None: the policy's); ``batch_size``: rows per forward while precomputing
    (None: ``data.eval_batch_size``); ``sync_every``, ``sync_alpha``: TR-DPO's soft update of
    ``kind=sync``, ref ← α·policy + (1 − α)·ref every ``sync_every`` optimiser steps.
    """

    kind: ReferenceKind = MISSING
    name_or_path: str | None = None
    dtype: Dtype | None = None
    trust_remote_code: bool | None = None
    batch_size: int | None = None
    sync_every: int = 64
    sync_alpha: float = 0.6

    def __post_init__(self) -> None:
        self.kind = choice(ReferenceKind, "kind", self.kind)
        if self.dtype is not None:
            self.dtype = choice(Dtype, "dtype", self.dtype)
        if self.kind is ReferenceKind.model and not self.name_or_path:
            raise SettingError("name_or_path", "required by reference=model")
        model_path("name_or_path", self.name_or_path)
        at_least("batch_size", self.batch_size, 1)
        at_least("sync_every", self.sync_every, 1)
        within("sync_alpha", self.sync_alpha, 0.0, 1.0, "(]")


@dataclass
class ReflectionConfig:
    """``reflection`` (``conf/reflection/``): the standard form or InSPO.

    ``template``: R(x, y'), a name of :data:`inspo.data.templates.TEMPLATES`, ``chat``, or a
    format string with ``{prompt}`` and ``{other}``; ``reference_context``: the reference
    scores in the reflective context or after the prompt alone; the loss is
    ``reflective_weight``·L_reflective + ``standard_weight``·L_standard +
    ``distill_weight``·KL(stop-grad π(·|R(x,y_l)) ‖ π(·|x)) on the chosen response (the
    weights apply to reflective modes); ``sft_fraction``: for an SFT stage, the share of
    training rows laid out reflectively (R(x, other) then the chosen response).
    """

    mode: Reflection = MISSING
    template: str = "default"
    reference_context: View = View.reflective
    reflective_weight: float = 1.0
    standard_weight: float = 0.0
    distill_weight: float = 0.0
    sft_fraction: float = 0.0

    def __post_init__(self) -> None:
        from inspo.data.templates import resolve_template

        self.mode = choice(Reflection, "mode", self.mode)
        self.reference_context = choice(View, "reference_context", self.reference_context)
        try:
            resolve_template(self.template)
        except ValueError as e:
            raise SettingError("template", str(e)) from None
        for key in ("reflective_weight", "standard_weight", "distill_weight"):
            at_least(key, getattr(self, key), 0)
        within("sft_fraction", self.sft_fraction, 0.0, 1.0)

    @property
    def reflective(self) -> bool:
        return self.mode is not Reflection.off


# --------------------------------------------------------------------------- sampling
@dataclass
class Sampling:
    """How responses are sampled, wherever they are (evaluation, generation backends): the
    complete list, nothing is read from a checkpoint's ``generation_config``. Processing order:
    temperature, then top-k, then top-p; ``temperature=0`` is greedy; ``top_k=0`` and
    ``top_p=1`` are off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 48

    def __post_init__(self) -> None:
        at_least("temperature", self.temperature, 0)
        within("top_p", self.top_p, 0.0, 1.0, "(]")
        at_least("top_k", self.top_k, 0)
        at_least("max_new_tokens", self.max_new_tokens, 1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def pure(self) -> bool:
        """True when the samples are draws from the model's own distribution."""
        return self.temperature == 1 and self.top_p == 1 and self.top_k == 0


@dataclass
class SamplingConfig(Sampling):
    """:class:`Sampling` with the seed of one call (:func:`inspo.models.sampling.sample`)."""

    seed: int = 0

    def as_pure(self) -> SamplingConfig:
        """The same lengths and seed, sampling from the model's own distribution."""
        return dataclasses.replace(self, temperature=1.0, top_p=1.0, top_k=0)


@dataclass
class EvalConfig(Sampling):
    """``eval`` (``conf/eval/default.yaml``; :mod:`inspo.evaluation.stage`).

    ``generate``: run the evaluation at the end of inspo-train; ``n_prompts``: eval prompts
    (0: none, in an iterative run: no per-round evaluation); ``seed``: policy and reference
    sample with it; ``scorer``: ``gold`` (the built-in task's reward) or a sequence-classifier
    reward model; ``reference``: the policy compared with (None: the run's initial policy,
    the same for every reference kind); ``n_table``: sample generations in the wandb table;
    ``device``: ``auto`` (CUDA when there is one), or a torch device.
    """

    generate: bool = False
    n_prompts: int = 256
    batch_size: int = 64
    seed: int = 1234
    scorer: str = GOLD
    reference: str | None = None
    n_table: int = 16
    progress: bool = True
    device: str = AUTO_DEVICE

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least("n_prompts", self.n_prompts, 0)
        at_least("batch_size", self.batch_size, 1)
        at_least("n_table", self.n_table, 0)
        if self.scorer != GOLD:
            model_path("scorer", self.scorer)
        model_path("reference", self.reference)

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            **{f.name: getattr(self, f.name) for f in fields(Sampling)}, seed=self.seed
        )


# --------------------------------------------------------------------------- iterate
@dataclass
class IterateConfig:
    """``iterate`` (``conf/iterate.yaml``; :mod:`inspo.online.rounds`).

    ``steps_per_round``: optimiser steps per round (1: online mode, fresh samples every step);
    ``samples_per_prompt``: K responses per prompt; ``reference``: the starting policy
    throughout, or the last round's policy; ``save_rounds``: a folder per round (samples,
    pairs, report, evaluation; needed to resume mid-round); ``eval_every``: evaluate after every
    k rounds and the last (0: the last only); ``max_prompts_factor``: a round fails after
    trying this many × the pairs it needs; ``prompts``: the pool, a source ``_target_`` (None:
    the data's own, ``data.prompts``, else the prompts of ``data.source``'s train split);
    ``max_staleness``: a round's pairs beyond what it trains on train first in the next round
    while at most this many optimiser steps older than the policy training on them (logged as
    ``objective/pair_staleness``, mean and max), and a round then draws enough prompts in one
    decoding pass that it rarely falls short (:mod:`inspo.online.carry`). Carrying needs
    ``max_staleness >= steps_per_round`` (online mode: 1); 0: every round trains on its own
    samples only and draws as many prompts as it lacks pairs (a second decoding pass when ties
    leave it short).
    """

    rounds: int = 4
    steps_per_round: int = 50
    samples_per_prompt: int = 2
    reference: IterateReference = IterateReference.initial
    save_rounds: bool = True
    eval_every: int = 1
    max_prompts_factor: int = 20
    prompts: Any = None
    max_staleness: int = 1

    def __post_init__(self) -> None:
        at_least("rounds", self.rounds, 1)
        at_least("steps_per_round", self.steps_per_round, 1)
        at_least("samples_per_prompt", self.samples_per_prompt, 2)
        self.reference = choice(IterateReference, "reference", self.reference)
        at_least("eval_every", self.eval_every, 0)
        at_least("max_prompts_factor", self.max_prompts_factor, 1)
        at_least("max_staleness", self.max_staleness, 0)

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps_per_round


# --------------------------------------------------------------------------- a run
@dataclass
class RunConfig:
    """The whole config of ``inspo-train`` and ``inspo-iterate`` (the keys of ``conf/base.yaml``
    and the groups it composes). ``objective``, ``logger``, ``strategy``, ``generation``,
    ``judge`` and ``pairing`` are components (a ``_target_`` and its arguments), built by the
    run's assembly. ``iterate`` is set by ``conf/iterate.yaml`` only.

    ``ckpt_path``: ``last`` resumes from ``checkpoints/last.ckpt`` when it exists (a killed job
    is resubmitted with the same command; a run that already finished all its steps is left as
    it is, its summary.json kept and returned); ``optimized_metric``: what a sweeper optimises (the
    run returns its final value); ``wandb_group``: the runs of one multirun share it;
    ``run_name``: None for objective-Ψ-reflection-reference-seed.
    """

    seed: int = 0
    ckpt_path: str | None = None
    optimized_metric: str | None = PLAIN_ACCURACY
    save_policy: bool = True
    wandb_group: str | None = None
    tags: list[str] = field(default_factory=list)
    run_name: str | None = None
    task_name: str = "train"
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    reflection: ReflectionConfig = field(default_factory=ReflectionConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    iterate: IterateConfig | None = None
    objective: Any = MISSING
    logger: Any = None
    strategy: Any = None
    sweep: Any = None
    generation: Any = None
    judge: Any = None
    pairing: Any = None


#: The name :class:`RunConfig` is registered under in Hydra's ConfigStore (``conf/base.yaml``).
SCHEMA = "inspo_settings"


def register() -> None:
    """Put :class:`RunConfig` into Hydra's ConfigStore, where ``conf/base.yaml`` finds it."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA, node=RunConfig)


register()


# --------------------------------------------------------------------------- building
def load(cls: type, node: Any, path: str = "") -> Any:
    """``cls`` built from a config node (composed, or loaded from a run's saved config): each
    field resolved, nested settings built the same way, absent keys left at their defaults.
    A bad value raises a :class:`SettingError` whose key is the full path (``path`` +
    the field), e.g. ``model.tiny.hidden_size``."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if not f.init or (f.name not in node and not OmegaConf.is_missing(node, f.name)):
            continue
        try:
            value = node[f.name]
            sub = _settings_class(hints[f.name])
            if sub is not None and value is not None:
                value = load(sub, value, f"{path}{f.name}.")
            else:
                value = plain(value)
        except MissingMandatoryValue:
            raise SettingError(f"{path}{f.name}", "needs a value (??? in its config)") from None
        except InterpolationResolutionError as e:  # a resolver's own error, e.g. ${package_dir:}
            why = str(e).split("\n")[0].split("while resolving interpolation: ", 1)[-1]
            raise SettingError(f"{path}{f.name}", why) from None
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except SettingError as e:
        if e.key.startswith(path):  # raised by a nested load: already a full path
            raise
        raise SettingError(f"{path}{e.key}", e.why) from None


def load_settings(cfg: DictConfig) -> RunConfig:
    """The run's typed settings from its composed config; raises :class:`SettingError`. The
    tiny model's ``seed: null`` becomes the run's seed."""
    return _seeded(load(RunConfig, cfg))


#: Keys whose values only Hydra's runtime resolves (the run folder, the sweep's group).
RUNTIME_KEYS = ("paths", "logger", "wandb_group")


def load_saved(cfg: DictConfig) -> RunConfig:
    """The settings of a finished run from its saved config (``.hydra/config.yaml``), outside
    Hydra: the keys of :data:`RUNTIME_KEYS` are left at their defaults."""
    kept = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in RUNTIME_KEYS])
    return _seeded(load(RunConfig, kept))


def _seeded(settings: RunConfig) -> RunConfig:
    tiny = settings.model.tiny
    if tiny is not None and tiny.seed is None:
        tiny.seed = settings.seed
    return settings


def plain(value: Any) -> Any:
    """Config containers as Python ones (interpolations resolved); anything else as it is."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def require_values(spec: Any, key: str) -> None:
    """A component's config (a ``_target_`` and its arguments) with every ``???`` filled in,
    else a SettingError naming the first that is not."""
    if isinstance(spec, dict):
        for k, v in spec.items():
            require_values(v, f"{key}.{k}")
    elif isinstance(spec, list):
        for i, v in enumerate(spec):
            require_values(v, f"{key}.{i}")
    elif spec == MISSING:
        raise SettingError(key, "needs a value (??? in its config)")


def as_dict(settings: Any) -> dict[str, Any]:
    """A settings dataclass as JSON-ready values (choices as their strings)."""

    def clean(v: Any) -> Any:
        if isinstance(v, Enum):
            return v.value
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return clean(dataclasses.asdict(settings))


def _settings_class(annotation: Any) -> type | None:
    """The dataclass a field holds (``X`` or ``X | None``), else None."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    candidate = args[0] if union and len(args) == 1 else annotation
    return candidate if dataclasses.is_dataclass(candidate) else None
