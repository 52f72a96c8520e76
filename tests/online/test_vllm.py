"""generation=vllm: the colocated engine against the HF backend on the same policy. These run
where CUDA and vLLM are present; elsewhere they are skipped with the reason."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("generation=vllm needs a CUDA device; none here", allow_module_level=True)
pytest.importorskip("vllm", reason="the vllm extra is not installed")

from inspo.models.load import byte_tokenizer, tiny_llama
from inspo.online.generation import HF
from inspo.online.vllm import VLLM


@pytest.fixture(scope="module")
def setup():
    tok = byte_tokenizer()
    policy = tiny_llama(tokenizer=tok, hidden_size=64, num_layers=2, num_heads=2).cuda()
    engine = VLLM(temperature=0.0, max_new_tokens=12, gpu_memory_utilization=0.2,
                  enforce_eager=True)  # fmt: skip
    engine.bind(policy, tok)
    hf = HF(temperature=0.0, max_new_tokens=12)
    hf.bind(policy, tok)
    prompts = [tok("Word with b, k, t: ")["input_ids"], tok("Word with d, f, g: ")["input_ids"]]
    return tok, policy, engine, hf, [[tok.bos_token_id, *p] for p in prompts]


def greedy(backend, prompts):
    return [g[0].ids for g in backend.generate(prompts, 1, seed=0)]


def test_greedy_samples_and_logps_match_the_hf_backend(setup):
    _, _, engine, hf, prompts = setup
    assert greedy(engine, prompts) == greedy(hf, prompts)
    for a, b in zip(engine.generate(prompts, 1, 0), hf.generate(prompts, 1, 0), strict=True):
        assert a[0].logp == pytest.approx(b[0].logp, abs=1e-3)


def test_weights_follow_the_policy_in_memory(setup):
    _, policy, engine, hf, prompts = setup
    before = greedy(engine, prompts)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    engine.sync(policy)
    after = greedy(engine, prompts)
    assert after == greedy(hf, prompts) and after != before


def test_k_samples_per_prompt_with_seeds(setup):
    _, _, engine, _, prompts = setup
    engine.temperature = 1.0
    a, b = engine.generate(prompts, 4, seed=3), engine.generate(prompts, 4, seed=3)
    assert [[s.ids for s in g] for g in a] == [[s.ids for s in g] for g in b]
    assert all(len(g) == 4 for g in a)
