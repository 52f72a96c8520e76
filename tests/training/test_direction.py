"""Direction at model level: for every objective config × {standard,
reflective, one-sided} × its valid scalarizations, one SGD step of a real (tiny) model on a fixed
batch, through ``PreferenceModule.compute_loss``, raises the chosen-over-rejected margin under
the objective's own score. Float64 throughout, so a small step is measured exactly.
"""

from __future__ import annotations

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from conftest import REPO
from inspo.data.collate import PreferenceCollator
from inspo.data.encode import Encoder
from inspo.data.templates import resolve_template
from inspo.models.load import byte_tokenizer, frozen_copy, tiny_llama
from inspo.objectives import PSI_OBJECTIVES, SCALARIZATIONS, MarginObjective, RewardObjective
from inspo.settings import ReflectionConfig as R
from inspo.training.module import PreferenceModule, pair_scores

CONF = REPO / "conf" / "objective"
#: The configs of objectives that train a policy (a reward model's: tests/training/test_reward.py).
POLICY_CONFIGS = [
    p
    for p in sorted(CONF.glob("*.yaml"))
    if not issubclass(get_class(OmegaConf.load(p)._target_), RewardObjective)
]
ROWS = [
    ("Word with b, k, t: ", "bakitu", "zz"),
    ("Word with m, n, p: ", "manipo", "mmmmmmmm"),
    ("Word with r, s, t: ", "rasotu", "qqq"),
]
STEP = 1e-3  # norm of the parameter update


def saturated_start_fix(module: PreferenceModule, objective, batch) -> None:
    """One-sided *reference-free* SimPO has h̄ = −S̄(y_l) ≈ 5.6 at a random init, so z = β·h̄ − γ
    ≈ 10 lies where hinge / truncated-quadratic are flat and squared rises: no step is meant to
    move it. Shift γ so every pair starts at z ≤ 0, where every Ψ is decreasing."""
    if module.hparams.reflection != "inspo_one_sided" or objective.requires_reference:
        return
    with torch.no_grad():
        s = module.score_view(module.policy, batch[module.policy_view])
        z = objective.margin(pair_scores(s, None, one_sided=True))
    objective.gamma += float(z.max())


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def batch(tok):
    enc = Encoder(tok, resolve_template("default"), max_length=128, max_prompt_length=64)
    views = ("plain", "reflective")
    rows = [{**enc.encode(x, w, lo, views), "index": i} for i, (x, w, lo) in enumerate(ROWS)]
    return PreferenceCollator(tok.pad_token_id, views)(rows)


@pytest.fixture(scope="module")
def model0(tok):
    return tiny_llama(tokenizer=tok, hidden_size=16, num_layers=1, num_heads=2, seed=0).double()


def _config_cases():
    """(id, config name, dotted Ψ key or None, Ψ or None) for every objective config."""
    cases = []
    for path in POLICY_CONFIGS:
        cfg = OmegaConf.load(path)
        keys = []
        if cfg._target_.rsplit(".", 1)[-1] in PSI_OBJECTIVES:
            keys = ["scalarization"]
        for k, term in enumerate(cfg.get("terms") or []):
            if term.objective._target_.rsplit(".", 1)[-1] in PSI_OBJECTIVES:
                keys.append(f"terms.{k}.objective.scalarization")
        if not keys:
            cases.append((path.stem, path.stem, None, None))
        for key in keys:
            cases += [(f"{path.stem}-{psi}", path.stem, key, psi) for psi in SCALARIZATIONS]
    return cases


def make_objective(name: str, key: str | None = None, psi: str | None = None):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    if key is not None:
        OmegaConf.update(cfg, key, psi)
    return instantiate(cfg)


def own_margin(module: PreferenceModule, batch) -> torch.Tensor:
    """Σ over pairs of S(y_w) − S(y_l) in the policy's view, under the objective's score
    (token-mean for mean-score objectives). One-sided: −S(y_l | R(x, y_w)). Non-pairwise
    objectives (SFT): the chosen score alone."""
    with torch.no_grad():
        s = module.score_view(module.policy, batch[module.policy_view])
    w, lo = s.chosen.double(), s.rejected.double()
    if module.objective.score == "mean":
        w, lo = w / s.chosen_length, lo / s.rejected_length
    if module.hparams.reflection == "inspo_one_sided":
        return -lo.sum()
    if not module.objective.pairwise:
        return w.sum()
    return (w - lo).sum()


@pytest.fixture(scope="module")
def ref_scores(model0, batch):
    """model0's scores of both views, fed as precomputed reference scores (the reference is the
    initial policy, as ``policy_init``; test_reference.py shows precomputed = live)."""
    module = PreferenceModule(model0, make_objective("dpo"), None)
    out = {}
    with torch.no_grad():
        for view in ("plain", "reflective"):
            s = module.score_view(model0, batch[view])
            out[view] = {f: getattr(s, f) for f in ("chosen", "rejected", "chosen_length",
                                                    "rejected_length")}  # fmt: skip
    return out


def discopop_shift(ref: dict) -> dict:
    """DiscoPOP is non-monotone for z = β·h in (−0.118, 0.072) (see its docstring): lower the
    reference's chosen scores by 20 so every pair starts at h ≈ +20 (z ≈ 2), outside that band."""
    return {v: {**f, "chosen": f["chosen"] - 20.0} for v, f in ref.items()}


def step_margins(model0, batch, ref_scores, objective, reflection: str):
    """(margin before, margin after, loss) for one SGD step through compute_loss.

    The step is normalised to a parameter change of norm STEP, so it measures the direction of
    the update (first order), whatever the scale of the loss (IPO's is 1/(4τ²) = 25)."""
    policy = frozen_copy(model0).requires_grad_(True).train()
    module = PreferenceModule(policy, objective, None, reflection=R(mode=reflection))
    ref = discopop_shift(ref_scores) if type(objective).__name__ == "DiscoPOP" else ref_scores
    batch = {**batch, "reference_scores": ref}
    saturated_start_fix(module, objective, batch)
    before = own_margin(module, batch).item()
    loss, *_ = module.compute_loss(batch)
    loss.backward()
    params = [p for p in policy.parameters() if p.grad is not None]
    norm = torch.sqrt(sum((p.grad**2).sum() for p in params)).item()
    assert norm > 0, "no gradient"
    torch.optim.SGD(params, lr=STEP / norm).step()
    return before, own_margin(module, batch).item(), loss.item()


CASES = _config_cases()
FORMS = ["off", "inspo", "inspo_one_sided"]
GRID = [
    pytest.param(name, key, psi, form, id=f"{cid}-{form}")
    for cid, name, key, psi in CASES
    for form in FORMS
    # one-sided (eq. 22) applies to the Ψ(margin) objectives only
    if form != "inspo_one_sided" or isinstance(make_objective(name, key, psi), MarginObjective)
]


def test_grid_covers_every_objective_config_and_form():
    names = {p.values[0] for p in GRID}
    assert names == {p.stem for p in POLICY_CONFIGS} and len(names) >= 20
    forms = {p.values[3] for p in GRID}
    assert forms == set(FORMS)
    assert sum(p.values[2] == "savage" for p in GRID) >= 11 * 2  # every Ψ objective, both forms


@pytest.mark.parametrize(("name", "key", "psi", "form"), GRID)
def test_one_step_raises_the_margin(model0, batch, ref_scores, name, key, psi, form):
    objective = make_objective(name, key, psi)
    before, after, loss = step_margins(model0, batch, ref_scores, objective, form)
    assert after > before, (name, psi, form, before, after, loss)


# The InSPO authors' code had sign errors in these reflective forms; ours move toward y_w.
@pytest.mark.parametrize("name", ["ipo", "orpo", "rdpo", "simpo"])
def test_reflective_form_moves_toward_the_chosen_response(model0, batch, ref_scores, name):
    objective = make_objective(name)
    before, after, loss = step_margins(model0, batch, ref_scores, objective, "inspo")
    assert after > before
    # ...and the loss falls (a sign error would have the step climb the intended loss)
    policy = frozen_copy(model0)
    module = PreferenceModule(policy, objective, frozen_copy(model0), reflection=R(mode="inspo"))
    before_loss, *_ = module.compute_loss(batch)
    assert before_loss.item() == pytest.approx(loss, rel=1e-9)  # precomputed = live reference


def test_reflective_rdpo_discounts_a_longer_chosen_response(model0, batch):
    """R-DPO's length term in the reflective form: with α > 0 a pair whose chosen response is
    longer (rows 0 and 2) has a lower loss than under DPO, and one whose chosen response is
    shorter a higher loss, so the longer-chosen pairs push less (Park et al.'s sign)."""
    from inspo.objectives import DPO, RDPO

    policy = frozen_copy(model0)
    ref = frozen_copy(model0)
    rd = PreferenceModule(policy, RDPO(beta=0.1, alpha=0.05), ref, reflection=R(mode="inspo"))
    dpo = PreferenceModule(policy, DPO(beta=0.1), ref, reflection=R(mode="inspo"))
    with torch.no_grad():
        _, out_r, pol, *_ = rd.compute_loss(batch)
        _, out_d, *_ = dpo.compute_loss(batch)
    longer = pol.chosen_length > pol.rejected_length
    assert longer.any() and (~longer).any()
    assert torch.all(out_r.losses[longer] < out_d.losses[longer])
    assert torch.all(out_r.losses[~longer] > out_d.losses[~longer])
