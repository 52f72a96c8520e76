"""inspo-iterate: iterative and online preference optimisation (``conf/iterate.yaml``)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from inspo import runtime
from inspo.config import config_dir
from inspo.online.run import iterate


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="iterate")
def main(cfg: DictConfig) -> float | None:
    """Run the loop once; returns ``optimized_metric`` so Hydra sweepers can optimise it."""
    return runtime.run_app(iterate, cfg, "inspo-iterate")


if __name__ == "__main__":
    main()
