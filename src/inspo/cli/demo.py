"""inspo-demo: the main job. SFT → DPO and InSPO-DPO from the same SFT policy → evaluation.

inspo-demo                       # logs/demo/<timestamp>
inspo-demo --out DIR seed=1      # trailing words are Hydra overrides for every stage
inspo-demo --iterative           # offline DPO beside iterative DPO and InSPO-DPO
inspo-demo --real --data FILE    # SmolLM2 on HH-RLHF: reward models, offline and iterative
"""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path

from inspo import runtime
from inspo.recipes.demo import run_demo
from inspo.recipes.iterative_demo import run_iterative_demo
from inspo.recipes.real_demo import run_real_demo
from inspo.settings import EvalConfig

#: Rows per sampling forward in the demo's evaluation (eval.batch_size defaults to 64).
DEMO_EVAL_BATCH = 128


def main(argv: list[str] | None = None) -> None:
    """Console entry point; returns None so that the exit status is 0."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument(
        "--iterative", action="store_true", help="the iterative demo (inspo.recipes.iterative_demo)"
    )
    parser.add_argument(
        "--real",
        action="store_true",
        help="the real recipe (inspo.recipes.real_demo): a pretrained model on HH-RLHF",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="--real: a local HH-RLHF file (default: the Hub's Anthropic/hh-rlhf)",
    )
    # The evaluation's settings: eval.* (inspo.settings.EvalConfig) unless given here.
    parser.add_argument("--eval-prompts", type=int, default=None, help="eval.n_prompts")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="eval.max_new_tokens")
    parser.add_argument(
        "--eval-batch-size", type=int, default=None, help=f"{DEMO_EVAL_BATCH}; --real: eval.*"
    )
    parser.add_argument("--eval-seed", type=int, default=None, help="eval.seed")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every stage")
    args = parser.parse_args(argv)
    runtime.setup()
    kind = "real_demo" if args.real else "iterative_demo" if args.iterative else "demo"
    out = args.out or Path("logs") / kind / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    given = {
        "n_prompts": args.eval_prompts,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.eval_batch_size,
        "seed": args.eval_seed,
    }
    given = {k: v for k, v in given.items() if v is not None}
    try:
        if args.real:
            data = [f"data.source.path={args.data}", "data.source.splits=null"] if args.data else []
            run_real_demo(out, [*data, *args.overrides], given)
            return
        demo = run_iterative_demo if args.iterative else run_demo
        ecfg = EvalConfig(**{"batch_size": DEMO_EVAL_BATCH, **given})
        demo(out, args.overrides, ecfg)
    except runtime.user_errors() as e:
        runtime.fail("inspo-demo", e)


if __name__ == "__main__":
    main()
