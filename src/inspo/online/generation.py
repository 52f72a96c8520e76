"""Generation backends: how an iterative or online run samples responses from the live policy
(``conf/generation/``).

A backend is bound to the policy and its tokenizer once, then asked for ``n`` samples per
prompt (token ids, laid out as in training) with a seed; :meth:`Backend.sync` makes its weights
follow the policy after training steps. Every backend samples with the explicit settings of its
config (temperature, top-p, top-k, max new tokens), never a checkpoint's ``generation_config``,
and returns each sample's log-prob under the sampling policy.

- :class:`HF`: the policy itself, through :func:`inspo.models.sampling.sample_ids`: seeded,
  batched, KV-cached, each prompt prefilled once for its ``n`` samples. Nothing to sync.
- :class:`inspo.online.vllm.VLLM`: a colocated vLLM engine (the ``vllm`` extra).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from inspo.models.sampling import Sample, SamplingConfig, sample_ids


@dataclass
class Backend:
    """Base class: the sampling settings and the binding to a policy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 48
    batch_size: int = 256  # decoded rows per forward
    policy: Any = field(default=None, init=False, repr=False)
    tokenizer: Any = field(default=None, init=False, repr=False)

    def sampling(self, seed: int) -> SamplingConfig:
        return SamplingConfig(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            seed=seed,
        )

    def bind(self, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.policy, self.tokenizer = policy, tokenizer

    def sync(self, policy: PreTrainedModel) -> None:
        """Make the samples come from ``policy``'s current weights."""

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        seed: int,
        all_done: Callable[[bool], bool] | None = None,
    ) -> list[list[Sample]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, groups: list[list[Sample]]) -> list[list[Sample]]:
        tok = self.tokenizer
        return [
            [replace(s, text=tok.decode(s.ids, skip_special_tokens=True)) for s in g]
            for g in groups
        ]


@dataclass
class HF(Backend):
    """Samples from the live policy with :func:`inspo.models.sampling.sample_ids`."""

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        seed: int,
        all_done: Callable[[bool], bool] | None = None,
    ) -> list[list[Sample]]:
        tok = self.tokenizer
        eos = tok.eos_token_id
        groups = sample_ids(
            self.policy,
            prompts,
            self.sampling(seed),
            n=n,
            eos_token_ids=[] if eos is None else [eos],
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
            batch_size=self.batch_size,
            all_done=all_done,
        )
        return self.decode(groups)
