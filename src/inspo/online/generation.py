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

from inspo.models.sampling import Sample, sample_ids
from inspo.settings import Sampling, SamplingConfig, at_least


@dataclass
class Backend(Sampling):
    """Base class: the sampling settings (:class:`~inspo.settings.Sampling`, checked when the
    backend is built) and the binding to a policy."""

    policy: Any = field(default=None, init=False, repr=False)  # set by bind()
    tokenizer: Any = field(default=None, init=False, repr=False)
    batch_size: int = 256  # decoded rows per forward

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least("batch_size", self.batch_size, 1)

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
    ) -> list[list[Sample]]:
        """``n`` samples of each prompt, texts decoded. ``all_done``: see
        :func:`inspo.models.sampling.sample_ids` (sharded policies decode in lockstep)."""
        return self.decode(self.draw(list(prompts), n, self.sampling(seed), all_done))

    def draw(self, prompts: list, n: int, sampling: SamplingConfig, all_done: Any) -> list:
        raise NotImplementedError  # pragma: no cover - abstract

    def decode(self, groups: list[list[Sample]]) -> list[list[Sample]]:
        tok = self.tokenizer
        return [
            [replace(s, text=tok.decode(s.ids, skip_special_tokens=True)) for s in g]
            for g in groups
        ]


@dataclass
class HF(Backend):
    """Samples from the live policy with :func:`inspo.models.sampling.sample_ids`."""

    def draw(self, prompts: list, n: int, sampling: SamplingConfig, all_done: Any) -> list:
        tok = self.tokenizer
        eos = tok.eos_token_id
        return sample_ids(
            self.policy,
            prompts,
            sampling,
            n=n,
            eos_token_ids=[] if eos is None else [eos],
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
            batch_size=self.batch_size,
            all_done=all_done,
        )
