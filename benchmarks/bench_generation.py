"""Generation tokens/s: inspo's sampler (each prompt prefilled once, its KV cache repeated for
its K samples) against HF ``generate(num_return_sequences=K)`` (which prefills every prompt K
times), on the same model, prompts and sampling distribution (temperature 1, no top-k/top-p).

Every row decodes exactly ``--new-tokens`` tokens (no EOS stop), so both do the same work.
Configurations alternate inside each round (A, B, A, B, ...); the first round is a warm-up;
the table shows the median over the timed rounds. tokens/s counts generated tokens.

    python benchmarks/bench_generation.py                       # tiny + small, short + long prompts
    python benchmarks/bench_generation.py --sizes tiny --k 2 4 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from transformers import GenerationConfig

from inspo.models.load import tiny_llama
from inspo.models.sampling import SamplingConfig, sample_ids

SIZES = {
    "tiny": {"hidden_size": 256, "num_layers": 4, "num_heads": 4},  # the embedded default
    "small": {"hidden_size": 512, "num_layers": 8, "num_heads": 8},  # ≈ 25 M parameters
}
PROMPTS = {"short": 24, "long": 384}  # tokens per prompt (the built-in task's are ≈ 20)


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab - 3, (length,), generator=g).tolist() for _ in range(n)]


def inspo(model, rows, k, new, batch) -> float:
    t = time.perf_counter()
    sample_ids(model, rows, SamplingConfig(max_new_tokens=new, seed=1), n=k, eos_token_ids=[],
               pad_token_id=0, batch_size=batch)  # fmt: skip
    return time.perf_counter() - t


def hf(model, rows, k, new, batch) -> float:
    """``generate`` with an explicit, complete sampling config; prompts are equally long, so
    no padding is needed."""
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=new, min_new_tokens=new, num_return_sequences=k,
                              pad_token_id=0, eos_token_id=None, use_cache=True)  # fmt: skip
    t = time.perf_counter()
    per = max(1, batch // k)
    for i in range(0, len(rows), per):
        ids = torch.tensor(rows[i : i + per])
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                           generation_config=config)  # fmt: skip
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES))
    p.add_argument("--prompt-lengths", nargs="+", default=list(PROMPTS))
    p.add_argument("--k", nargs="+", type=int, default=[2, 4])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=64, help="decoded rows per forward")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("results_generation.jsonl"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows_out = []
    for size in args.sizes:
        model = tiny_llama(vocab_size=259, seed=0, **SIZES[size]).eval()
        n_params = sum(x.numel() for x in model.parameters())
        for plen in args.prompt_lengths:
            rows = prompts(args.prompts, PROMPTS[plen], 259)
            for k in args.k:
                times = {"inspo": [], "hf": []}
                for r in range(args.rounds + 1):
                    for name, fn in (("inspo", inspo), ("hf", hf)):
                        s = fn(model, rows, k, args.new_tokens, args.batch)
                        if r:  # round 0 warms up
                            times[name].append(s)
                tokens = args.prompts * k * args.new_tokens
                med = {n: statistics.median(v) for n, v in times.items()}
                rec = {"when": when, "size": size, "params": n_params, "prompt": PROMPTS[plen],
                       "k": k, "new_tokens": args.new_tokens, "threads": args.threads,
                       "load": os.getloadavg()[0], "machine": platform.processor(),
                       **{f"{n}_tokens_per_s": tokens / med[n] for n in med},
                       "speedup": med["hf"] / med["inspo"]}  # fmt: skip
                rows_out.append(rec)
                print(json.dumps(rec), flush=True)
    with open(args.out, "a") as f:
        for rec in rows_out:
            f.write(json.dumps(rec) + "\n")
    print("\n| size | prompt tokens | K | inspo tokens/s | HF generate tokens/s | inspo / HF |")
    print("|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['size']} | {r['prompt']} | {r['k']} | {r['inspo_tokens_per_s']:.0f} | "
              f"{r['hf_tokens_per_s']:.0f} | {r['speedup']:.2f}× |")  # fmt: skip


if __name__ == "__main__":
    main()
