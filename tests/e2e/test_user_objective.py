"""A user-defined objective in the user's own module trains without touching the package."""

from __future__ import annotations

import json
import math
import textwrap

import pytest

from conftest import FAST, train_user_module

USER_MODULE = '''
import torch.nn.functional as F
from inspo.objectives import Objective


class MyLoss(Objective):
    """−log σ(β·h) − penalty·(token-mean NLL of the rejected response): push y_l down harder."""

    def __init__(self, beta=0.1, scalarization=None, gamma=0.0, penalty=0.01):
        self.beta, self.scalarization, self.penalty = beta, scalarization, penalty

    def loss(self, s):
        rw, rl = self.log_ratios(s)
        nll_rejected = -s.policy_rejected / s.rejected_length
        losses = F.softplus(-self.beta * (rw - rl)) - self.penalty * nll_rejected
        return self.output(losses, s, nll_rejected=nll_rejected)
'''


@pytest.mark.subprocess
def test_user_objective_trains_from_its_own_module(tmp_path):
    overrides = ["objective._target_=mymod.MyLoss", "+objective.penalty=0.5",
                 "trainer.max_steps=2", "save_policy=false"]  # fmt: skip
    res = train_user_module(tmp_path, "mymod", USER_MODULE, *overrides)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2
    assert summary["choices"]["objective"] == "MyLoss"
    assert "objective:MyLoss" in summary["choices"]["tags"]
    assert math.isfinite(summary["metrics"]["val/loss"])
    assert summary["metrics"]["train/nll_rejected"] > 0  # the user's metric is logged


def test_the_user_term_is_in_the_loss(tmp_path, monkeypatch):
    """Validation before any step: the loss with the user's term is DPO's minus penalty × the
    logged term, exactly (so the term reaches the loss, with its sign)."""
    from inspo.config import compose_config
    from inspo.training.run import run

    (tmp_path / "mymod.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = {}
    for penalty in (0.0, 0.5):
        cfg = compose_config(
            [*FAST, "objective._target_=mymod.MyLoss", f"+objective.penalty={penalty}",
             "trainer.max_steps=0", "save_policy=false"],
            tmp_path / str(penalty),
        )  # fmt: skip
        out[penalty] = run(cfg)["metrics"]
    term = out[0.5]["val/nll_rejected"]
    assert term > 0 and term == pytest.approx(out[0.0]["val/nll_rejected"])
    assert out[0.5]["val/loss"] == pytest.approx(out[0.0]["val/loss"] - 0.5 * term, rel=1e-6)
