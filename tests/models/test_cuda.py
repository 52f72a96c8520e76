"""On a CUDA device: bf16 scoring, and packed rows under each attention kernel (per-row sdpa,
compiled flex attention, flash-attention's varlen kernel from the flash_attn package or from
torch) scoring as the padded batch in value and gradient, the shared-context block included.

Skipped where no CUDA device is present (``-m cuda`` selects them; benchmarks/gpu_check.sh
runs them). The models are initialised with a wide weight spread (initializer_range 0.2) so
that attention is peaked: a wrong layout moves a tiny model's summed log-probs by about 4
nats, far outside the bf16 tolerances below.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_packing import batch, tiny

import inspo.models.varlen_attention as va
from inspo.models.scoring import Scoring, prepare_packing, score_pairs

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    """float32 means float32 here, whatever a run in this process set (inspo's runtime turns
    TF32 on for CUDA runs)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def model_on_cuda(tokenizer, family="llama", dtype=torch.float32, **extra):
    """A model prepared for packed rows (its padded calls are unchanged by the switch)."""
    model = tiny(family, tokenizer, initializer_range=0.2, **extra).to("cuda", dtype)
    assert prepare_packing(model)
    return model


def views(tokenizer):
    b = batch(tokenizer)
    return {k: {f: t.cuda() for f, t in v.items()} for k, v in b.items() if k != "index"}


def scores_and_grads(model, view, how):
    model.zero_grad(set_to_none=True)
    s, _ = score_pairs(model, view, how)
    sums = torch.cat([s.chosen, s.rejected])
    weights = torch.linspace(1.0, -2.0, sums.shape[0], device=sums.device, dtype=sums.dtype)
    (sums * weights).sum().backward()
    grads = [p.grad.float() for p in model.parameters() if p.grad is not None]
    return sums.detach().float(), grads, s.tokens


def test_bf16_scores_track_fp32_and_stay_float32(tokenizer):
    """A bf16 model's (and bf16 autocast's) summed log-probs are float32 and within bf16
    rounding of the float32 model's, padded and packed."""
    model = model_on_cuda(tokenizer)
    plain = views(tokenizer)["plain"]
    with torch.no_grad():
        truth = score_pairs(model, plain, Scoring())[0].chosen
        with torch.autocast("cuda", dtype=torch.bfloat16):
            mixed = score_pairs(model, plain, Scoring(packing=True))[0].chosen
        half = score_pairs(model.bfloat16(), plain, Scoring())[0].chosen
    assert mixed.dtype == torch.float32 and half.dtype == torch.float32
    for got in (mixed, half):
        torch.testing.assert_close(got, truth, rtol=2e-2, atol=0.1)


@pytest.mark.parametrize(
    ("family", "kernel"),
    [("llama", "blocks"), ("qwen2", "blocks"), ("mistral", "blocks"), ("llama", "flex"),
     ("mistral", "flex")],  # each flex case compiles (≈ 30 s): one without a window, one with
)  # fmt: skip
def test_fp32_kernels_score_as_padded_on_cuda(tokenizer, family, kernel):
    """float32 (TF32 off): every kernel equals the padded batch
    to float32 rounding, in value and gradient; Mistral with a window shorter than the rows."""
    extra = {"sliding_window": 5} if family == "mistral" else {}
    model = model_on_cuda(tokenizer, family, **extra)
    how = Scoring(packing_kernel=kernel)
    for view in views(tokenizer).values():
        want, want_g, _ = scores_and_grads(model, view, how)
        got, got_g, tokens = scores_and_grads(model, view, replace(how, packing=True))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
        for g, w in zip(got_g, want_g, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4 * float(w.abs().max()))
        assert int(tokens.computed) == int(tokens.real)


def varlen_sources() -> list:
    return [
        pytest.param(
            name,
            marks=pytest.mark.skipif(
                getattr(va, f"{name}_kernel")() is None, reason=f"no {name} varlen kernel here"
            ),
        )
        for name in ("flash_attn", "torch_varlen")
    ]


@pytest.mark.parametrize("source", varlen_sources())
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_varlen_kernel_scores_as_padded_in_bf16(tokenizer, monkeypatch, family, source):
    """flash-attention's varlen kernel (half precision only) on the packed rows against
    per-row sdpa on the same packed rows and against the padded batch, all bf16: within bf16
    rounding (1 % of the score + 0.05 nats), gradients in the same direction."""
    monkeypatch.setattr(va, "varlen_kernel", getattr(va, f"{source}_kernel"))
    extra = {"sliding_window": 5} if family == "mistral" else {}
    model = model_on_cuda(tokenizer, family, torch.bfloat16, **extra)
    varlen = Scoring(packing=True, packing_kernel="varlen")
    for view in views(tokenizer).values():
        got, got_g, _ = scores_and_grads(model, view, varlen)
        for how in (Scoring(packing=True, packing_kernel="blocks"), Scoring()):
            want, want_g, _ = scores_and_grads(model, view, how)
            torch.testing.assert_close(got, want, rtol=1e-2, atol=0.05)
            for g, w in zip(got_g, want_g, strict=True):
                cos = torch.nn.functional.cosine_similarity(g.flatten(), w.flatten(), dim=0)
                assert float(cos) > 0.99


def test_auto_picks_varlen_in_half_precision_and_flex_in_float32():
    bf16 = torch.zeros(1, 2, 3, 4, device="cuda", dtype=torch.bfloat16)
    assert va.pick_kernel("auto", bf16) == ("varlen" if va.varlen_kernel() else "flex")
    assert va.pick_kernel("auto", bf16.float()) == "flex"
    assert va.pick_kernel("auto", bf16, dropout=0.1) == "blocks"
