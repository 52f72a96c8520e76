"""A user-defined objective in the user's own module trains without touching the package."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

from conftest import FAST

USER_MODULE = '''
import torch.nn.functional as F
from inspo.objectives import Objective


class MyLoss(Objective):
    """−log σ(β·h) + margin-free penalty on the rejected response's log-prob."""

    def __init__(self, beta=0.1, scalarization=None, gamma=0.0, penalty=0.01):
        self.beta, self.scalarization, self.penalty = beta, scalarization, penalty

    def loss(self, s):
        rw, rl = self.log_ratios(s)
        losses = F.softplus(-self.beta * (rw - rl)) + self.penalty * s.policy_rejected.exp()
        return self.output(losses, s)
'''


def test_user_objective_trains_from_its_own_module(tmp_path):
    (tmp_path / "mymod.py").write_text(textwrap.dedent(USER_MODULE))
    cmd = [
        sys.executable, "-m", "inspo.train", "objective._target_=mymod.MyLoss",
        "+objective.penalty=0.5", *FAST, "trainer.max_steps=2", "save_policy=false",
        f"hydra.run.dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/c",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2
    assert summary["choices"]["objective"] == "MyLoss"
    assert "objective:MyLoss" in summary["choices"]["tags"]
    assert math.isfinite(summary["metrics"]["val/loss"])
