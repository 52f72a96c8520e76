"""benchmarks/gpu_check.py --cpu: the GPU check's steps on the tiny model, so the prepared
script cannot rot before a GPU runs it. The table is read back and checked against the records
it was printed from: packed and padded scores agree, every framework ran the same pairs, and
pairs/s, the vs-TRL ratio and MFU follow from the counted tokens and FLOPs."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch

from conftest import REPO

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # its dataclasses look their module up
spec.loader.exec_module(gpu_check)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "records.jsonl"
    args = ["--cpu", "--batch", "2", "--warmup", "1", "--steps", "2", "--out", str(out)]
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = gpu_check.main(args)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return code, gpu_check.parse_table(printed.getvalue()), records


def test_the_table_has_every_row_and_column(run):
    code, table, records = run
    assert code == 0
    assert list(table[0]) == gpu_check.COLUMNS
    configs = [r["config"] for r in table]
    assert configs == [
        "policy scores, kernel blocks",
        "inspo packed (blocks)",
        "TRL DPOTrainer",
        "inspo padded",
    ]
    assert all(r["status"] == "ok" for r in table)
    env = records[0]
    assert env["kind"] == "env" and env["cpu"] and env["peak_flops"] > 0


def test_packed_and_padded_scores_agree(run):
    _, table, records = run
    check = next(r for r in records if r.get("check") == "packed = padded")
    assert check["status"] == "ok" and check["max_rel_diff"] <= 1e-5
    assert f"{check['max_rel_diff']:.1e}" in table[0]["note"]


def test_rates_ratios_and_mfu_follow_from_the_counts(run):
    _, table, records = run
    env, steps = records[0], {r["config"]: r for r in records if r.get("check") == "DPO steps"}
    trl = steps["TRL DPOTrainer"]
    for row in table[1:]:
        r = steps[row["config"]]
        assert r["pairs"] == 2 * 2 and r["steps"] == 2  # every framework ran the same pairs
        assert r["pairs_per_s"] == pytest.approx(r["pairs"] / r["seconds"])
        assert float(row["pairs/s"]) == pytest.approx(r["pairs_per_s"], abs=0.006)
        # model FLOPs: 6·N·policy + 2·N·reference tokens + attention pairs (tiny: 4 layers,
        # 4 heads of 64), nothing else; MFU against the measured peak
        attention = 4 * 4 * 4 * 64 * (3 * r["attention_pairs"] + r["ref_attention_pairs"])
        flops = 6 * r["params"] * r["tokens"] + 2 * r["params"] * r["ref_tokens"] + attention
        assert r["model_flops"] == flops and r["tokens"] > 0 and r["attention_pairs"] > 0
        mfu = flops / r["seconds"] / env["peak_flops"]
        assert r["mfu"] == pytest.approx(mfu)
        assert row["MFU"] == f"{mfu:.1%}"
        if row["config"].startswith("inspo"):
            assert row["vs TRL pairs/s"] == f"{r['pairs_per_s'] / trl['pairs_per_s']:.2f}×"
    # the same pairs: packing runs each shared context once, TRL twice
    assert steps["inspo packed (blocks)"]["tokens"] < trl["tokens"]
    assert steps["inspo packed (blocks)"]["params"] == trl["params"]


def test_hh_like_lengths_follow_the_recorded_quantiles(monkeypatch):
    """The quantiles written in the script are the file's (when the file is here), and the
    draws without the file follow them, within the sequence budget."""
    pairs = gpu_check.file_byte_lengths()
    if pairs is not None:
        for i, key in enumerate(("prompt", "chosen", "rejected")):
            values = torch.tensor([p[i] for p in pairs], dtype=torch.float64)
            q = torch.quantile(values, torch.tensor(gpu_check.QUANTILES, dtype=torch.float64) / 100)
            assert [int(x) for x in q] == gpu_check.HH_BYTES[key]
    monkeypatch.setattr(gpu_check, "file_byte_lengths", lambda: None)
    drawn, source = gpu_check.hh_like_lengths(2000, seed=0, max_length=1024)
    assert source == "HH-RLHF quantiles"
    prompts = sorted(p for p, _, _ in drawn)
    median = gpu_check.HH_BYTES["prompt"][4] / gpu_check.BYTES_PER_TOKEN
    assert math.isclose(prompts[len(prompts) // 2], median, rel_tol=0.15)
    assert all(p + max(c, r) + gpu_check.FIT_SLACK <= 1024 for p, c, r in drawn)
    short, _ = gpu_check.hh_like_lengths(200, seed=0, max_length=128)
    assert all(p + max(c, r) + gpu_check.FIT_SLACK <= 128 for p, c, r in short)


def test_the_card_is_found_by_name(monkeypatch):
    setup = gpu_check.Setup(
        cpu=False, bf16=True, qwen=True, batch=1, warmup=1, steps=1, max_length=8, tolerance=0.1
    )
    for name, peak in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                       ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12)]:  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda name=name: name)
        assert gpu_check.peak_flops(setup)[0] == peak
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Some Other GPU")
    assert gpu_check.peak_flops(setup) == (
        None,
        "Some Other GPU: bf16 peak unknown (MFU not computed)",
    )


@pytest.mark.subprocess
def test_the_cuda_tests_are_found_run_and_reported():
    """Every test file with a cuda mark is run with -m cuda in a child pytest, one row per
    test; here each is skipped with the reason, and vLLM's absence is said, not hidden."""
    rows = gpu_check.cuda_tests(timeout=300)
    tests = [r for r in rows if r["check"] == "CUDA test" and "::" in r["config"]]
    names = {r["config"].split("[")[0] for r in tests}
    assert "test_cuda::test_fp32_kernels_score_as_padded_on_cuda" in names
    assert "test_distributed::test_fsdp2_on_one_gpu_over_nccl" in names
    if not torch.cuda.is_available():
        assert all(r["status"] == "skipped" and r["note"] for r in tests)
    whole = next(r for r in rows if r["check"] == "CUDA tests")
    assert whole["status"] == "ok" and f"{len(tests)} skipped" in whole["note"]
    assert any("vllm" in r["config"] for r in rows)


def test_the_gpu_model_is_qwen25_05b_shaped():
    """The config written in the script builds Qwen2.5-0.5B's 494 M parameters (tied
    embedding once), 24 layers of 14 query and 2 key/value heads of 64, which the FLOPs count."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(gpu_check.qwen_config())
    shape = gpu_check.Shape.of(model)
    assert (shape.params, shape.layers, shape.heads, shape.head_dim) == (494_032_768, 24, 14, 64)
    assert model.config.num_key_value_heads == 2 and model.config.tie_word_embeddings


def test_a_spent_time_budget_skips_rows_and_says_so(capsys):
    """On a GPU slot the check must end in time: configurations left when the budget is spent
    become rows marked skipped, with the reason, not silent omissions."""
    code = gpu_check.main(["--cpu", "--batch", "2", "--steps", "1", "--budget", "1e-9"])
    table = gpu_check.parse_table(capsys.readouterr().out)
    steps = [r for r in table if r["check"] == "DPO steps"]
    assert code == 0 and len(steps) == 3
    assert all(r["status"] == "skipped" and "time budget" in r["note"] for r in steps)


def test_the_bf16_path_runs_on_cpu_as_it_would_on_a_gpu():
    """``--cpu --bf16``: bf16 autocast for the scores and both frameworks' steps (what the GPU
    runs), so a dtype error in that path shows here before a GPU slot is spent on it."""
    import contextlib
    import io

    printed = io.StringIO()
    args = ["--cpu", "--bf16", "--batch", "2", "--warmup", "1", "--steps", "1"]
    with contextlib.redirect_stdout(printed):
        code = gpu_check.main(args)
    text = printed.getvalue()
    table = gpu_check.parse_table(text)
    assert code == 0 and "bf16-mixed" in text
    assert [r["status"] for r in table] == ["ok"] * 4
    note = table[0]["note"]  # packed = padded within bf16's tolerance, autocast really on
    assert "tolerance 1e-02" in note
    assert float(note.split("padded vs fp32 ")[1].split(";")[0]) > 0


def test_the_gpu_model_is_qwen25_05b_shaped_and_builds_on_the_setups_device():
    """``--qwen`` (always on a GPU): Qwen2.5-0.5B's shape from the written config, 494 M
    parameters with the embedding tied to the head, built on the run's device (here the CPU,
    as ``--cpu --qwen`` rehearses it)."""
    from inspo.models.load import byte_tokenizer

    tok = byte_tokenizer()
    setup = gpu_check.Setup(
        cpu=True, bf16=True, qwen=True, batch=1, warmup=1, steps=1, max_length=8, tolerance=0.1
    )
    model = gpu_check.build_model(setup, tok)
    c = model.config
    assert (c.model_type, c.hidden_size, c.num_hidden_layers) == ("qwen2", 896, 24)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (14, 2, 151936)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert gpu_check.Shape.of(model).params == 494_032_768
    assert next(model.parameters()).device.type == "cpu"
    assert c.pad_token_id == tok.pad_token_id
