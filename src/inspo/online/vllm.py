"""``generation=vllm``: a colocated vLLM engine whose weights follow the policy in memory
(the ``vllm`` extra: ``pip install -e ".[vllm]"``; a CUDA device).

The engine runs in the training process (``distributed_executor_backend="external_launcher"``:
no worker processes, one engine per training process, each sampling its own share of the
prompts). It is built once from the policy as it starts (a one-off ``save_pretrained`` to a
temporary folder, since vLLM loads from a path); after that :meth:`VLLM.sync` pushes the
policy's current weights into the engine's model with its ``load_weights`` (no save and reload)
before every round. Under FSDP2 each sharded parameter is gathered whole (``full_tensor``)
for the push; tensor-parallel engines are not supported.

Sampling uses the same explicit settings as :class:`~inspo.online.generation.HF` (temperature,
top-p, top-k, max new tokens; ``generation_config="vllm"``, so the checkpoint's
``generation_config`` is ignored), one seed per request, and returns per-sample log-probs under
the model's own distribution (vLLM's raw log-probs of the sampled tokens).

Supported: vLLM 0.31 – 0.33 (``pyproject.toml``'s ``vllm`` extra). Those releases require
transformers < 5.21. Written against vLLM 0.33's offline API, not run here: no CUDA device;
``tests/online/test_vllm.py`` runs wherever CUDA and vLLM are present.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from inspo.models.sampling import Sample, SamplingConfig
from inspo.online.generation import Backend

DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class VLLM(Backend):
    """A colocated vLLM engine (see the module docstring)."""

    gpu_memory_utilization: float = 0.3  # the rest of the device is the trainer's
    max_model_len: int | None = None
    enforce_eager: bool = False
    llm: Any = field(default=None, init=False, repr=False)
    folder: Any = field(default=None, init=False, repr=False)

    def bind(self, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        try:
            from vllm import LLM
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError('generation=vllm needs vLLM: pip install -e ".[vllm]"') from e
        if not torch.cuda.is_available():  # pragma: no cover - depends on the hardware
            raise RuntimeError("generation=vllm needs a CUDA device; use generation=hf")
        super().bind(policy, tokenizer)
        self.folder = tempfile.TemporaryDirectory(prefix="inspo-vllm-")
        policy.save_pretrained(self.folder.name, state_dict=full_state_dict(policy))
        tokenizer.save_pretrained(self.folder.name)
        dtype = next(policy.parameters()).dtype
        self.llm = LLM(
            model=self.folder.name,
            dtype=DTYPES.get(dtype, "auto"),
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_model_len=self.max_model_len,
            enforce_eager=self.enforce_eager,
            distributed_executor_backend="external_launcher",
            generation_config="vllm",  # never the checkpoint's sampling defaults
            seed=0,
        )

    def sync(self, policy: PreTrainedModel) -> None:
        """Push the policy's current weights into the engine, in memory."""
        weights = list(full_state_dict(policy).items())
        self.llm.apply_model(lambda model: model.load_weights(weights))
        self.llm.reset_prefix_cache()  # cached prompt states came from the old weights

    def draw(self, prompts: list, n: int, sampling: SamplingConfig, all_done: Any) -> list:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        eos = self.tokenizer.eos_token_id
        s = sampling
        params = [
            SamplingParams(
                n=n,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                max_tokens=s.max_new_tokens,
                logprobs=0,
                seed=s.seed + i,
            )
            for i in range(len(prompts))
        ]
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        groups = []
        for out in self.llm.generate(requests, params, use_tqdm=False):
            group = []
            for c in out.outputs:
                logp = sum(next(iter(step.values())).logprob for step in c.logprobs or [])
                ids = list(c.token_ids)
                finished = c.finish_reason == "stop" and bool(ids) and ids[-1] == eos
                group.append(Sample(ids, "", finished, logp, logp if s.pure else float("nan")))
            groups.append(group)
        return groups


def full_state_dict(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The policy's weights, whole: FSDP2's sharded parameters are gathered (every process
    must call this together)."""
    out = {}
    for name, tensor in policy.state_dict().items():
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        out[name] = tensor.detach()
    return out
