"""Real model families: sequence scores of tiny random Llama, Qwen2, GPT-2, Gemma and
Mistral match a token-by-token computation, with right and left padding; model options; LoRA with
the adapter-disabled reference."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from inspo.data.collate import PreferenceCollator
from inspo.data.encode import Encoder
from inspo.data.templates import resolve_template
from inspo.models.load import load_model, tiny_llama
from inspo.objectives import DPO
from inspo.settings import LoraConfig, ModelConfig, TinyConfig
from inspo.training.module import PreferenceModule

ROWS = [("Q: bkt? A:", "bakitu", "zz"), ("Q: a much longer prompt? A:", "ok", "nope, no")]
SIZES = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
}  # fmt: skip
FAMILIES = {
    "llama": SIZES,
    "qwen2": SIZES,
    "mistral": SIZES,
    "gemma": {**SIZES, "head_dim": 16},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2},
}


def tiny(family, tokenizer, **kw):
    cfg = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        intermediate_size=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **FAMILIES[family],
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, **kw).eval()


def batch(tokenizer):
    enc = Encoder(tokenizer, resolve_template("default"), max_length=128, max_prompt_length=64)
    rows = [{**enc.encode(*r, ["plain"]), "index": i} for i, r in enumerate(ROWS)]
    return PreferenceCollator(tokenizer.pad_token_id, ("plain",))(rows)["plain"]


def to_left_padding(view):
    """The same sequences with the padding moved to the left."""
    out = {k: torch.zeros_like(v) for k, v in view.items()}
    width = view["input_ids"].shape[1]
    for i, n in enumerate(view["attention_mask"].sum(1).tolist()):
        for k in out:
            out[k][i, width - n :] = view[k][i, :n]
    return out


def direct(model, view):
    """Σ log π over the masked tokens, one unpadded sequence at a time, token by token."""
    scores = []
    for i in range(view["input_ids"].shape[0]):
        keep = view["attention_mask"][i].bool()
        ids, mask = view["input_ids"][i][keep], view["loss_mask"][i][keep]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
        scores.append(sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t]))
    return torch.tensor(scores, dtype=torch.double)


def scores(model, view):
    module = PreferenceModule(model, DPO(), None)
    s = module.score_view(model, view)
    return torch.cat([s.chosen, s.rejected]).double()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_scores_match_direct_computation_with_either_padding(tokenizer, family):
    model = tiny(family, tokenizer)
    view = batch(tokenizer)
    assert (view["attention_mask"] == 0).any(), "the batch must contain padding"
    want = direct(model, view)
    with torch.no_grad():
        right = scores(model, view)
        left = scores(model, to_left_padding(view))
    torch.testing.assert_close(right, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(left, want, atol=1e-4, rtol=1e-5)


def test_model_options(tokenizer):
    view = batch(tokenizer)
    tiny = TinyConfig(hidden_size=32, num_layers=2, num_heads=2)

    def load(**settings):
        return load_model(ModelConfig(tiny=tiny, **settings), tokenizer)

    eager = load(attn_implementation="eager")
    sdpa = load(attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager"
    assert sdpa.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(scores(eager, view), scores(sdpa, view), atol=1e-4, rtol=1e-5)
    bf16 = load(dtype="bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(scores(bf16, view), scores(eager, view), atol=0.5, rtol=0.02)
    ckpt = load(gradient_checkpointing=True).train()
    assert getattr(ckpt, "is_activation_checkpointing", None) or ckpt.is_gradient_checkpointing
    scores(ckpt, view).sum().backward()
    assert all(p.grad is not None for p in ckpt.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="dtype: unknown value 'fp8'; valid: fp32, bf16, fp16"):
        load(dtype="fp8")


def test_lora_reference_is_the_base_model_with_the_adapter_off(tokenizer):
    pytest.importorskip("peft", reason="the peft extra is not installed")
    tiny_kw = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "seed": 0}
    lora = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    model = ModelConfig(tiny=TinyConfig(**tiny_kw), lora=lora)
    assert model.lora == LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"])
    policy = load_model(model, tokenizer)
    base = tiny_llama(tokenizer=tokenizer, **tiny_kw).eval()
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # a trained adapter: B is zero at init, which would hide any bug
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    module = PreferenceModule(policy, DPO(), None, adapter_reference=True)
    module.train()
    view = batch(tokenizer)
    ref = module.reference_scores({"plain": view}, "plain")
    with torch.no_grad():
        want = scores(base, view)
    torch.testing.assert_close(torch.cat([ref.chosen, ref.rejected]).double(), want, atol=1e-5,
                               rtol=1e-6)  # fmt: skip
    assert policy.training, "the policy's train mode is restored"
    pol = module.score_view(policy, view)
    assert not torch.allclose(pol.chosen.double(), want[:2], atol=1e-3)
    assert sum(p.numel() for p in module.parameters()) < 2 * sum(
        p.numel() for p in base.parameters()
    )
