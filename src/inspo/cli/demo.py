"""inspo-demo: the main job. SFT → DPO and InSPO-DPO from the same SFT policy → evaluation.

inspo-demo                       # logs/demo/<timestamp>
inspo-demo --out DIR seed=1      # trailing words are Hydra overrides for every stage
"""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path

from inspo import runtime
from inspo.evaluation.stage import EvalConfig
from inspo.recipes.demo import run_demo
from inspo.recipes.iterative_demo import run_iterative_demo


def main(argv: list[str] | None = None) -> None:
    """Console entry point; returns None so that the exit status is 0."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument(
        "--iterative", action="store_true", help="the iterative demo (inspo.recipes.iterative_demo)"
    )
    parser.add_argument("--eval-prompts", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--eval-batch-size", type=int, default=128)
    parser.add_argument("--eval-seed", type=int, default=1234)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every stage")
    args = parser.parse_args(argv)
    runtime.setup()
    kind = "iterative_demo" if args.iterative else "demo"
    out = args.out or Path("logs") / kind / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    demo = run_iterative_demo if args.iterative else run_demo
    ecfg = EvalConfig(
        n_prompts=args.eval_prompts,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.eval_batch_size,
        seed=args.eval_seed,
    )
    demo(out, args.overrides, ecfg)


if __name__ == "__main__":
    main()
