"""A round of inspo-iterate on the real model: ``model=smollm2`` (its BPE tokenizer, its chat
template, pad = eos) sampling on HH-RLHF prompts, InSPO with the chat reflective template.

What the tiny model cannot show: the prompt pool is the data's own train split rendered as the
model's conversation (not the built-in task's prompts, not the held-out ones); the reflective
context is one chat template, not the rendered text wrapped in a second one; training takes the
sampled ids, each response ending in its own EOS where it ended and in none where it ran out of
tokens, and ``val/contain_eos_token`` counts exactly the samples that ended.
"""

from __future__ import annotations

import json

import pytest

from conftest import HH, needs_real_model, short_dialogues
from inspo.config import compose_config
from inspo.data.rows import to_text
from inspo.data.sources import preference_data
from inspo.models.load import load_tokenizer
from inspo.names import EOS_RATE
from inspo.online.run import iterate

MAX_NEW = 24
pytestmark = [
    needs_real_model,
    pytest.mark.skipif(not HH.exists(), reason=f"shared data file absent: {HH}"),
    pytest.mark.slow,  # ≈1 minute on 2 idle cores: a real model samples, is judged and trains
]


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_round_on_hh_prompts_samples_the_datas_chat_prompts_and_trains_the_sampled_ids(
    real_model, tmp_path
):
    data = tmp_path / "hh.jsonl"
    short_dialogues(data, 8)
    source = ["data=hh_rlhf", f"data.source.path={data}", "data.source.splits=null"]
    summary = iterate(
        compose_config(
            [
                *real_model.overrides(),
                *source,
                "data.source.val_fraction=0.25",
                "reflection=inspo",
                "reflection.template=chat",
                "iterate.rounds=1",
                "iterate.steps_per_round=1",
                "data.batch_size=2",
                f"generation.max_new_tokens={MAX_NEW}",
                "judge=python",
                "judge.function=fake_judges.distinct",
                "eval.n_prompts=0",
                "optim.warmup_steps=0",
                "trainer.enable_progress_bar=false",
            ],
            tmp_path / "run",
            name="iterate",
        )
    )
    assert summary["status"] == "finished" and summary["steps"] == 1
    folder = tmp_path / "run" / "rounds" / "000"
    samples, pairs = lines(folder / "samples.jsonl"), lines(folder / "pairs.jsonl")
    tokens = lines(folder / "tokens.jsonl")
    assert len(pairs) == len(tokens) == 2

    # The pool: the train split's dialogues as SmolLM2's conversation, none of the held-out.
    tok = load_tokenizer(str(real_model.folder))
    raw = preference_data(str(data), val_fraction=0.25)
    rendered = {s: {to_text(r, tok)["prompt"] for r in raw[s]} for s in ("train", "val")}
    prompts = {s["prompt"] for s in samples}
    assert prompts <= rendered["train"] and not prompts & rendered["val"]
    for p in prompts:
        assert "Human:" not in p and p.endswith("<|im_end|>\n<|im_start|>assistant\n")
        # One system turn; its <|im_start|> is the BOS id, not text.
        assert p.startswith("system\n") and p.count("system\n") == 1

    # The reflective context of a chat prompt is its messages, rendered once by the template.
    eos = tok.eos_token_id
    for t in tokens:
        chat = json.loads(t["chat"])
        assert chat and all("<|im_start|>" not in m["content"] for m in chat)
        assert tok.decode(t["prompt"]).count("<|im_start|>system") == 1

    # pad = eos: a sample that ended carries its EOS once, last; one cut at max_new_tokens
    # has exactly that many tokens and no EOS; the pairs train on those same ids.
    for s in samples:
        assert s["tokens"] <= MAX_NEW and (s["finished"] or s["tokens"] == MAX_NEW)
    for t in tokens:
        for side in ("chosen", "rejected"):
            ids = t[side]
            assert eos not in ids[:-1]
            assert len(ids) <= MAX_NEW or ids[-1] == eos
    by_text = {(s["prompt"], s["response"]): s for s in samples}
    for p, t in zip(pairs, tokens, strict=True):
        for side in ("chosen", "rejected"):
            s = by_text[(p["prompt"], p[side])]
            assert (t[side][-1:] == [eos]) == s["finished"]
            assert len(t[side]) == s["tokens"]
    rate = sum(s["finished"] for s in samples) / len(samples)
    assert summary["rounds"][0][EOS_RATE] == pytest.approx(rate)
