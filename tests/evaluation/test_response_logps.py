"""Reference scores of a round's samples: a prompt's samples scored two at a time, the prompt
run once per two, with the scores each sample has alone."""

from __future__ import annotations

import pytest
import torch

from inspo.evaluation.metrics import grouped_response_logps, response_logps
from inspo.models.load import tiny_llama
from inspo.models.scoring import Scoring, prepare_packing


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "kv-cache"])
def test_grouped_scores_equal_each_samples_own_score(tokenizer, packing):
    model = tiny_llama(tokenizer=tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=3)
    if packing:
        assert prepare_packing(model)
    contexts = [[tokenizer.bos_token_id, *ids(tokenizer, t)] for t in ("Word with b: ", "Hi", "x")]
    groups = [
        [ids(tokenizer, t) for t in ("ba", "babble", "b")],  # odd: one scored on its own
        [ids(tokenizer, t) for t in ("a long answer", "no")],
        [ids(tokenizer, "q")],
    ]
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        got = grouped_response_logps(model, contexts, groups, pad, Scoring(packing=packing), 4)
        flat_ctx = [c for c, g in zip(contexts, groups, strict=True) for _ in g]
        alone = response_logps(model, flat_ctx, [y for g in groups for y in g], pad, 1)
    assert [len(g) for g in got] == [3, 2, 1]
    assert [x for g in got for x in g] == pytest.approx(alone.tolist(), abs=1e-5)


def test_a_prompt_runs_once_per_two_samples(tokenizer):
    """Packed: one forward over [prompt, sample a, sample b] per pair, nothing padded."""
    model = tiny_llama(tokenizer=tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=3)
    assert prepare_packing(model)
    seen = []
    model.model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"].shape), with_kwargs=True
    )
    contexts = [[tokenizer.bos_token_id, *ids(tokenizer, t)] for t in ("A prompt: ", "B")]
    groups = [[ids(tokenizer, t) for t in ("one", "three", "xy", "z")],
              [ids(tokenizer, t) for t in ("yes", "no")]]  # fmt: skip
    with torch.no_grad():
        grouped_response_logps(model, contexts, groups, 0, Scoring(packing=True), 64)
    pairs = zip(contexts, groups, strict=True)
    tokens = sum(len(c) * len(g) // 2 + sum(map(len, g)) for c, g in pairs)
    assert seen == [torch.Size([1, tokens])]
