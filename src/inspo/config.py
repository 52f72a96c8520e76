"""Where the Hydra configs live, installed or editable."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> Path:
    """``inspo/conf`` inside an installed wheel, else the repository's top-level ``conf/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"inspo's Hydra configs (train.yaml) not found near {here}")
