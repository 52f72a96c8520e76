"""Process-wide settings every entry point applies before it starts work."""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

from omegaconf import DictConfig


def setup() -> None:
    """TF32 matmuls on CUDA devices, and a quiet console: one progress bar
    per stage and the results, without the libraries' tips, per-load weight bars and the
    warning about the frozen reference being in eval mode (it is meant to be)."""
    import datasets
    import torch
    import transformers

    # On a CPU, "high" switches oneDNN's fp32 matmuls to TF32 where the CPU offers a reduced
    # precision kernel: other numbers than full fp32 (and no faster for small models), so a
    # CPU run keeps IEEE fp32 and its results match every other CPU's.
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    for name in ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: "litlogger" not in record.getMessage())


def close_loggers() -> None:
    """Close wandb, even after an exception, so runs are never left dangling."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def user_errors() -> tuple[type[Exception], ...]:
    """Errors in what the user asked for (a setting, the data), reported in one line."""
    from inspo.data.report import DataError
    from inspo.settings import ConfigError

    return (ConfigError, DataError)


def fail(prog: str, error: BaseException) -> NoReturn:
    """Exit with ``prog: error: <message>`` on one line (status 2, as argparse), no traceback:
    the message names the setting or the data, which is all the user needs."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = " ".join(lines) or type(error).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_app(fn: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig, prog: str) -> float | None:
    """What an entry point does with its composed config: set up, run ``fn``, always close the
    loggers, and return ``optimized_metric`` (None when absent or NaN) for Hydra's sweepers. A
    bad setting or bad data ends the program with one line (:func:`fail`)."""
    setup()
    try:
        summary = fn(cfg)
    except user_errors() as e:
        fail(prog, e)
    finally:
        close_loggers()
    value = summary["metrics"].get(cfg.optimized_metric)
    return None if value is None or math.isnan(value) else value
