"""inspo-report: the invariance report of a sweep (inspo.evaluation.sweep_report).

inspo-report logs/train/multiruns/2026-11-22_12-00-00
inspo-report SWEEP_DIR --group-by standard_weight --wandb
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from inspo.evaluation.sweep_report import write_report


def main(argv: list[str] | None = None) -> None:
    """Console entry point; returns None so that the exit status is 0. See :func:`cli`."""
    cli(argv)


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, write the report, print it, and return it."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: SWEEP_DIR")
    parser.add_argument("--group-by", default="", help="extra choices to group by, comma-separated")
    parser.add_argument("--no-divergence", action="store_true")
    parser.add_argument("--divergence-prompts", type=int, default=64)
    parser.add_argument("--wandb", action="store_true", help="log tables and plots to wandb")
    parser.add_argument("--wandb-project", default="inspo")
    args = parser.parse_args(argv)
    try:
        report, md = write_report(
            args.sweep_dir,
            args.out,
            tuple(k for k in args.group_by.split(",") if k),
            not args.no_divergence,
            args.divergence_prompts,
            args.wandb_project if args.wandb else None,
        )
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from e
    print(md)
    return report


if __name__ == "__main__":
    main()
