"""The research presets compose, and every combination of their grids is a valid run."""

from __future__ import annotations

import itertools

import pytest

from inspo.config import build_objective, check_run, compose_config, resolve_reference
from inspo.settings import load_settings


def grid(cfg):
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    return [dict(zip(params, combo, strict=True)) for combo in itertools.product(*params.values())]


@pytest.mark.parametrize(("preset", "runs"), [("research", 96), ("research_remedies", 16)])
def test_research_grid_is_valid(preset, runs, tmp_path):
    base = compose_config([f"experiment={preset}"], tmp_path)
    combos = grid(base)
    assert len(combos) == runs
    assert base.eval.generate and base.data.source.length_bias > 0
    # Every (objective, reflection, reference, context) cell is checked; Ψ and seed only vary
    # numbers the config checks do not look at.
    cells = {tuple((k, v) for k, v in c.items() if k not in ("objective.scalarization", "seed"))
             for c in combos}  # fmt: skip
    for cell in cells:
        cfg = compose_config([f"experiment={preset}", *(f"{k}={v}" for k, v in cell)], tmp_path)
        settings = load_settings(cfg)
        objective = build_objective(settings.objective)
        settings.reference = resolve_reference(settings.reference, objective)
        check_run(settings, objective)
        assert cfg.trainer.max_steps == 250
