"""inspo vs TRL 1.16 DPOTrainer on identical work, CPU fp32 (see benchmarks/README.md).

    python benchmarks/bench_dpo.py                 # tiny + small, every mode, JSON lines + table
    python benchmarks/bench_dpo.py --sizes tiny --reps 2

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
"""

from __future__ import annotations

import argparse
import json
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
from inspo.models.load import (
    byte_tokenizer,
    count_parameters,
    enable_checkpointing,
    frozen_copy,
    tiny_llama,
)
from inspo.models.scoring import hidden_sequence_logps, sequence_logps, split_shared_prompt
from inspo.objectives import DPO
from inspo.training.module import PreferenceModule
from inspo.training.optim import OptimConfig
from inspo.training.reference import precompute_reference

disable_progress_bar()
hf_logging.set_verbosity_error()


@dataclass(frozen=True)
class Size:
    name: str
    model: dict
    batch: int
    prompt: int  # mean prompt length in byte tokens (uniform in ±25%)
    response: int  # mean response length
    warmup: int
    steps: int

    @property
    def rows(self) -> int:  # exactly the rows the steps consume, so precomputing costs no more
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
}

# (label, framework, mode); InSPO has no TRL counterpart.
CONFIGS = [
    ("inspo DPO live", "inspo", "live"),
    ("TRL DPO live", "trl", "live"),
    ("inspo DPO precomputed", "inspo", "precomputed"),
    ("TRL DPO precomputed", "trl", "precomputed"),
    ("inspo InSPO ctx=reflective", "inspo", "inspo_reflective"),
    ("inspo InSPO ctx=plain", "inspo", "inspo_plain"),
]
BETA, LR, SEED = 0.1, 1e-5, 0
# --checkpointing: activation (gradient) checkpointing of the policy, the same on both sides.
# TRL 1.16's DPOConfig turns it on by default; inspo's default (model.gradient_checkpointing)
# is off. "trl-default" reproduces the two defaults (not like-for-like).
CHECKPOINTING = ["off"]


def checkpointing(framework: str) -> bool:
    mode = CHECKPOINTING[0]
    return mode == "on" or (mode == "trl-default" and framework == "trl")


# --------------------------------------------------------------------------- data
def make_rows(size: Size, seed: int = 1234) -> list[dict]:
    """Deterministic pairs of random lower-case text (1 byte = 1 token)."""
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


def summarise(ends: list[float], tokens: list[int], ref_tokens: list[int], size: Size) -> dict:
    """Per-step intervals after the warm-up; tokens are the policy's non-pad tokens."""
    w = size.warmup
    dts = [b - a for a, b in zip(ends[w:-1], ends[w + 1 :], strict=True)]
    steps = len(dts)
    seconds = sum(dts)
    tok = sum(tokens[w + 1 : w + 1 + steps])
    ref = sum(ref_tokens[w + 1 : w + 1 + steps])
    return {
        "steps": steps,
        "step_s": seconds / steps,
        "pairs_per_s": steps * size.batch / seconds,
        "tokens_per_s": tok / seconds,
        "ref_tokens_per_s": ref / seconds,
    }


# --------------------------------------------------------------------------- inspo
class StepClock(L.Callback):
    def __init__(self, module: PreferenceModule) -> None:
        self.module = module
        self.ends: list[float] = []
        self.tokens: list[int] = []
        self.ref_tokens: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())
        m = self.module
        self.tokens.append(computed_tokens(m, batch[m.policy_view]))
        live = "reference_scores" not in batch
        self.ref_tokens.append(computed_tokens(m, batch[m.reference_view]) if live else 0)


def computed_tokens(module: PreferenceModule, view: dict) -> int:
    """Tokens that went through the model: with a shared prompt, each pair's context once."""
    split = split_shared_prompt(view) if module.scoring.share_prompt else None
    if split is None:
        return int(view["attention_mask"].sum())
    return int(split["context_mask"].sum() + split["response_mask"].sum())


def run_inspo(size: Size, mode: str, profile: bool = False, *, workdir: str) -> dict:
    tok = byte_tokenizer()
    policy = tiny_llama(tokenizer=tok, seed=SEED, **size.model)
    reflection = "inspo" if mode.startswith("inspo") else "off"
    context = "plain" if mode == "inspo_plain" else "reflective"
    reference = frozen_copy(policy)
    if checkpointing("inspo"):  # as inspo.models.load.load_policy(gradient_checkpointing=True)
        enable_checkpointing(policy)
    module = PreferenceModule(
        policy,
        DPO(beta=BETA),
        reference,
        reflection=reflection,
        reference_context=context,
        optim=asdict(OptimConfig(lr=LR)),
    )
    rows = make_rows(size)
    dm = PreferenceDataModule(
        source=lambda: {"train": rows},
        tokenizer=tok,
        val_split=None,
        batch_size=size.batch,
        max_length=4096,
        max_prompt_length=4096,
        reflection=reflection != "off",
        train_views=module.train_views,
        seed=SEED,
    )
    dm.setup("fit")
    if mode == "precomputed":  # scores cached before training; the reference is then freed
        precompute_reference(
            module, module.reference, dm, workdir, model_id="bench", batch_size=size.batch
        )
    clock = StepClock(module)
    profiler = PhaseProfiler(module, size) if profile else None
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=size.warmup + size.steps + 1,
        logger=CSVLogger(workdir),
        log_every_n_steps=10,
        gradient_clip_val=1.0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock] + ([profiler] if profiler else []),
    )
    trainer.fit(module, datamodule=dm)
    result = summarise(clock.ends, clock.tokens, clock.ref_tokens, size)
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
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def run_trl(size: Size, mode: str, *, workdir: str) -> dict:
    tok = byte_tokenizer()
    policy = tiny_llama(tokenizer=tok, seed=SEED, **size.model)
    precomputed = mode == "precomputed"
    args = trl.DPOConfig(
        output_dir=workdir,
        per_device_train_batch_size=size.batch,
        max_steps=size.warmup + size.steps + 1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        beta=BETA,
        max_length=None,
        precompute_ref_log_probs=precomputed,
        precompute_ref_batch_size=size.batch,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=10,
        max_grad_norm=1.0,
        gradient_checkpointing=checkpointing("trl"),
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=SEED,
    )
    clock = TrlClock()
    trainer = trl.DPOTrainer(
        model=policy,
        ref_model=None if precomputed else frozen_copy(policy),
        args=args,
        train_dataset=Dataset.from_list(make_rows(size)),
        processing_class=tok,
        callbacks=[clock],
    )
    tokens: list[int] = []
    collate = trainer.data_collator

    def counting(examples):  # called once per training batch, in order (no workers)
        batch = collate(examples)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    trainer.train()
    ref = [0 if precomputed else t for t in tokens]
    return summarise(clock.ends, tokens, ref, size)


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
    :func:`run_inspo` and :func:`run_trl`, and to a short measurement's (none, 0.5 ms) else."""
    run = fn in (run_inspo, run_trl)
    workdir = run if workdir is None else workdir
    every = (0.01 if run else 0.0005) if every is None else every
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, fn, args, workdir, every))
    p.start()
    child.close()
    msg = parent.recv()
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
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (see README)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results.jsonl")
    ap.add_argument("--logp-vocab", type=int, default=128_256)
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

    def pick(spec: str) -> list:
        return [c for c in CONFIGS if spec == "all" or c[0] in spec.split(",")]

    out = open(args.out, "w")  # noqa: SIM115

    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        out.write(line + "\n")
        out.flush()

    emit({"kind": "env", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
          "torch": torch.__version__, "trl": trl.__version__, "lightning": L.__version__,
          "threads": args.threads, "checkpointing": args.checkpointing,
          "loadavg": os.getloadavg()})  # fmt: skip
    peaks: list[float] = []
    rows: dict[tuple[str, str], Row] = {}
    for size_name in args.sizes.split(","):
        size = SIZES[size_name]
        if args.steps or args.warmup:
            size = replace(size, steps=args.steps or size.steps, warmup=args.warmup or size.warmup)
        params = count_parameters(tiny_llama(tokenizer=byte_tokenizer(), **size.model))
        emit({"kind": "size", **asdict(size), "rows": size.rows, "params": params})
        for rep in range(args.reps):
            peak = in_child(matmul_peak)["result"]
            peaks.append(peak)
            emit({"kind": "matmul_peak", "size": size_name, "rep": rep, "gflops": peak / 1e9})
            for label, framework, mode in pick(
                args.small_configs if size_name == "small" else args.configs
            ):
                fn = run_inspo if framework == "inspo" else run_trl
                msg = in_child(fn, size, mode)
                rec = {"kind": "run", "size": size_name, "config": label, "rep": rep,
                       "loadavg": os.getloadavg()[0]}  # fmt: skip
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
    for kind in ("naive", "chunked", "hidden"):
        for n in (512, 2048):
            msg = in_child(logp_memory, kind, n, args.logp_vocab)
            mem[(kind, n)] = msg["result"] / 2**20 if msg["ok"] else float("nan")
            emit({"kind": "logp_memory", "method": kind, "rows": n, "vocab": args.logp_vocab,
                  "peak_mb": mem[(kind, n)]})  # fmt: skip

    print(table(rows, peak, mem, args.logp_vocab))
    out.close()


def profile(size: Size, args) -> None:
    """Phases of inspo's DPO step, live vs precomputed reference, alternating, medians."""
    if args.steps or args.warmup:
        size = replace(size, steps=args.steps or size.steps, warmup=args.warmup or size.warmup)
    runs: dict[str, list[dict]] = {"live": [], "precomputed": []}
    for _ in range(args.reps):
        for mode in runs:
            msg = in_child(run_inspo, size, mode, True)
            if not msg["ok"]:
                raise SystemExit(msg["error"])
            runs[mode].append(msg["result"]["phases_ms"])
            print(json.dumps({"kind": "profile", "size": size.name, "mode": mode,
                              **msg["result"]}), flush=True)  # fmt: skip
    med = {m: {k: statistics.median(r[k] for r in v) for k in v[0]} for m, v in runs.items()}
    print(f"\ninspo DPO step phases, {size.name}, ms per step (torch.profiler CPU time, median "
          f"of {args.reps}; training_step includes the forwards and the loss):\n")  # fmt: skip
    print("| phase | live | precomputed |\n|---|---|---|")
    for k in med["live"]:
        print(f"| {k} | {med['live'][k]:.1f} | {med['precomputed'][k]:.1f} |")


def table(rows: dict, peak: float, mem: dict, vocab: int) -> str:
    med = {
        k: {m: statistics.median(r[m] for r in v.runs) for m in v.runs[0]} for k, v in rows.items()
    }
    lines = [
        f"matmul peak (fp32 torch.mm 2048², {THREADS[0]} thread(s), median of rounds): "
        f"{peak / 1e9:.1f} GFLOP/s",
        "",
        "| size | config | pairs/s | tokens/s | peak mem MB | MFU | vs TRL (pairs/s) | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (size, label), m in med.items():
        note, ratio = "", ""
        if label.startswith("inspo DPO"):
            trl_key = (size, label.replace("inspo", "TRL"))
            if trl_key in med:
                ratio = f"{m['pairs_per_s'] / med[trl_key]['pairs_per_s']:.2f}×"
            if "precomputed" in label and (size, "inspo DPO live") in med:
                live = med[(size, "inspo DPO live")]["pairs_per_s"]
                note = f"{m['pairs_per_s'] / live:.2f}× own live pairs/s"
        if "InSPO" in label and (size, "inspo DPO live") in med:
            dpo = med[(size, "inspo DPO live")]["tokens_per_s"]
            note = f"{m['tokens_per_s'] / dpo:.2f}× DPO live tokens/s"
        mfu = m["model_tflops"] * 1e12 / peak
        lines.append(
            f"| {size} | {label} | {m['pairs_per_s']:.2f} | {m['tokens_per_s']:.0f} | "
            f"{m['peak_mem_mb']:.0f} | {mfu:.0%} | {ratio} | {note} |"
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
