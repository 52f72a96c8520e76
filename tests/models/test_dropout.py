"""Dropout is off by default in the policy and the reference (model.disable_dropout)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import FAST
from inspo.config import build_objective, compose_config
from inspo.models.load import load_policy, turn_off_dropout
from inspo.settings import load_settings
from inspo.training.run import build_module


def with_dropout(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":  # attention dropout is a float the attention module reads at call time
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, attention_dropout=0.5)  # fmt: skip
        return LlamaForCausalLM(cfg)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.5,
                     embd_pdrop=0.5, attn_pdrop=0.5)  # fmt: skip
    return GPT2LMHeadModel(cfg)


def two_passes_agree(model: torch.nn.Module) -> bool:
    model.train()
    ids = torch.arange(24).reshape(2, 12) % 64
    with torch.no_grad():
        return torch.equal(model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_turn_off_dropout_makes_train_mode_deterministic(kind):
    model = with_dropout(kind)
    model.config._attn_implementation = "eager"  # sdpa and eager both apply the rate
    assert not two_passes_agree(model)
    turn_off_dropout(model)
    assert two_passes_agree(model)
    assert all(
        v == 0.0 for k, v in model.config.to_dict().items() if "dropout" in k or "pdrop" in k
    )


@pytest.mark.parametrize("disable", [True, False])
def test_load_policy_and_the_training_module_disable_dropout_by_default(tmp_path, disable):
    with_dropout("llama").save_pretrained(tmp_path / "m")
    policy = load_policy(str(tmp_path / "m"), disable_dropout=disable)
    assert two_passes_agree(policy) == disable
    # Through the config: model.disable_dropout (default true) reaches policy and reference.
    from inspo.models.load import byte_tokenizer

    tok = byte_tokenizer()
    fast = [o for o in FAST if not o.startswith("model.")]
    overrides = [*fast, "model=hf", f"model.name_or_path={tmp_path / 'm'}",
                 f"model.disable_dropout={str(disable).lower()}"]  # fmt: skip
    settings = load_settings(compose_config(overrides, tmp_path / "run"))
    module = build_module(settings, build_objective(settings.objective), tok)
    module.train()
    assert two_passes_agree(module.policy) == disable
    assert module.reference is not None and not module.reference.training
