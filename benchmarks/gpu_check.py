"""One prepared GPU check: the CUDA tests, packed = padded in bf16, and inspo's DPO step against
TRL's DPOTrainer on a model of a real shape, printed as one table (see benchmarks/README.md).

    bash benchmarks/gpu_check.sh              # on a GPU machine: wheels, CUDA tests, the table
    python benchmarks/gpu_check.py --cpu      # the same steps on the tiny model, CPU fp32

GPU: a random-init model of Qwen2.5-0.5B's shape (its config below, no download), bf16-mixed
(fp32 master weights) for both frameworks, live reference, activation checkpointing off for
both, β 0.1, AdamW lr 1e-5, clipping 1.0. Rows are random text of the byte tokenizer (1 byte =
1 token) whose prompt, chosen and rejected lengths are drawn like HH-RLHF's at 4 bytes a token
(a BPE tokenizer's usual rate on English): from the file in ../shared/data when present, else
from its quantiles recorded in :data:`HH_BYTES`. Every configuration first fits ``--warmup``
steps (compilation, autotuning), then times one epoch over the same ``--steps`` batches.

- pairs/s and tokens/s over the timed epoch (CUDA synchronised at each step's end); tokens are
  the real tokens each framework ran through the policy (inspo: a pair's shared context once).
- peak GPU memory: ``torch.cuda.max_memory_allocated`` over the timed epoch.
- MFU: model FLOPs/s ÷ the card's dense bf16 peak, found from its name (:data:`PEAK_BF16`;
  ``--cpu``: the measured fp32 ``torch.mm`` peak). Model FLOPs = 6·N·policy tokens + 2·N·reference
  tokens + attention 4·heads·head_dim·(3·policy + 1·reference) visible (query, key) pairs per
  layer, N = all parameters (the tied embedding once, as the LM head's matmul, although inspo
  applies the head at scored positions only), padding not counted.
- packed = padded: the policy's summed log-probs of one batch, padded and packed under every
  kernel, in the run's precision; equal within ``--tolerance`` (relative; bf16: 1e-2, about
  two bf16 roundings of the sum). The padded scores' own distance from float32 is printed
  beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import importlib.util
import json
import math
import os
import random
import re
import string
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

REPO = Path(__file__).resolve().parents[1]
HH_FILE = "hh-rlhf/harmless-base-test.jsonl.gz"
#: Qwen2.5-0.5B's config.json (the fields that set its shape and numerics).
QWEN25_05B = {
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 24,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}
#: HH-RLHF harmless-base test (2,303 usable pairs): byte lengths at these percentiles.
QUANTILES = [0, 5, 10, 25, 50, 75, 90, 95, 99, 100]
HH_BYTES = {
    "prompt": [29, 52, 63, 121, 368, 670, 1112, 1432, 2211, 3580],
    "chosen": [2, 22, 33, 58, 113, 229, 389, 518, 844, 1083],
    "rejected": [3, 22, 35, 72, 150, 287, 468, 626, 1038, 2494],
}
BYTES_PER_TOKEN = 4
FIT_SLACK = 8  # tokens a template and EOS may add to a sequence
#: Dense bf16 peak FLOP/s by card name, most specific first (NVIDIA's data sheets).
PEAK_BF16 = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM (HBM3)
    ("H200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
]
BETA, LR, SEED = 0.1, 1e-5, 0
COLUMNS = ["check", "config", "status", "pairs/s", "tokens/s", "peak GPU mem GB",
           "TFLOP/s", "MFU", "vs TRL pairs/s", "note"]  # fmt: skip


@dataclass
class Setup:
    """What ``--cpu`` changes: the device, the model, the precision and the sizes. ``bf16``:
    bf16 autocast with fp32 weights (always on a GPU; ``--cpu --bf16`` rehearses that path).
    ``qwen``: Qwen2.5-0.5B's shape (always on a GPU; ``--cpu --qwen`` rehearses it, slowly)."""

    cpu: bool
    bf16: bool
    qwen: bool
    batch: int
    warmup: int
    steps: int
    max_length: int
    tolerance: float

    @property
    def device(self) -> str:
        return "cpu" if self.cpu else "cuda"

    @property
    def precision(self) -> str:
        return "bf16-mixed" if self.bf16 else "32-true"

    def autocast(self, on: bool = True):
        """The run's compute precision for forwards outside Lightning (bf16 on the GPU)."""
        if not self.bf16 or not on:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=torch.bfloat16)


# --------------------------------------------------------------------------- data
def hh_path() -> Path:
    shared = os.environ.get("INSPO_SHARED_DATA")
    return (Path(shared) if shared else REPO.parent / "shared" / "data") / HH_FILE


def file_byte_lengths() -> list[tuple[int, int, int]] | None:
    """(prompt, chosen, rejected) byte lengths of the HH-RLHF file's usable pairs, as inspo
    splits them; None where the file is absent."""
    if not hh_path().is_file():
        return None
    from inspo.data.rows import check_row, to_text

    out = []
    with gzip.open(hh_path(), "rt", encoding="utf-8") as f:
        for line in f:
            text = to_text(json.loads(line), None)
            if isinstance(text, dict) and check_row(text) is None:
                out.append(tuple(len(text[k].encode()) for k in ("prompt", "chosen", "rejected")))
    return out


def quantile_draw(rng: random.Random, values: list[int]) -> int:
    """A draw from the piecewise-linear distribution through (QUANTILES, values)."""
    u = rng.uniform(0, 100)
    i = min(bisect_right(QUANTILES, u) - 1, len(QUANTILES) - 2)
    a, b = QUANTILES[i], QUANTILES[i + 1]
    return round(values[i] + (values[i + 1] - values[i]) * (u - a) / (b - a))


def hh_like_lengths(n: int, seed: int, max_length: int) -> tuple[list[tuple[int, ...]], str]:
    """``n`` (prompt, chosen, rejected) token lengths like HH-RLHF's, and where they came from.
    A pair whose longer sequence would not fit ``max_length`` is drawn again: the frameworks
    truncate differently (TRL drops a pair whose prompt fills the budget), so the check keeps
    only pairs both run whole."""
    rng = random.Random(seed)
    pairs = file_byte_lengths()
    keys = ("prompt", "chosen", "rejected")
    out: list[tuple[int, ...]] = []
    while len(out) < n:
        if pairs is not None:
            drawn = rng.choice(pairs)
        else:
            drawn = tuple(quantile_draw(rng, HH_BYTES[k]) for k in keys)
        p, c, r = (max(1, math.ceil(b / BYTES_PER_TOKEN)) for b in drawn)
        if p + max(c, r) + FIT_SLACK <= max_length:
            out.append((p, c, r))
    return out, "HH-RLHF file" if pairs is not None else "HH-RLHF quantiles"


def text_rows(lengths: list[tuple[int, int, int]], seed: int) -> list[dict]:
    """Random lower-case text of the given byte (= token) lengths."""
    rng = random.Random(seed)
    alphabet = string.ascii_lowercase + "    "

    def text(n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    return [
        {"prompt": text(max(1, p - 2)) + ": ", "chosen": text(c), "rejected": text(r)}
        for p, c, r in lengths
    ]


# --------------------------------------------------------------------------- model and counts
def qwen_config():
    """Qwen2.5-0.5B's config, built from :data:`QWEN25_05B` (no download)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in QWEN25_05B.items() if k != "model_type"}
    return AutoConfig.for_model(QWEN25_05B["model_type"], **fields)


def build_model(setup: Setup, tokenizer):
    from transformers import AutoModelForCausalLM

    from inspo.models.load import tiny_llama, turn_off_dropout

    if not setup.qwen:
        return tiny_llama(tokenizer=tokenizer, seed=SEED, max_position_embeddings=1024)
    cfg = qwen_config()
    cfg.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(SEED)
    with torch.device(setup.device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return turn_off_dropout(model)


@dataclass
class Shape:
    params: int
    layers: int
    heads: int
    head_dim: int

    @classmethod
    def of(cls, model) -> Shape:
        c = model.config.get_text_config()
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        params = sum(p.numel() for p in model.parameters())
        return cls(params, c.num_hidden_layers, c.num_attention_heads, head_dim)

    def flops(self, policy_tokens: int, ref_tokens: int, policy_pairs: int, ref_pairs: int):
        attention = self.layers * 4 * self.heads * self.head_dim * (3 * policy_pairs + ref_pairs)
        return 6 * self.params * policy_tokens + 2 * self.params * ref_tokens + attention


def attention_pairs(view: dict, shared: bool) -> int:
    """Visible (query, key) pairs of causal attention over a right-padded view's real tokens;
    with ``shared``, a pair's shared context is attended once (packing, prompt sharing)."""
    length = view["attention_mask"].sum(-1).long()
    pairs = int((length * (length + 1) // 2).sum())
    if shared:
        from inspo.models.packing import shared_contexts

        context = shared_contexts(view)
        if context is not None:
            p = context[context.shape[0] // 2 :].long()
            pairs -= int((p * (p + 1) // 2).sum())
    return pairs


def peak_flops(setup: Setup) -> tuple[float | None, str]:
    """The card's dense bf16 peak (or, on CPU, the measured fp32 torch.mm peak) and its name."""
    if setup.cpu:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        torch.mm(a, b)
        best = min(_timed(lambda: torch.mm(a, b)) for _ in range(5))
        return 2 * 1024**3 / best, f"CPU fp32 torch.mm peak, {torch.get_num_threads()} threads"
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16:
        if key in name:
            return peak, f"{name}: dense bf16 peak {peak / 1e12:.0f} TFLOP/s"
    return None, f"{name}: bf16 peak unknown (MFU not computed)"


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def sync(setup: Setup) -> None:
    if not setup.cpu:
        torch.cuda.synchronize()


def free(setup: Setup) -> None:
    gc.collect()
    if not setup.cpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


@dataclass
class Meter:
    """The timed epoch: its start, each step's end, pairs, tokens and attention pairs."""

    setup: Setup
    start: float = 0.0
    ends: list[float] = field(default_factory=list)
    pairs: int = 0
    tokens: int = 0
    ref_tokens: int = 0
    att: int = 0
    ref_att: int = 0

    def begin(self) -> None:
        if not self.start:
            sync(self.setup)
            self.start = time.perf_counter()

    def end(self) -> None:
        sync(self.setup)
        self.ends.append(time.perf_counter())

    def result(self, shape: Shape, peak: float | None) -> dict:
        seconds = self.ends[-1] - self.start
        flops = shape.flops(self.tokens, self.ref_tokens, self.att, self.ref_att)
        out = {
            "steps": len(self.ends),
            "pairs": self.pairs,
            "seconds": seconds,
            "pairs_per_s": self.pairs / seconds,
            "tokens_per_s": self.tokens / seconds,
            "tokens": self.tokens,
            "ref_tokens": self.ref_tokens,
            "attention_pairs": self.att,
            "ref_attention_pairs": self.ref_att,
            "params": shape.params,
            "model_flops": flops,
            "tflops": flops / seconds / 1e12,
            "mfu": flops / seconds / peak if peak else None,
            "peak_gpu_mem_gb": None,
        }
        if not self.setup.cpu:
            out["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return out


# --------------------------------------------------------------------------- inspo
def inspo_batches(setup: Setup, tokenizer, rows: list[dict], views) -> list[dict]:
    """The collated batches inspo trains on (its encoder and collator; no datasets needed)."""
    from inspo.data.collate import PreferenceCollator
    from inspo.data.encode import Encoder
    from inspo.data.templates import resolve_template

    enc = Encoder(tokenizer, resolve_template("default"), max_length=setup.max_length,
                  max_prompt_length=setup.max_length // 2)  # fmt: skip
    encoded = [
        {**enc.encode(r["prompt"], r["chosen"], r["rejected"], views), "index": i}
        for i, r in enumerate(rows)
    ]
    collate = PreferenceCollator(tokenizer.pad_token_id, views)
    return [collate(encoded[i : i + setup.batch]) for i in range(0, len(encoded), setup.batch)]


def run_inspo(setup: Setup, tokenizer, warm: list, timed: list, packing: bool, kernel: str,
              peak: float | None) -> dict:  # fmt: skip
    import lightning as L

    from inspo.models.load import frozen_copy
    from inspo.models.scoring import Scoring
    from inspo.objectives import DPO
    from inspo.settings import OptimConfig
    from inspo.training.module import PreferenceModule

    policy = build_model(setup, tokenizer)
    shape = Shape.of(policy)
    scoring = Scoring(packing=packing, packing_kernel=kernel or "auto")
    optim = OptimConfig(lr=LR, warmup_steps=0)  # as before: no warm-up
    module = PreferenceModule(
        policy, DPO(beta=BETA), frozen_copy(policy), optim=optim, scoring=scoring
    )
    meter = Meter(setup)

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            meter.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            meter.end()
            tokens = pl_module.step_tokens
            view = batch[pl_module.policy_view]
            real = int(view["attention_mask"].sum())
            meter.pairs += int(batch["index"].shape[0])
            for name, count in tokens.items():
                n = int(count.real)
                att = attention_pairs(view, shared=n < real)
                if name == "policy":
                    meter.tokens, meter.att = meter.tokens + n, meter.att + att
                else:
                    meter.ref_tokens, meter.ref_att = meter.ref_tokens + n, meter.ref_att + att

    def fit(batches: list, callbacks: list) -> None:
        trainer = L.Trainer(
            accelerator="cpu" if setup.cpu else "gpu", devices=1, precision=setup.precision,
            logger=False, log_every_n_steps=10, gradient_clip_val=1.0, num_sanity_val_steps=0,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            max_epochs=1, callbacks=callbacks,
        )  # fmt: skip
        loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
        trainer.fit(module, train_dataloaders=loader)

    fit(warm, [])
    free(setup)
    fit(timed, [Clock()])
    return meter.result(shape, peak)


def score_check(setup: Setup, tokenizer, batch: dict, kernels: list[str]) -> list[dict]:
    """The policy's summed log-probs of one batch, padded and packed under each kernel."""
    from inspo.models.scoring import Scoring, prepare_packing, score_pairs

    model = build_model(setup, tokenizer).eval()
    prepare_packing(model)  # as the training module does; padded calls are unchanged
    view = {k: v.to(setup.device) for k, v in batch["plain"].items()}

    def scores(how: Scoring, autocast: bool = True):
        with torch.no_grad(), setup.autocast(autocast):
            s = score_pairs(model, view, how)[0]
        return torch.cat([s.chosen, s.rejected]).double()

    padded = scores(Scoring())
    fp32 = scores(Scoring(), autocast=False)
    noise = float(((padded - fp32).abs() / fp32.abs()).max())
    out = []
    for kernel in kernels:
        rec = {"check": "packed = padded", "config": f"policy scores, kernel {kernel}"}
        try:
            packed = scores(Scoring(packing=True, packing_kernel=kernel))
            rel = float(((packed - padded).abs() / padded.abs()).max())
            ok = rel <= setup.tolerance
            rec |= {"status": "ok" if ok else "FAILED", "max_rel_diff": rel,
                    "padded_vs_fp32": noise,
                    "note": f"max rel. diff {rel:.1e} (tolerance {setup.tolerance:.0e}); "
                            f"padded vs fp32 {noise:.1e}; {len(padded)} rows"}  # fmt: skip
        except Exception as e:  # reported in the table; the other checks go on
            rec |= {"status": "error", "note": _short(e)}
        out.append(rec)
    return out


# --------------------------------------------------------------------------- TRL
def run_trl(setup: Setup, tokenizer, warm: list[dict], timed: list[dict],
            peak: float | None) -> dict:  # fmt: skip
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    from inspo.models.load import frozen_copy

    policy = build_model(setup, tokenizer)
    shape = Shape.of(policy)
    reference = frozen_copy(policy)
    meter = Meter(setup)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            meter.begin()

        def on_step_end(self, args, state, control, **kwargs):
            meter.end()

    def trainer(rows: list[dict], callbacks: list, workdir: str) -> trl.DPOTrainer:
        args = trl.DPOConfig(
            output_dir=workdir, per_device_train_batch_size=setup.batch, learning_rate=LR,
            lr_scheduler_type="constant", beta=BETA, max_length=setup.max_length,
            use_cpu=setup.cpu, bf16=setup.bf16, report_to="none", save_strategy="no",
            logging_steps=10, max_grad_norm=1.0, gradient_checkpointing=False,
            disable_tqdm=True, dataloader_num_workers=0, seed=SEED, num_train_epochs=1,
        )  # fmt: skip
        t = trl.DPOTrainer(model=policy, ref_model=reference, args=args,
                           train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                           callbacks=callbacks)  # fmt: skip
        collate = t.data_collator

        def counting(examples):  # once per batch, in order (no workers)
            batch = collate(examples)
            if callbacks:
                mask = batch["attention_mask"]
                length = mask.sum(-1).long()
                att = int((length * (length + 1) // 2).sum())
                meter.pairs += mask.shape[0] // 2
                meter.tokens += int(mask.sum())
                meter.ref_tokens += int(mask.sum())
                meter.att, meter.ref_att = meter.att + att, meter.ref_att + att
            return batch

        t.data_collator = counting
        return t

    with tempfile.TemporaryDirectory() as d:
        trainer(warm, [], d).train()
        free(setup)
        trainer(timed, [Clock()], d).train()
    return {**meter.result(shape, peak), "trl": trl.__version__}


# --------------------------------------------------------------------------- CUDA tests
def test_files() -> tuple[list[str], str | None]:
    """The test files holding CUDA-marked tests (only those are imported: the rest of the
    suite needs packages the GPU machine may lack), and the vLLM tests where vLLM is installed;
    with a note on vLLM otherwise."""
    files = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "tests").rglob("test_*.py")
        if "mark.cuda" in p.read_text(encoding="utf-8")
    )
    if importlib.util.find_spec("vllm") is not None:
        return [*files, "tests/online/test_vllm.py"], None
    return files, "vllm not installed (its wheel alone exceeds the 64 MiB that may travel)"


def cuda_tests(timeout: int) -> list[dict]:
    """The CUDA-marked tests (and vLLM's): one row per test (passed, failed, skipped: why)."""
    files, vllm_note = test_files()
    rows = pytest_rows(["-m", "cuda", *files[: len(files) - (vllm_note is None)]], timeout)
    if vllm_note:
        rows.append({"check": "CUDA test", "config": "test_vllm.py (generation=vllm)",
                     "status": "skipped", "note": vllm_note})  # fmt: skip
    else:  # the vLLM tests carry no marker: they skip themselves without CUDA
        rows += pytest_rows([files[-1]], timeout)
    return rows


def pytest_rows(args: list[str], timeout: int) -> list[dict]:
    """``pytest ARGS`` in a child: a row per test, then one for the whole run."""
    whole = {"check": "CUDA tests", "config": "pytest " + " ".join(a for a in args if "/" not in a)}
    with tempfile.TemporaryDirectory() as d:
        xml = Path(d) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               f"--junitxml={xml}", *args]  # fmt: skip
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return [{**whole, "status": "error", "note": f"timed out after {timeout} s"}]
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]
        if not xml.exists():
            return [{**whole, "status": "error", "note": tail[0]}]
        rows = []
        for case in ET.parse(xml).iter("testcase"):
            status, note = "passed", ""
            for tag, word in (("failure", "FAILED"), ("error", "error"), ("skipped", "skipped")):
                found = case.find(tag)
                if found is not None:
                    status = word
                    note = (found.get("message") or "").strip().split("\n")[0][:160]
            name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
            rows.append({"check": "CUDA test", "config": name, "status": status, "note": note})
        ok = proc.returncode in (0, 5)  # 5: no test collected (none marked)
        rows.append({**whole, "status": "ok" if ok else "FAILED", "note": tail[0]})
        return rows


# --------------------------------------------------------------------------- table
def _short(e: BaseException) -> str:
    return re.sub(r"\s+", " ", f"{type(e).__name__}: {e}")[:200]


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(records: list[dict]) -> str:
    trl_rate = next((r["pairs_per_s"] for r in records if r.get("config") == "TRL DPOTrainer"
                     and "pairs_per_s" in r), None)  # fmt: skip
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in records:
        ratio = ""
        if trl_rate and r.get("config", "").startswith("inspo") and "pairs_per_s" in r:
            ratio = f"{r['pairs_per_s'] / trl_rate:.2f}×"
        cells = [
            r.get("check", ""),
            r.get("config", ""),
            r.get("status", ""),
            _fmt(r.get("pairs_per_s"), ".2f"),
            _fmt(r.get("tokens_per_s"), ".0f"),
            _fmt(r.get("peak_gpu_mem_gb"), ".2f"),
            _fmt(r.get("tflops"), ".3g"),
            _fmt(r.get("mfu"), ".1%"),
            ratio,
            str(r.get("note", "")).replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_table(text: str) -> list[dict]:
    """The rows of :func:`table`'s output as {column: cell} (what the tests read back)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")), strict=True))
            for ln in lines[1:]]  # fmt: skip


# --------------------------------------------------------------------------- main
def kernels_to_run(setup: Setup) -> list[str]:
    """Every packed kernel the device runs in training: per row everywhere; on CUDA flex, and
    varlen where a varlen kernel is installed."""
    if setup.cpu:
        return ["blocks"]  # flex has no CPU backward; no varlen kernel runs on CPU
    from inspo.models.varlen_attention import varlen_kernel

    return ["varlen", "flex", "blocks"] if varlen_kernel() else ["flex", "blocks"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="the tiny model on CPU, fp32")
    ap.add_argument("--bf16", action="store_true",
                    help="with --cpu: bf16 autocast, as on the GPU (tolerance 1e-2)")  # fmt: skip
    ap.add_argument("--qwen", action="store_true",
                    help="with --cpu: the GPU's model, Qwen2.5-0.5B's shape (minutes)")  # fmt: skip
    ap.add_argument("--batch", type=int, help="pairs per step (GPU 16, CPU 4)")
    ap.add_argument("--warmup", type=int, help="warm-up steps (GPU 2, CPU 1)")
    ap.add_argument("--steps", type=int, help="timed steps (GPU 6, CPU 2)")
    ap.add_argument("--max-length", type=int, help="tokens per sequence (GPU 1024, CPU 256)")
    ap.add_argument("--tolerance", type=float, help="packed vs padded (GPU 1e-2, CPU 1e-5)")
    ap.add_argument("--tests", choices=("run", "skip"), default=None,
                    help="run the CUDA-marked tests (default: on GPU only)")  # fmt: skip
    ap.add_argument("--tests-timeout", type=int, default=210)
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole check, then later rows are skipped "
                         "(GPU 400; CPU none)")  # fmt: skip
    ap.add_argument("--no-trl", action="store_true", help="leave TRL's row out")
    ap.add_argument("--out", default=None, help="JSON lines of every record")
    ap.add_argument("--table", default=None, help="also write the table (and its footer) here")
    args = ap.parse_args(argv)
    cpu = args.cpu
    if not cpu and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --cpu")
    bf16 = args.bf16 or not cpu
    setup = Setup(
        cpu=cpu,
        bf16=bf16,
        qwen=args.qwen or not cpu,
        batch=args.batch or (4 if cpu else 16),
        warmup=args.warmup or (1 if cpu else 2),
        steps=args.steps or (2 if cpu else 6),
        max_length=args.max_length or (256 if cpu else 1024),
        tolerance=args.tolerance or (1e-2 if bf16 else 1e-5),
    )
    budget = args.budget or (math.inf if cpu else 400.0)
    t0 = time.perf_counter()
    from inspo.models.load import byte_tokenizer

    tok = byte_tokenizer()
    lengths, source = hh_like_lengths(
        setup.batch * (setup.warmup + setup.steps), 1234, setup.max_length
    )
    rows = text_rows(lengths, seed=1234)
    warm, timed = rows[: setup.batch * setup.warmup], rows[setup.batch * setup.warmup :]
    peak, peak_note = peak_flops(setup)
    device = "CPU" if cpu else torch.cuda.get_device_name()
    env = {"kind": "env", "device": device, "peak": peak_note, "peak_flops": peak,
           "torch": torch.__version__,
           "lengths": source, **vars(setup)}  # fmt: skip
    records: list[dict] = []
    out = open(args.out, "w") if args.out else None  # noqa: SIM115

    def emit(record: dict) -> None:
        if out:
            out.write(json.dumps(record) + "\n")
            out.flush()

    emit(env)
    print(f"# GPU check on {device} ({peak_note}); torch {torch.__version__}; lengths: {source}; "
          f"batch {setup.batch} pairs, {setup.warmup} warm-up + {setup.steps} timed steps, "
          f"{setup.precision}", flush=True)  # fmt: skip
    if args.tests == "run" or (args.tests is None and not cpu):
        for r in cuda_tests(args.tests_timeout):
            records.append(r)
            emit(r)
        print(f"# CUDA tests done at {time.perf_counter() - t0:.0f} s", flush=True)

    from inspo.training.views import train_views

    views = train_views("off", True)
    warm_b = inspo_batches(setup, tok, warm, views)
    timed_b = inspo_batches(setup, tok, timed, views)
    for r in score_check(setup, tok, timed_b[0], kernels_to_run(setup)):
        records.append(r)
        emit(r)
    free(setup)  # the models of each check go when its function returns
    # The default kernel and the peer first: if the budget runs out, the other kernels go.
    first, *others = kernels_to_run(setup)
    configs = [(f"inspo packed ({first})", "inspo", True, first)]
    if not args.no_trl:
        configs += [("TRL DPOTrainer", "trl", False, "")]
    configs += [("inspo padded", "inspo", False, "auto")]
    configs += [(f"inspo packed ({k})", "inspo", True, k) for k in others]
    for label, framework, packing, kernel in configs:
        rec = {"check": "DPO steps", "config": label}
        elapsed = time.perf_counter() - t0
        if elapsed > budget:
            rec |= {"status": "skipped", "note": f"time budget ({elapsed:.0f} s > {budget:.0f})"}
        else:
            try:
                if framework == "inspo":
                    result = run_inspo(setup, tok, warm_b, timed_b, packing, kernel, peak)
                else:
                    result = run_trl(setup, tok, warm, timed, peak)
                rec |= {"status": "ok", **result,
                        "note": f"{result['steps']} steps, {result['pairs']} pairs, "
                                f"{result['seconds']:.2f} s"}  # fmt: skip
            except Exception as e:  # reported in the table; the other configurations go on
                rec |= {"status": "error", "note": _short(e)}
            free(setup)
        records.append(rec)
        emit(rec)
        print(f"# {label}: {rec['status']} at {time.perf_counter() - t0:.0f} s", flush=True)
    text = (f"{table(records)}\n\n(total {time.perf_counter() - t0:.0f} s on {device}; MFU "
            f"against {peak_note}; FLOPs = 6·N·policy tokens + 2·N·reference tokens + "
            f"attention; lengths: {source})\n")  # fmt: skip
    print(text)
    if args.table:
        Path(args.table).write_text(text)
    if out:
        out.close()
    failed = [r for r in records if r.get("status") in ("FAILED", "error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
