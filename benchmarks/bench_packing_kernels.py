"""The attention of one packed batch under each packing kernel (data.packing_kernel), alone.

    python benchmarks/bench_packing_kernels.py      # CPU: forward only (no flex backward on CPU)
    python benchmarks/bench_packing_kernels.py --device cuda --dtype bf16   # forward + backward

A layout of ``--pairs`` pairs with shared contexts, HH-like lengths (context 100–700, responses
30–250 tokens), 14 query and 2 key/value heads of 64 (Qwen2.5-0.5B's attention); the kernels
alternate within each repetition, each one's layout derivation (block mask, gathered keys)
inside its timing, and the table gives medians and the ratio to ``blocks`` (sdpa per row).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import inspo.models.varlen_attention as va
from inspo.models.packed_attention import Blocks, block_attention


def layout(pairs: int, seed: int = 0) -> tuple[list, list]:
    g = torch.Generator().manual_seed(seed)
    blocks, positions, start = [], [], 0
    for _ in range(pairs):
        p, c, r = (int(torch.randint(a, b, (1,), generator=g)) for a, b in
                   ((100, 700), (30, 250), (30, 250)))  # fmt: skip
        blocks += [(start, start + p + c, start, start),
                   (start + p + c, start + p + c + r, start, start + p)]  # fmt: skip
        positions += [*range(p + c), *range(p, p + r)]
        start += p + c + r
    return blocks, positions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    dev, dtype = (
        torch.device(args.device),
        {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype],
    )
    backward = dev.type == "cuda"
    blocks, positions = layout(args.pairs)
    t = len(positions)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, t, 64, generator=g).to(dev, dtype).requires_grad_(backward)
               for h in (14, 2, 2))  # fmt: skip
    module = torch.nn.Module()
    kernels = {
        "blocks": lambda b: block_attention(module, q, k, v, b)[0],
        "flex (eager)" if dev.type == "cpu" else "flex": lambda b: va.flex_attention(
            q, k, v, b, None, None
        ),
    }
    if dev.type == "cpu":  # what the GPU runs, compiled by inductor for the CPU
        kernels["flex (compiled)"] = lambda b: va.compiled_flex()(
            q, k, v, block_mask=va.flex_block_mask(b, None), enable_gqa=True
        ).transpose(1, 2)
    elif dtype == torch.bfloat16 and va.varlen_kernel() is not None:
        kernels["varlen"] = lambda b: va.varlen_attention(q, k, v, b, None, None)

    def run(fn) -> float:
        b = Blocks(blocks, torch.tensor(positions, device=dev))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.set_grad_enabled(backward):
            out = fn(b)
            if backward:
                out.float().sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in kernels.values():  # warm-up: compilation, autotuning
        run(fn)
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(args.reps):
        for name, fn in kernels.items():
            times[name].append(run(fn))
    what = "forward + backward" if backward else "forward"
    print(f"T = {t} tokens, {2 * args.pairs} blocks, 14/2 heads of 64, {args.dtype}, {dev}, "
          f"{what}, {torch.get_num_threads()} threads; median of {args.reps}:\n")  # fmt: skip
    print("| kernel | ms | × blocks |\n|---|---|---|")
    base = statistics.median(times["blocks"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m * 1e3:.2f} | {m / base:.2f} |")


if __name__ == "__main__":
    main()
