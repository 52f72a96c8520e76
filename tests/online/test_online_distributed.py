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


def two_processes(tmp_path, run_dir, hardware, module="inspo.cli.iterate", *overrides) -> str:
    """``module`` (an inspo-iterate) on 2 CPU processes; its output."""
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INSPO_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": path}  # fmt: skip
    cmd = [sys.executable, "-m", module, *ITER, *overrides, f"hardware={hardware}",
           "trainer.accelerator=cpu", "trainer.devices=2", f"hydra.run.dir={run_dir}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "MEMBER: 2/2" in out
    return out


@pytest.mark.distributed
@pytest.mark.subprocess
@pytest.mark.parametrize("hardware", ["ddp", "fsdp"])
def test_two_processes_share_the_prompts_and_gather_the_pairs(tmp_path, hardware):
    run_dir = tmp_path / "run"
    two_processes(tmp_path, run_dir, hardware)
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


def sample_texts(path: Path) -> list[tuple[int, str]]:
    return [(s["position"], s["response"]) for s in map(json.loads, path.read_text().splitlines())]


@pytest.mark.distributed
@pytest.mark.subprocess
@pytest.mark.parametrize("hardware", ["ddp", "fsdp"])
def test_two_processes_sampling_ahead_draw_what_one_pass_per_chunk_draws(tmp_path, hardware):
    """Each process samples the next chunk's first prompts of its share ahead, and pads its
    pass to the longest process's (FSDP decodes in lockstep): the rounds are those of one pass
    per chunk."""
    common = ["eval.n_prompts=0"]
    two_processes(tmp_path, tmp_path / "ahead", hardware, "inspo.cli.iterate", *common)
    two_processes(tmp_path, tmp_path / "exact", hardware, "iterate_one_pass", *common)
    ties = 0
    for r in ("000", "001"):
        a, b = (tmp_path / run / "rounds" / r for run in ("ahead", "exact"))
        assert (a / "pairs.jsonl").read_text() == (b / "pairs.jsonl").read_text()
        report = json.loads((b / "data_report.json").read_text())
        assert json.loads((a / "data_report.json").read_text()) == report
        ties += report["dropped"].get("tie", 0)
        texts = [sample_texts(x / "samples.jsonl") for x in (a, b)]
        assert texts[0] and texts[0] == texts[1]
    # Ties made chunks follow chunks; from the first on, the look-ahead sampled their prompts.
    assert ties > 0
