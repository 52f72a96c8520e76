"""The loop on 2 CPU processes (gloo): prompts sharded, each process samples its own share, the
pairs gathered; under FSDP2 the sharded policy decodes in lockstep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_rounds import ITER

HERE = Path(__file__).resolve().parent


@pytest.mark.distributed
@pytest.mark.subprocess
@pytest.mark.parametrize("hardware", ["ddp", "fsdp"])
def test_two_processes_share_the_prompts_and_gather_the_pairs(tmp_path, hardware):
    run_dir = tmp_path / "run"
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INSPO_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": path}  # fmt: skip
    cmd = [sys.executable, "-m", "inspo.cli.iterate", *ITER, f"hardware={hardware}",
           "trainer.accelerator=cpu", "trainer.devices=2", f"hydra.run.dir={run_dir}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "MEMBER: 2/2" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4
    for r in ("000", "001"):
        folder = run_dir / "rounds" / r
        pairs = folder / "pairs.jsonl"
        # 2 steps × 4 pairs per process × 2 processes, every one written once
        assert len(pairs.read_text().splitlines()) == 2 * 4 * 2
        samples = [json.loads(x) for x in (folder / "samples.jsonl").read_text().splitlines()]
        positions = {s["position"] for s in samples}
        assert {p % 2 for p in positions} == {0, 1}  # both processes' shares are there
        assert len(samples) == 2 * len(positions)
    rounds = json.loads((run_dir / "iterate.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    if hardware == "ddp":  # the first process evaluates a replicated policy
        assert "eval/win_rate" in rounds[-1]
