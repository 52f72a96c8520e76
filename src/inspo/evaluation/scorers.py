"""Scorers of responses: the built-in task's gold reward, or any reward model.

A scorer is a callable ``(prompts, responses) -> scores``, one float per pair. A scorer that
knows which responses are valid answers (the gold reward) also has ``valid(responses) ->
[bool]``; the evaluation then reports the share of valid samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from inspo.data.collate import pad_rows
from inspo.names import GOLD

Scorer = Callable[[Sequence[str], Sequence[str]], list[float]]


class RewardModelScorer:
    """Scores ``prompt + response`` with an ``AutoModelForSequenceClassification`` (logit 0), on
    ``[bos] + prompt ids + response ids + [eos]``: the tokens training encodes."""

    def __init__(
        self,
        name_or_path: str,
        tokenizer: PreTrainedTokenizerBase | None = None,
        batch_size: int = 32,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path).eval()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError):
            if tokenizer is None:
                raise
            self.tokenizer = tokenizer  # a reward model saved without its tokenizer
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        out: list[float] = []
        # Prompt and response tokenised apart and joined, as training encodes them
        # (inspo.data.encode), so a reward model trained by inspo scores what it was trained on.
        if not prompts:
            return out
        parts = [tok(list(t), add_special_tokens=False)["input_ids"] for t in (prompts, responses)]
        encoded = [bos + p + r + eos for p, r in zip(*parts, strict=True)]
        for start in range(0, len(encoded), self.batch_size):
            # right padding: HF's sequence classifiers read the last non-pad token
            ids, att = pad_rows(encoded[start : start + self.batch_size], tok.pad_token_id)
            logits = self.model(input_ids=ids, attention_mask=att).logits
            out.extend(logits[:, 0].float().tolist())
        return out


class GoldScorer:
    """The built-in task's gold reward (:mod:`inspo.data.synthetic`), and its valid answers."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        from inspo.data.synthetic import gold_reward

        return [gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)]

    def valid(self, responses: Sequence[str]) -> list[bool]:
        from inspo.data.synthetic import is_valid

        return [is_valid(r) for r in responses]


def make_scorer(scorer: str, tokenizer: PreTrainedTokenizerBase | None = None) -> Scorer:
    """``gold``: the synthetic task's gold reward; anything else: a reward model path/name."""
    if scorer == GOLD:
        return GoldScorer()
    return RewardModelScorer(scorer, tokenizer)
