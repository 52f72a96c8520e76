"""PreferenceModule: the DPO value by hand, the direction of a step, and the frozen reference."""

import math

import pytest
import torch

from inspo.data.collate import PreferenceCollator
from inspo.data.encode import Encoder
from inspo.data.templates import resolve_template
from inspo.models.load import frozen_copy
from inspo.models.scoring import forward
from inspo.objectives import DPO, SFT
from inspo.settings import ReflectionConfig
from inspo.training.distill import distill_kl
from inspo.training.module import PreferenceModule


def R(mode, **knobs):
    return ReflectionConfig(mode=mode, **knobs)


ROWS = [
    ("Q: bkt? A:", "bakitu", "zz"),
    ("Q: mnp? A:", "manipo", "mmmmmmmm"),
    ("Q: rst? A:", "rasotu", "qq"),
]


def batch_for(tokenizer, views=("plain", "reflective"), template="default"):
    enc = Encoder(tokenizer, resolve_template(template), max_length=128, max_prompt_length=64)
    rows = [{**enc.encode(x, w, lo, views), "index": i} for i, (x, w, lo) in enumerate(ROWS)]
    return PreferenceCollator(tokenizer.pad_token_id, views)(rows)


def perturbed(model, seed=1, scale=0.05):
    """A copy of the model with shifted weights, so policy and reference differ."""
    other = frozen_copy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other


def direct_score(model, view, i):
    """Σ log π(y_t | ...) over masked tokens, computed token by token."""
    ids = view["input_ids"][i : i + 1]
    att = view["attention_mask"][i : i + 1]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits[0].double(), -1)
    mask = view["loss_mask"][i]
    return sum(logp[t - 1, ids[0, t]].item() for t in range(1, ids.shape[1]) if mask[t])


@pytest.mark.parametrize("view", ["plain", "reflective"])
def test_dpo_value_by_hand(tokenizer, small_model, view):
    ref = perturbed(small_model)
    reflection = "off" if view == "plain" else "inspo"
    module = PreferenceModule(small_model, DPO(beta=0.5), ref, reflection=R(reflection))
    batch = batch_for(tokenizer)
    loss, out, *_ = module.compute_loss(batch)
    v, b = batch[view], len(ROWS)
    expected = []
    for i in range(b):
        r_w = direct_score(small_model, v, i) - direct_score(ref, v, i)
        r_l = direct_score(small_model, v, b + i) - direct_score(ref, v, b + i)
        expected.append(math.log1p(math.exp(-0.5 * (r_w - r_l))))  # −log σ(β·h)
    torch.testing.assert_close(out.losses.double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    assert loss.item() == pytest.approx(sum(expected) / b, rel=1e-4)


def policy_margin(module, batch, view):
    """S_θ(y_w) − S_θ(y_l) in the given view, summed over pairs (the reference is fixed).

    One-sided InSPO (eq. 22) has no chosen term: its margin is −S_θ(y_l | R(x, y_w)).
    """
    with torch.no_grad():
        s = module.score_view(module.policy, batch[view])
    if module.hparams.reflection == "inspo_one_sided":
        return -s.rejected.sum().item()
    return (s.chosen - s.rejected).sum().item()


@pytest.mark.parametrize("reflection", ["off", "inspo", "inspo_one_sided"])
def test_a_step_raises_the_chosen_over_rejected_margin(tokenizer, small_model, reflection):
    module = PreferenceModule(small_model, DPO(beta=0.1), frozen_copy(small_model),
                              reflection=R(reflection))  # fmt: skip
    batch = batch_for(tokenizer)
    view = module.policy_view
    before = policy_margin(module, batch, view)
    opt = torch.optim.SGD(module.policy.parameters(), lr=0.1)
    loss, *_ = module.compute_loss(batch)
    loss.backward()
    opt.step()
    assert policy_margin(module, batch, view) > before


def test_reference_is_frozen_and_outside_the_optimiser(tokenizer, small_model):
    module = PreferenceModule(small_model, DPO(), frozen_copy(small_model), reflection=R("inspo"))
    module.train()
    assert not module.reference.training
    assert all(not p.requires_grad for p in module.reference.parameters())
    batch = batch_for(tokenizer)
    loss, *_ = module.compute_loss(batch)
    loss.backward()
    assert all(p.grad is None for p in module.reference.parameters())
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert not any(k.startswith("reference.") for k in ckpt["state_dict"])
    assert any(k.startswith("policy.") for k in ckpt["state_dict"])
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"])  # strict load works after the reference is re-added


class CountingModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, **kw):
        self.calls += 1
        return self.inner(**kw)


def test_one_forward_per_model_and_no_reference_for_reference_free(tokenizer, small_model):
    policy = CountingModel(small_model)
    ref = CountingModel(frozen_copy(small_model))
    module = PreferenceModule(policy, DPO(), ref, reflection=R("inspo"))
    module.compute_loss(batch_for(tokenizer))
    assert (policy.calls, ref.calls) == (1, 1)  # chosen + rejected in one pass each
    sft = PreferenceModule(policy, SFT(), None)
    batch = batch_for(tokenizer)
    _loss, out, *_ = sft.compute_loss(batch)
    assert policy.calls == 2
    assert out.losses.shape == (len(ROWS),)


def test_plain_reference_context_uses_the_plain_view(tokenizer, small_model):
    ref = perturbed(small_model)
    batch = batch_for(tokenizer)
    refl = PreferenceModule(small_model, DPO(), ref, reflection=R("inspo"))
    plain = PreferenceModule(
        small_model, DPO(), ref, reflection=R("inspo", reference_context="plain")
    )
    assert refl.train_views == ("reflective",)
    assert plain.train_views == ("reflective", "plain")
    a = refl.reference_scores(batch, refl.reference_view)
    b = plain.reference_scores(batch, plain.reference_view)
    assert not torch.allclose(a.chosen, b.chosen)
    assert b.chosen[0].item() == pytest.approx(direct_score(ref, batch["plain"], 0), rel=1e-5)


def test_mixing_and_distillation_terms(tokenizer, small_model):
    batch = batch_for(tokenizer)
    ref = frozen_copy(small_model)
    base = PreferenceModule(small_model, DPO(), ref, reflection=R("inspo"))
    mixed = PreferenceModule(small_model, DPO(), ref, reflection=R("inspo", standard_weight=0.5))
    distilled = PreferenceModule(small_model, DPO(), ref, reflection=R("inspo", distill_weight=2.0))
    l0, *_ = base.compute_loss(batch)
    mixed_step, distilled_step = mixed.compute_loss(batch), distilled.compute_loss(batch)
    l1, extra1 = mixed_step.loss, mixed_step.extra
    l2, extra2 = distilled_step.loss, distilled_step.extra
    torch.testing.assert_close(l1, l0 + 0.5 * extra1["loss_standard"])
    torch.testing.assert_close(l2, l0 + 2.0 * extra2["distill_kl"])
    assert extra2["distill_kl"].item() > 0  # the two contexts give different distributions
    # The teacher is detached: the KL's gradient flows through the plain (student) pass only.
    distilled.policy.zero_grad()
    n, refl, plain = 2, batch["reflective"], batch["plain"]
    teacher = forward(distilled.policy, refl)[:n]
    student = forward(distilled.policy, {k: v[:n] for k, v in plain.items()})
    kl = distill_kl(teacher, refl["loss_mask"][:n], student, plain["loss_mask"][:n])
    kl.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in small_model.parameters())
