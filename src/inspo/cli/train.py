"""inspo-train: one preference-optimisation run (``conf/train.yaml``; ``-m`` for sweeps)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from inspo import runtime
from inspo.config import config_dir
from inspo.training.run import run


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train once; returns ``optimized_metric`` so Hydra sweepers can optimise it."""
    return runtime.run_app(run, cfg, "inspo-train")


if __name__ == "__main__":
    main()
