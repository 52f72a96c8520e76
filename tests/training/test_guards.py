"""A non-finite loss or gradient stops the run at once, says where, keeps the last good
checkpoint, writes no policy, exits non-zero, and leaves summary.json valid JSON."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FAST, train_user_module
from inspo.config import compose_config
from inspo.models.scoring import ViewScores
from inspo.objectives import DPO, ObjectiveOutput
from inspo.training.guards import NonFiniteError, describe_non_finite, finite_everywhere
from inspo.training.run import run

NAN_AFTER = '''
import torch
from inspo.objectives import DPO


class NaNAfter(DPO):
    """DPO whose training loss turns NaN after `after` steps."""

    def __init__(self, after=3, **kwargs):
        super().__init__(**kwargs)
        self.after, self.calls = after, 0

    def loss(self, s):
        out = super().loss(s)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls > self.after:
                out.losses = out.losses * float("nan")
        return out
'''


class NaNGradient(DPO):
    """A finite loss (0) whose gradient is NaN: sqrt at 0 has an infinite slope."""

    def loss(self, s):
        out = super().loss(s)
        out.losses = out.losses + torch.sqrt(s.policy_chosen - s.policy_chosen.detach())
        return out


@pytest.mark.subprocess
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    res = train_user_module(tmp_path, "nanmod", NAN_AFTER, "objective._target_=nanmod.NaNAfter",
                            "+objective.after=3", "trainer.max_steps=8",
                            "checkpoint.every_n_train_steps=1")  # fmt: skip
    assert res.returncode != 0
    assert "non-finite loss at step 3" in res.stderr and "NaNAfter" in res.stderr
    assert "objective's own arithmetic" in res.stderr  # its inputs were finite
    summary = json.loads((run_dir / "summary.json").read_text())  # strict JSON: no NaN literal
    assert summary["status"] == "failed" and summary["steps"] == 3
    assert "non-finite loss at step 3" in summary["error"]
    assert not (run_dir / "policy").exists()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_nan_gradient_stops_before_the_update(tmp_path):
    overrides = [*FAST, "objective._target_=test_guards.NaNGradient", "trainer.max_steps=3"]
    with pytest.raises(NonFiniteError, match="non-finite gradient at step 0"):
        run(compose_config(overrides, tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and not (tmp_path / "policy").exists()


def test_finite_everywhere_is_exact_at_the_edges():
    """Finite values at the largest of their dtype pass; a NaN or an infinity of either sign
    anywhere fails, whichever tensor holds it; empty tensors (a rank's empty shard) pass."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    strategy, cpu = SingleDeviceStrategy(device="cpu"), torch.device("cpu")

    def finite(*tensors: torch.Tensor) -> bool:
        return finite_everywhere(list(tensors), strategy, cpu)

    big = torch.finfo(torch.float32).max
    assert finite(torch.full((1000,), big), torch.full((7,), -big), torch.tensor(0.5))
    assert finite(torch.full((50,), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16))
    assert finite(torch.empty(0), torch.ones(2))
    assert finite()  # no gradients at all (a frozen model)
    for bad in (float("inf"), float("-inf"), float("nan")):
        t = torch.ones(4, 4)
        t[2, 3] = bad
        assert not finite(torch.ones(3), t, torch.empty(0))
        assert not finite(torch.ones(2), t.to(torch.bfloat16))  # mixed dtypes
    assert not finite(torch.tensor(float("nan")))  # a 0-d loss


def test_the_message_names_the_input_that_was_not_finite():
    nan, one = torch.tensor([float("nan"), 0.0]), torch.zeros(2)
    out = ObjectiveOutput(one, one, one, {"z": torch.tensor([0.0, float("inf")])})
    pol = ViewScores(nan, one, one, one)
    msg = describe_non_finite(out, pol, ViewScores(one, one, one, one))
    assert "policy log-probs of the chosen responses (pairs [0])" in msg
    assert "the margin z (pairs [1])" in msg and "reference" not in msg
    msg = describe_non_finite(out, ViewScores(one, one, one, one), ViewScores(one, nan, one, one))
    assert "reference log-probs of the rejected responses (pairs [0])" in msg
    assert "policy" not in msg
