"""Reflection and reference knobs reach the module and the data through the Hydra config."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import ConfigCompositionException

from inspo.config import build_objective, check_run, compose_config, resolve_reference, run_tags
from inspo.models.load import byte_tokenizer
from inspo.settings import load_settings
from inspo.training.module import LossWeights
from inspo.training.reference import ReferenceSync, reference_callbacks
from inspo.training.run import build_datamodule, build_module

TINY = ["model.tiny.hidden_size=16", "model.tiny.num_layers=1", "model.tiny.num_heads=2"]


def cfg_for(*overrides, tmp_path):
    """The settings of ``inspo-train`` with these overrides."""
    overrides = [*TINY, f"paths.cache_dir={tmp_path}", *overrides]
    return load_settings(compose_config(overrides, tmp_path / "run"))


def build(settings):
    objective = build_objective(settings.objective)
    settings.reference = resolve_reference(settings.reference, objective)
    check_run(settings, objective)
    tok = byte_tokenizer()
    return build_module(settings, objective, tok), build_datamodule(settings, tok, objective)


def test_inspo_knobs_from_config(tmp_path):
    cfg = cfg_for("reflection=inspo", "reflection.standard_weight=0.5",
                  "reflection.distill_weight=0.1", "reflection.template=raw",
                  "reflection.reference_context=plain", tmp_path=tmp_path)  # fmt: skip
    module, dm = build(cfg)
    assert module.hparams.reflection == "inspo"
    assert module.weights == LossWeights(trained=1.0, standard=0.5, distill=0.1)
    assert module.reference_view == "plain"
    assert dm.template == "raw" and dm.train_views == ("reflective", "plain")
    assert module.train_views == dm.train_views


def test_one_sided_from_config(tmp_path):
    module, dm = build(cfg_for("reflection=inspo_one_sided", tmp_path=tmp_path))
    assert module.hparams.reflection == "inspo_one_sided"
    assert (module.policy_view, module.reference_view) == ("reflective", "plain")
    assert set(dm.train_views) == {"reflective", "plain"}


def test_sync_and_precomputed_from_config(tmp_path):
    cfg = cfg_for("reference=sync", "reference.sync_every=3", "reference.sync_alpha=0.5",
                  tmp_path=tmp_path)  # fmt: skip
    module, _ = build(cfg)
    (cb,) = reference_callbacks(cfg.reference)
    assert isinstance(cb, ReferenceSync) and (cb.every, cb.alpha) == (3, 0.5)
    assert module.hparams.reference_in_checkpoint and module.reference is not None
    cfg = cfg_for("reference=precomputed", tmp_path=tmp_path)
    module, _ = build(cfg)
    assert not module.hparams.reference_in_checkpoint and reference_callbacks(cfg.reference) == []
    for a, b in zip(module.reference.parameters(), module.policy.parameters(), strict=True):
        assert torch.equal(a, b)  # the initial policy's scores are what gets cached


@pytest.mark.parametrize(("objective", "kind"), [("simpo", "none"), ("dpo", "policy_init")])
def test_auto_reference_and_tags(tmp_path, objective, kind):
    cfg = cfg_for(f"objective={objective}", "reference=auto", "reflection=inspo",
                  "tags=[mine]", tmp_path=tmp_path)  # fmt: skip
    cfg.reference = resolve_reference(cfg.reference, build_objective(cfg.objective))
    assert cfg.reference.kind == kind
    tags = run_tags(cfg)
    assert tags[0] == "mine" and f"reference:{kind}" in tags and "reflection:inspo" in tags
    assert any(t.startswith("psi:") for t in tags) and any(t.startswith("objective:") for t in tags)


def test_packing_kernel_from_config(tmp_path):
    """data.packing_kernel reaches the module's scorer (auto by default); a misspelt kernel
    stops the run before any model is trained, naming the valid ones."""
    module, _ = build(cfg_for(tmp_path=tmp_path))
    assert (module.scoring.packing, module.scoring.packing_kernel) == (True, "auto")
    module, _ = build(cfg_for("data=hh_rlhf", "data.packing_kernel=flex", tmp_path=tmp_path))
    assert module.scoring.packing_kernel == "flex"
    with pytest.raises(ConfigCompositionException) as err:  # while Hydra composes
        cfg_for("data.packing_kernel=flash", tmp_path=tmp_path)
    assert "expected one of [auto, blocks, flex, varlen]" in str(err.value.__cause__)
