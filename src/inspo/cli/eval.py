"""inspo-eval: evaluate a finished run's policy from the prompt alone (inspo.evaluation.stage).

inspo-eval RUN_DIR                              # writes RUN_DIR/eval/, updates summary.json
inspo-eval RUN_DIR --scorer PATH_TO_RM --n-prompts 64 --temperature 0.7 --top-p 0.9
inspo-eval RUN_DIR --device cuda:1               # default: eval.device (auto: cuda if any)
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from omegaconf import OmegaConf

from inspo import runtime
from inspo.evaluation.stage import evaluate_run
from inspo.settings import EvalConfig, load

#: Options that override the run's own ``eval`` settings (:class:`~inspo.settings.EvalConfig`).
OVERRIDES = (
    "reference",
    "scorer",
    "n_prompts",
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "batch_size",
    "seed",
    "device",
)


def main(argv: list[str] | None = None) -> None:
    """Console entry point; returns None so that the exit status is 0. See :func:`cli`."""
    cli(argv)


def cli(argv: list[str] | None = None) -> dict[str, float]:
    """Parse ``argv``, evaluate, print, and return the metrics."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder of inspo-train")
    parser.add_argument("--policy", default=None, help="policy path (default RUN_DIR/policy)")
    parser.add_argument("--reference", default=None, help="default: the run's initial policy")
    parser.add_argument("--scorer", default=None, help="gold | path of a reward model")
    parser.add_argument("--n-prompts", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None, help="0: off")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="default RUN_DIR/eval")
    parser.add_argument("--device", default=None, help="auto (cuda if available) | cpu | cuda:N")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--wandb", action="store_true", help="log to a new wandb run")
    args = parser.parse_args(argv)
    runtime.setup()
    try:
        cfg = OmegaConf.load(args.run_dir / ".hydra" / "config.yaml")
        saved = load(EvalConfig, cfg.eval, "eval.") if "eval" in cfg else EvalConfig()
        given = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
        ecfg = replace(saved, **given, progress=not args.no_progress)  # checked again
        metrics, out_dir = evaluate_run(
            args.run_dir, ecfg, policy_path=args.policy, out_dir=args.out, log_to_wandb=args.wandb
        )
    except runtime.user_errors() as e:
        runtime.fail("inspo-eval", e)
    for k, v in metrics.items():
        print(f"{k:32s} {v:.4f}")
    info = json.loads((out_dir / "metrics.json").read_text())
    print(f"device {info['device']}; eval/kl samples: {info['kl_samples']}; wrote {out_dir}")
    return metrics


if __name__ == "__main__":
    main()
