"""inspo-report: the invariance report of a sweep (inspo.evaluation.sweep_report), or the tuned
head-to-head of two methods (inspo.evaluation.head_to_head).

inspo-report logs/train/multiruns/2026-11-22_12-00-00
inspo-report SWEEP_DIR --group-by standard_weight --wandb
inspo-report logs/fair/main --head-to-head
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
    parser.add_argument(
        "--head-to-head",
        action="store_true",
        help="SWEEP_DIR holds two methods' tuning trials (scored on the tuning prompts) and "
        "their test runs (tuned/, untuned/): write head_to_head.md and .json instead",
    )
    args = parser.parse_args(argv)
    if args.head_to_head:
        from inspo.evaluation.head_to_head import write

        try:
            report, md = write(args.sweep_dir, args.out)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(str(e)) from e
        print(md)
        return report
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
