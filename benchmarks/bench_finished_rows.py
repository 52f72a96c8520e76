"""Sampling with finished rows leaving the batch (inspo.models.sampling.LEAVE_AT, the default)
against every row decoded to ``--new-tokens`` (LEAVE_AT = 2: no row ever leaves), on a real
chat model whose responses end at different lengths. Both draw the same samples (checked);
passes alternate, medians.

    python benchmarks/bench_finished_rows.py --model MODEL_DIR [--new-tokens 96 --rounds 3]

MODEL_DIR: a causal LM checkpoint with a chat template, e.g. the fp32 SmolLM2-135M-Instruct
that ``model=smollm2`` converts from its GGUF (under ``paths.cache_dir/gguf``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from inspo.models import sampling
from inspo.settings import SamplingConfig

QUESTIONS = [
    "What is 2+2?",
    "Name a colour.",
    "Say hi.",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Give me one word for happy.",
    "Explain gravity in one sentence.",
    "List three fruits.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in QUESTIONS
    ]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, seed=1)
    default = sampling.LEAVE_AT

    def draw(leave_at: float) -> tuple[float, list]:
        sampling.LEAVE_AT = leave_at
        t = time.perf_counter()
        groups = sampling.sample_ids(
            model, prompts, cfg, n=args.k, eos_token_ids=[tok.eos_token_id],
            pad_token_id=tok.pad_token_id, batch_size=len(prompts) * args.k,
        )  # fmt: skip
        return time.perf_counter() - t, [s.ids for g in groups for s in g]

    draw(default)  # warm-up
    times: dict[str, list[float]] = {"leave": [], "keep": []}
    for _ in range(args.rounds):
        t_leave, leave = draw(default)
        t_keep, keep = draw(2.0)
        if leave != keep:
            raise SystemExit("the two ways drew different samples")
        times["leave"].append(t_leave)
        times["keep"].append(t_keep)
    record = {
        "bench": "finished_rows",
        "model": os.path.basename(args.model.rstrip("/")),
        "prompts": len(prompts),
        "k": args.k,
        "new_tokens": args.new_tokens,
        "lengths": sorted(len(x) for x in leave),
        "leave_s": statistics.median(times["leave"]),
        "keep_s": statistics.median(times["keep"]),
        "ratios": [k / v for k, v in zip(times["keep"], times["leave"], strict=True)],
        "load": os.getloadavg()[0],
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(record))
    print(
        f"keep ÷ leave: {record['keep_s'] / record['leave_s']:.2f}× "
        f"({', '.join(f'{r:.2f}' for r in record['ratios'])}); "
        f"leave {record['leave_s']:.2f} s, keep {record['keep_s']:.2f} s a pass"
    )


if __name__ == "__main__":
    main()
