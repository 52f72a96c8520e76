"""Online preference optimisation per step: inspo's online mode against TRL 1.16's
``trl.experimental.online_dpo.OnlineDPOTrainer``, CPU fp32, identical work (see
benchmarks/README.md, "Online: inspo vs TRL OnlineDPOTrainer").

    python benchmarks/bench_online.py    # tiny, 3 rounds: inspo, TRL like-for-like, TRL defaults
    python benchmarks/bench_online.py --sizes tiny,small --rounds 4 --configs all

Every step of both samples K = 2 responses to each of ``--prompts`` prompts from the live
policy (HF model forwards on CPU, no vLLM), judges them with the same Python function, and
trains one DPO step (β 0.1, AdamW lr 5e-7 constant, clipping 1.0) against a frozen copy of the
initial policy. Every (size, config, round) runs in a child forked after the imports
(``bench_dpo.in_child``), so each starts from the same post-import state; configurations
alternate inside each round; warm-up steps are excluded; tables show medians over rounds.

What each side counts as a pair. inspo pairs each prompt's best and worst response and drops
ties (and other unusable pairs, each counted); a step draws more prompts until it has
``--prompts`` pairs, so every trained pair has a score gap. TRL trains one pair per prompt
whatever the scores (a tie's "chosen" is the first sample). ``pairs/s`` counts the pairs each
trained (``--prompts`` per step for both); ``non-tie pairs/s`` only those with a score gap.

The judge is the number of distinct characters of a response: a random-init policy's samples
all get the synthetic task's invalid-response gold reward (all ties), this one varies on
random text, and it costs the same on both sides.

The model is the tiny random-init Llama, made to sample 7-bit ASCII (and EOS) only
(:func:`ascii_only`), the same for both: inspo pairs texts and re-encodes them for training,
and a random byte-level model samples bytes >= 128 that decode to U+FFFD, whose re-encoding
is three bytes (32 sampled tokens trained as ≈ 58). ASCII round-trips exactly, so both train on
the tokens that were sampled (every run counts the tokens >= 128 it sampled:
``non_ascii_tokens``). ``--any-bytes`` keeps the unmodified model.

Phases, per step: generation (inspo: ``time/generation_seconds``, the sampler and decoding;
TRL: ``_generate``), judging (inspo: ``time/judging_seconds``; TRL:
``_calculate_rewards_from_functions``), and training, the rest of the step. Training splits
into the reference's forwards (inspo: over the round's samples, for its KL and, shared, for
training, plus any reference forward in the training step; TRL: ``_forward`` on its
``ref_model``), policy training (inspo: ``time/training_seconds`` less its reference
forwards; TRL: the rest of the step), and, for inspo, the rest (pairing, encoding, the loop).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # OnlineDPOTrainer's experimental warning

import lightning as L
import torch
import trl
from datasets import Dataset
from transformers import TrainerCallback
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

import bench_dpo
import inspo.models.load as inspo_load
from bench_dpo import RssPeak, in_child
from inspo.config import compose_config
from inspo.data.report import DataReport
from inspo.data.synthetic import prompt_pool
from inspo.models.load import byte_tokenizer, count_parameters, tiny_llama
from inspo.online import run as online_run
from inspo.online.prompts import Prompt, check_prompts, stream
from inspo.online.run import Iterate
from inspo.training.run import run as train_run

BETA, LR, SEED = 0.1, 5e-7, 0  # TRL's OnlineDPOConfig defaults for β and lr


@dataclass(frozen=True)
class Size:
    name: str
    model: dict
    prompts: int  # prompts per step (TRL's per_device_train_batch_size, inspo's data.batch_size)
    new_tokens: int
    warmup: int
    steps: int

    @property
    def total(self) -> int:  # the first step's end starts the clock
        return self.warmup + self.steps + 1


SIZES = {
    "tiny": Size("tiny", {}, prompts=8, new_tokens=32, warmup=2, steps=8),
    "small": Size(
        "small",
        {"hidden_size": 512, "num_layers": 8, "num_heads": 8},
        prompts=8,
        new_tokens=32,
        warmup=1,
        steps=3,
    ),
}

# (label, framework, settings: OnlineDPOConfig fields for TRL). TRL defaults: activation
# checkpointing on (which also turns the KV cache off in generation), temperature 0.9, fused
# AdamW; like for like: what inspo does (checkpointing off, temperature 1, torch.optim.AdamW).
CONFIGS = [
    ("inspo online", "inspo", {}),
    # inspo's online step as it was before this branch: a reference forward per training batch
    # besides the one over the round's samples (online.run.shares_reference_scores). Selected
    # by name or with "all", not in "main".
    ("inspo online (before)", "inspo", {"share_reference": False}),
    # Without carrying surplus pairs: a second decoding pass when ties leave a step short.
    ("inspo online (no carry)", "inspo", {"max_staleness": 0}),
    # One decoding pass for two optimiser steps (iterate.steps_per_round=2): a step's pairs
    # come from the policy of at most 2 steps before (1 for the round's own, 2 for carried).
    ("inspo online (2 steps a pass)", "inspo", {"steps_per_round": 2, "max_staleness": 2}),
    (
        "TRL like-for-like",
        "trl",
        {"gradient_checkpointing": False, "temperature": 1.0, "optim": "adamw_torch"},
    ),
    ("TRL defaults", "trl", {"gradient_checkpointing": True, "temperature": 0.9}),
]
BYTES = ["ascii"]  # set by --any-bytes


# --------------------------------------------------------------------------- same work
def distinct_chars(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """The judge: distinct characters per response (varies on a random policy's samples)."""
    return [float(len(set(r))) for r in responses]


# inspo's Python judge imports the function by name; run as a script, this module is __main__.
JUDGE = f"{__name__}.distinct_chars"


def ascii_only(model: torch.nn.Module, eos_id: int, sign: float = 2.0) -> torch.nn.Module:
    """Make a random-init model sample 7-bit ASCII and EOS only, keeping its shapes and cost.

    Embedding coordinate 0 (tied with the LM head) becomes +``sign`` for those tokens and
    −``sign`` for the rest; after an ASCII token it dominates the residual stream, so every
    other token's logit is ≈ 2·``sign``·|ĥ₀| lower; within ASCII the distribution stays the
    random model's.
    """
    emb = model.get_input_embeddings().weight
    allowed = torch.arange(emb.shape[0]) < 128
    allowed[eos_id] = True
    with torch.no_grad():
        emb[:, 0] = torch.where(allowed, sign, -sign).to(emb.dtype)
    return model


def bench_model(tokenizer: Any, size: Size) -> torch.nn.Module:
    """The policy both start from: ``tiny_llama`` (seed 0), ASCII-only unless --any-bytes."""
    model = tiny_llama(tokenizer=tokenizer, seed=SEED, **size.model)
    return ascii_only(model, tokenizer.eos_token_id) if BYTES[0] == "ascii" else model


def prompts(tokenizer: Any) -> list[Prompt]:
    """inspo's prompt pool (the built-in task's), checked as inspo-iterate checks it."""
    return check_prompts(prompt_pool(seed=0, n_eval=256), tokenizer, 64, "truncate", DataReport())


def checksum(model: torch.nn.Module) -> float:
    """Σ of the weights: both sides must start from the same model."""
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def non_ascii(ids: Sequence[int], eos_id: int) -> int:
    return sum(1 for i in ids if i >= 128 and i != eos_id)


# --------------------------------------------------------------------------- inspo
class StepPeak:
    """Peak RSS from the run function's start (a fresh fork, so the child's start) to the end
    of the last step: what training holds, without what a run does after it (inspo-iterate
    writes last.ckpt, which serialises the weights and AdamW state)."""

    def __init__(self, steps: int) -> None:
        self.steps, self.meter, self.mb = steps, RssPeak(every=0.01), 0.0

    def step_ended(self, done: int) -> None:
        if done == self.steps:
            self.mb = self.meter.stop() / 2**20


class StepEnds(L.Callback):
    def __init__(self, peak: StepPeak) -> None:
        self.ends: list[float] = []
        self.peak = peak

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())
        self.peak.step_ended(len(self.ends))


def timed(record: Callable[[float, Any], None], fn: Callable) -> Callable:
    """``fn`` that also calls ``record(seconds, result)``."""

    def wrapped(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        record(time.perf_counter() - t, out)
        return out

    return wrapped


def run_inspo(size: Size, settings: dict, *, workdir: str) -> dict:
    """``inspo-iterate experiment=online`` in process, through :func:`inspo.training.run.run`
    with :class:`Iterate` (what ``inspo.online.run.iterate`` does), plus clocks."""
    per = settings.get("steps_per_round", 1)  # optimiser steps per round (one decoding pass)
    warm = math.ceil(size.warmup / per)  # rounds; the first round's end starts the clock
    total = warm + math.ceil(size.steps / per) + 1
    clock = StepEnds(StepPeak(total * per))
    if not settings.get("share_reference", True):  # a forked child: the patch dies with it
        online_run.shares_reference_scores = lambda cfg, module: False
    tok = byte_tokenizer()
    eos = tok.eos_token_id
    build = inspo_load.tiny_llama  # load_policy builds the tiny model through this name
    inspo_load.tiny_llama = lambda *a, **kw: (
        ascii_only(build(*a, **kw), eos) if BYTES[0] == "ascii" else build(*a, **kw)
    )
    rounds: list[dict] = []  # per round (= step): what its build drew, generated and timed
    start: dict = {}

    class Measured(Iterate):
        def attach(self, cfg, module, datamodule, trainer) -> None:
            super().attach(cfg, module, datamodule, trainer)
            trainer.callbacks.append(clock)
            start["checksum"] = checksum(module.policy)
            start["reference_checksum"] = checksum(module.reference)
            r = self.rounds.builder

            def new_round(seconds: float, data: Any) -> None:
                rep = data.report
                rounds[-1].update(
                    prompts=rep.prompts, samples=rep.samples, surplus=len(data.surplus)
                )

            def generated(seconds: float, groups: Any) -> None:
                cur = rounds[-1]
                cur["generate_calls"] += 1
                ids = [s.ids for g in groups for s in g]
                cur["tokens"] += sum(map(len, ids))
                cur["non_ascii"] += sum(non_ascii(x, eos) for x in ids)

            def reference(seconds: float, _: Any) -> None:
                rounds[-1]["reference_s"] += seconds

            build_round = r.build
            start_round = self.rounds.start

            def start_with_record(index: int, module: Any) -> None:
                start_round(index, module)
                rep = self.rounds.current.report
                d = rep.dropped
                # Prompts that gave no pair: ties and the other counted reasons; a pair that
                # entered the round was trained, carried on, or dropped unused or stale.
                lost = d.get("unused_surplus", 0) + d.get("stale", 0)
                unpaired = rep.prompts + rep.carried_in - rep.pairs - rep.carried_out - lost
                rounds[-1].update(
                    ties=d.get("tie", 0), unpaired=unpaired, carried=rep.carried_out,
                    discarded=lost,
                )  # fmt: skip

            self.rounds.start = start_with_record

            def build_with_record(*a, **k):
                rounds.append(Counter(generate_calls=0, tokens=0, non_ascii=0))
                return timed(new_round, build_round)(*a, **k)

            r.build = build_with_record
            r.backend.generate = timed(generated, r.backend.generate)
            r.reference_logps = timed(reference, r.reference_logps)
            scores = module.reference_scores

            def reference_in_step(batch: dict, view: str) -> Any:
                t = time.perf_counter()
                out = scores(batch, view)
                if module.training:  # the training step's (a forward unless the batch has them)
                    rounds[-1]["step_reference_s"] += time.perf_counter() - t
                return out

            module.reference_scores = reference_in_step

    m = size.model
    overrides = [
        "experiment=online",
        f"iterate.rounds={total}",
        f"iterate.steps_per_round={per}",
        "iterate.samples_per_prompt=2",
        "iterate.save_rounds=false",
        "iterate.eval_every=0",
        "eval.n_prompts=0",  # no per-round evaluation (TRL has none either)
        "data.val_split=null",  # no validation data or validation (TRL has none either)
        "+data.source.n_sft=0",
        "+data.source.n_train=0",
        "+data.source.n_val=0",
        f"data.batch_size={size.prompts}",
        f"generation.max_new_tokens={size.new_tokens}",
        "generation.temperature=1.0",
        "generation.top_k=0",
        "generation.top_p=1.0",
        "judge=python",
        f"judge.function={JUDGE}",
        "objective=dpo",
        f"objective.beta={BETA}",
        f"optim.lr={LR}",
        "optim.warmup_steps=0",
        "optim.scheduler=constant",
        "trainer.log_every_n_steps=10",
        "trainer.gradient_clip_val=1.0",
        "trainer.enable_progress_bar=false",
        "checkpoint.every_n_train_steps=1000000",  # none during the run (TRL: save_strategy=no)
        "save_policy=false",
        "logger=csv",
        f"paths.cache_dir={workdir}/cache",
        f"seed={SEED}",
        *[f"model.tiny.{k}={v}" for k, v in m.items()],
        *[f"iterate.max_staleness={v}" for v in [settings.get("max_staleness")] if v is not None],
    ]
    cfg = compose_config(overrides, workdir, name="iterate")
    summary = train_run(cfg, Measured())
    history = summary["rounds"]
    steps = []
    for i in range(warm + 1, total):  # a record per round: its steps, summed
        h, r = history[i], rounds[i]
        dt = clock.ends[(i + 1) * per - 1] - clock.ends[i * per - 1]
        gen, judge = h["time/generation_seconds"], h["time/judging_seconds"]
        steps.append({
            "steps": per,
            "step_s": dt,
            "generation_s": gen,
            "judging_s": judge,
            "training_s": dt - gen - judge,  # the rest of the step
            "reference_s": r["reference_s"] + r["step_reference_s"],
            "policy_training_s": h["time/training_seconds"] - r["step_reference_s"],
            "pairs": int(h["objective/pairs"]),
            "non_tie_pairs": int(h["objective/pairs"]),  # best-worst drops ties
            "prompts": r["prompts"],
            "completions": r["samples"],
            "ties": r["ties"],
            "unpaired": r["unpaired"],
            "generate_calls": r["generate_calls"],
            "tokens": r["tokens"],
            "non_ascii": r["non_ascii"],
            "staleness": h.get("objective/pair_staleness", 0.0),
            "staleness_max": h.get("objective/pair_staleness_max", 0.0),
            "discarded": r["discarded"],
        })  # fmt: skip
    return {**start, **summarise(steps), "peak_steps_mb": clock.peak.mb}


# --------------------------------------------------------------------------- TRL
class TrlClock(TrainerCallback):
    """Step ends, and the phases timed inside each step."""

    def __init__(self, peak: StepPeak) -> None:
        self.ends: list[float] = []
        self.steps: list[Counter] = []
        self.cur: Counter = Counter()
        self.peak = peak

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())
        self.steps.append(self.cur)
        self.cur = Counter()
        self.peak.step_ended(len(self.ends))


def run_trl(size: Size, settings: dict, *, workdir: str) -> dict:
    """``OnlineDPOTrainer.train()`` on the same model, prompts (in inspo's stream order) and
    judge; its generation (``_generate``) and reward (``_calculate_rewards_from_functions``)
    calls timed on the instance."""
    clock = TrlClock(StepPeak(size.total))
    tok = byte_tokenizer()
    eos = tok.eos_token_id
    policy = bench_model(tok, size)
    start = {"checksum": checksum(policy)}

    def reward(prompts, completions, completion_ids=None, trainer_state=None, **kwargs):
        # TRL tokenizes prompts without special tokens: the dataset carries inspo's BOS as text.
        scores = distinct_chars([p.removeprefix("<s>") for p in prompts], completions)
        half = len(scores) // 2  # TRL's pair i: completions i and i + B
        clock.cur["ties"] += sum(scores[i] == scores[i + half] for i in range(half))
        return scores

    pool = prompts(tok)
    order = stream(pool, SEED, 0, size.prompts * size.total)
    rows = [{"prompt": tok.bos_token + p.text} for p in order]
    args = OnlineDPOConfig(
        output_dir=workdir,
        per_device_train_batch_size=size.prompts,
        max_steps=size.total,
        max_new_tokens=size.new_tokens,
        learning_rate=LR,
        lr_scheduler_type="constant",
        beta=[BETA],
        top_k=0,
        top_p=1.0,
        bf16=False,  # its default, True, fails on a CPU-only machine
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=10,
        max_grad_norm=1.0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",  # inspo's prompt order
        seed=SEED,
        **settings,
    )
    trainer = OnlineDPOTrainer(
        model=policy,
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[clock],
    )
    start["reference_checksum"] = checksum(trainer.ref_model)

    def generated(seconds: float, out: Any) -> None:
        completion_ids, mask = out[2], out[3].bool()
        clock.cur["generation_s"] += seconds
        clock.cur["tokens"] += int(mask.sum())
        high = (completion_ids >= 128) & (completion_ids != eos) & mask
        clock.cur["non_ascii"] += int(high.sum())

    def rewarded(seconds: float, _: Any) -> None:
        clock.cur["judging_s"] += seconds

    trainer._generate = timed(generated, trainer._generate)
    trainer._calculate_rewards_from_functions = timed(
        rewarded, trainer._calculate_rewards_from_functions
    )
    forward = trainer._forward

    def timed_forward(model: Any, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = forward(model, *args, **kwargs)
        if model is trainer.ref_model:
            clock.cur["reference_s"] += time.perf_counter() - t
        return out

    trainer._forward = timed_forward
    trainer.train()
    steps = []
    for i in range(size.warmup + 1, size.total):
        c = clock.steps[i]
        dt = clock.ends[i] - clock.ends[i - 1]
        steps.append({
            "step_s": dt,
            "generation_s": c["generation_s"],
            "judging_s": c["judging_s"],
            "training_s": dt - c["generation_s"] - c["judging_s"],  # the rest of the step
            "reference_s": c["reference_s"],  # its KL comes from the training forwards
            "policy_training_s": dt - c["generation_s"] - c["judging_s"] - c["reference_s"],
            "pairs": size.prompts,
            "non_tie_pairs": size.prompts - c["ties"],
            "prompts": size.prompts,
            "completions": 2 * size.prompts,
            "ties": c["ties"],
            "unpaired": 0,  # TRL trains every prompt's pair
            "generate_calls": 1,
            "tokens": c["tokens"],
            "non_ascii": c["non_ascii"],
            "staleness": 0.0,  # every step trains on its own samples
            "staleness_max": 0.0,
            "discarded": 0,
        })  # fmt: skip
    return {**start, **summarise(steps), "peak_steps_mb": clock.peak.mb}


# --------------------------------------------------------------------------- summary
PHASES = ("generation", "judging", "training", "reference", "policy_training")


def summarise(steps: list[dict]) -> dict:
    """Rates over the measured steps (sums of counts ÷ sum of step times), phase shares of
    the step time, and per-step means. A record is one step, or one round of ``steps``."""
    seconds = sum(s["step_s"] for s in steps)
    total = {k: sum(s[k] for s in steps) for k in steps[0]}
    n = sum(s.get("steps", 1) for s in steps)
    out = {
        "steps": n,
        "step_s": seconds / n,
        "pairs_per_s": total["pairs"] / seconds,
        "non_tie_pairs_per_s": total["non_tie_pairs"] / seconds,
        "completions_per_s": total["completions"] / seconds,
        "generated_tokens_per_s": total["tokens"] / seconds,
    }
    for p in PHASES:
        out[f"{p}_share"] = total[f"{p}_s"] / seconds
        out[f"{p}_ms"] = 1e3 * total[f"{p}_s"] / n
    out["other_ms"] = out["training_ms"] - out["reference_ms"] - out["policy_training_ms"]
    for k in ("prompts", "completions", "ties", "unpaired", "generate_calls", "tokens"):
        out[f"{k}_per_step"] = total[k] / n
    out["staleness"] = total["staleness"] / len(steps)  # mean over records of their means
    out["staleness_max"] = max(s["staleness_max"] for s in steps)
    out["discarded_per_step"] = total["discarded"] / n
    out["non_ascii_tokens"] = total["non_ascii"]
    out["step_times"] = [round(s["step_s"] / s.get("steps", 1), 4) for s in steps]
    return out


def table(rows: dict[tuple[str, str], list[dict]]) -> str:
    """The comparison (medians over rounds; the ratio also per round, rounds paired), then
    where a step's time goes."""
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0] if m != "step_times"}
           for k, v in rows.items()}  # fmt: skip
    lines = [
        "| size | config | pairs/s | inspo ÷ this (rounds) | non-tie pairs/s | completions/s | "
        "peak MB, steps (run) | prompts/step | generation | judging | training |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    phases = [
        "",
        "| size | config | step ms | generation | judging | reference forwards | "
        "policy training | other | decoding passes/step | ties/step | pair staleness "
        "(max) | discarded/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (size, label), m in med.items():
        ratio = ""
        ours = med.get((size, "inspo online"))
        if ours and label != "inspo online":
            pairs = zip(rows[(size, "inspo online")], rows[(size, label)], strict=False)
            per_round = [a["pairs_per_s"] / b["pairs_per_s"] for a, b in pairs]
            ratio = (
                f"{ours['pairs_per_s'] / m['pairs_per_s']:.2f}× ("
                + ", ".join(f"{x:.2f}" for x in per_round)
                + ")"
            )
        lines.append(
            f"| {size} | {label} | {m['pairs_per_s']:.2f} | {ratio} | "
            f"{m['non_tie_pairs_per_s']:.2f} | {m['completions_per_s']:.2f} | "
            f"{m['peak_steps_mb']:.0f} ({m['peak_mem_mb']:.0f}) | {m['prompts_per_step']:.2f} | "
            f"{m['generation_share']:.0%} | {m['judging_share']:.1%} | "
            f"{m['training_share']:.0%} |"
        )
        ms = [m[f"{p}_ms"] for p in ("generation", "judging", "reference", "policy_training")]
        phases.append(
            f"| {size} | {label} | {m['step_s'] * 1e3:.0f} | "
            + " | ".join(f"{x:.0f}" if x >= 1 else f"{x:.2f}" for x in ms)
            + f" | {m['other_ms']:.0f} | {m['generate_calls_per_step']:.2f} | "
            f"{m['ties_per_step']:.2f} | {m['staleness']:.2f} ({m['staleness_max']:.0f}) | "
            f"{m['discarded_per_step']:.2f} |"
        )
    return "\n".join(lines + phases)


def lscpu() -> str:
    """The machine, as lscpu names it (architecture, CPUs, model, threads per core)."""
    import subprocess

    keep = ("Architecture", "CPU(s)", "Model name", "Thread(s) per core")
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    fields = (line.split(":", 1) for line in out.splitlines() if ":" in line)
    return "; ".join(f"{k.strip()}: {v.strip()}" for k, v in fields if k.strip() in keep)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--sizes", default="tiny")
    ap.add_argument(
        "--configs", default="main", help="comma-separated labels, main (inspo, TRL ×2) or all"
    )
    ap.add_argument("--rounds", type=int, default=3, help="rounds of A/B/C (one child each)")
    ap.add_argument("--steps", type=int, help="measured steps (default: per size)")
    ap.add_argument("--warmup", type=int, help="warm-up steps (default: per size)")
    ap.add_argument("--prompts", type=int, help="prompts per step (default 8)")
    ap.add_argument("--new-tokens", type=int, help="max new tokens (default 32)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--any-bytes", action="store_true", help="the unmodified random model")
    ap.add_argument("--out", default="benchmarks/results_online.jsonl", help="appended to")
    args = ap.parse_args()
    # transformers 5 renames gradient_checkpointing (TRL still passes it): noise, not news.
    warnings.filterwarnings("ignore", category=FutureWarning)
    bench_dpo.THREADS[0] = args.threads
    BYTES[0] = "any" if args.any_bytes else "ascii"
    main_configs = (
        "inspo online",
        "inspo online (2 steps a pass)",
        "TRL like-for-like",
        "TRL defaults",
    )
    wanted = {"all": [c[0] for c in CONFIGS], "main": main_configs}.get(
        args.configs, args.configs.split(",")
    )
    configs = [c for c in CONFIGS if c[0] in wanted]
    out = open(args.out, "a")  # noqa: SIM115

    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        out.write(line + "\n")
        out.flush()

    emit({"kind": "env", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv[1:],
          "machine": lscpu(), "torch": torch.__version__, "trl": trl.__version__,
          "lightning": L.__version__, "threads": args.threads, "bytes": BYTES[0],
          "loadavg": os.getloadavg()})  # fmt: skip
    rows: dict[tuple[str, str], list[dict]] = {}
    for size_name in args.sizes.split(","):
        size = SIZES[size_name]
        size = replace(
            size,
            steps=args.steps or size.steps,
            warmup=args.warmup if args.warmup is not None else size.warmup,
            prompts=args.prompts or size.prompts,
            new_tokens=args.new_tokens or size.new_tokens,
        )
        params = count_parameters(tiny_llama(**size.model))
        emit({"kind": "size", **asdict(size), "params": params})
        for rep in range(args.rounds):
            for label, framework, settings in configs:
                run = run_inspo if framework == "inspo" else run_trl
                msg = in_child(run, size, settings, workdir=True, every=0.01)
                rec = {"kind": "run", "size": size_name, "config": label, "rep": rep,
                       "loadavg": os.getloadavg()[0]}  # fmt: skip
                if not msg["ok"]:
                    emit({**rec, "error": msg["error"]})
                    continue
                r = {**msg["result"], "peak_mem_mb": msg["peak_mem_mb"]}
                emit({**rec, **r})
                rows.setdefault((size_name, label), []).append(r)
    print()
    print(table(rows))
    out.close()


if __name__ == "__main__":
    sys.exit(main())
