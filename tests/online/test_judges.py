"""Judges: scalar, reward model, Python, pairwise and weighted; penalties; failures named."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from inspo.data.synthetic import gold_reward, make_prompt
from inspo.models.load import byte_tokenizer
from inspo.online.judges import (
    Gold,
    Group,
    JudgeError,
    Pairwise,
    Python,
    RewardModel,
    Weighted,
)

P = make_prompt("bkt")


def groups():
    return [
        Group(P, ["bakiti", "ba", "bakitubu"], [True, True, False]),
        Group(make_prompt("dfg"), ["dafigo", "x"], [True, True]),
    ]


def test_gold_scores_each_response_with_the_gold_reward():
    got = [s for row in Gold().judge(groups()) for s in row]
    want = [gold_reward(g.prompt, r) for g in groups() for r in g.responses]
    assert got == pytest.approx(want) and len(set(want)) > 2


def test_penalties_for_a_missing_eos_and_for_length():
    plain = Gold().judge(groups())
    penalised = Gold(missing_eos_penalty=1.0, length_penalty=0.01).judge(groups())
    for g, a, b in zip(groups(), plain, penalised, strict=True):
        for r, done, x, y in zip(g.responses, g.finished, a, b, strict=True):
            assert y == pytest.approx(x - 0.01 * len(r.encode()) - (0 if done else 1.0))


def test_python_and_pairwise_judges():
    # distinct characters: bakiti 5, ba 2, bakitubu 6; dafigo 6, x 1
    assert Python(function="fake_judges.distinct").judge(groups()) == [[5.0, 2.0, 6.0], [6.0, 1.0]]
    # Copeland: each response's wins + ½ ties against the others of its prompt.
    assert Pairwise(function="fake_judges.prefers_longer").judge(groups()) == [
        [1.0, 0.0, 2.0],
        [1.0, 0.0],
    ]


def test_weighted_sums_its_judges_and_builds_them_from_configs():
    w = Weighted(judges=[
        {"judge": {"_target_": "inspo.online.judges.Python", "function": "fake_judges.distinct"},
         "weight": 2.0},
        {"judge": Gold(), "weight": -1.0},
    ])  # fmt: skip
    d = Python(function="fake_judges.distinct").judge(groups())
    g = Gold().judge(groups())
    for row, a, b in zip(w.judge(groups()), d, g, strict=True):
        assert row == pytest.approx([2 * x - y for x, y in zip(a, b, strict=True)])


@pytest.mark.parametrize("function", ["fake_judges.nan", "fake_judges.too_few"])
def test_nan_or_a_wrong_count_is_an_error_naming_the_judge(function):
    with pytest.raises(JudgeError, match=function):
        Python(function=function).judge(groups())


def test_reward_model_judge_scores_with_logit_0(tmp_path):
    tok = byte_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_labels=1,
        num_hidden_layers=2, num_attention_heads=2, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(cfg).eval()
    rm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    got = RewardModel(name_or_path=str(tmp_path)).judge(groups())
    flat = [(g.prompt, r) for g in groups() for r in g.responses]
    with torch.no_grad():
        for (prompt, response), score in zip(flat, [s for row in got for s in row], strict=True):
            ids = [tok.bos_token_id, *tok(prompt + response, add_special_tokens=False)["input_ids"],
                   tok.eos_token_id]  # fmt: skip
            want = rm(input_ids=torch.tensor([ids])).logits[0, 0].item()
            assert score == pytest.approx(want, abs=1e-5)
    assert len({round(s, 6) for row in got for s in row}) > 1


def test_a_reward_model_judge_runs_on_the_runs_device_in_its_dtype(tmp_path):
    """The judge's config follows model.dtype, and the run sends it to the policy's device (the
    meta device stands in for an accelerator: nothing is computed there, only placed)."""
    from hydra.utils import instantiate

    from inspo.config import compose_config

    tok = byte_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_labels=1,
        num_hidden_layers=1, num_attention_heads=2, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    run_cfg = compose_config(
        ["judge=reward_model", f"judge.name_or_path={tmp_path / 'rm'}", "model.dtype=bf16"],
        tmp_path / "run",
        name="iterate",
    )
    judge = instantiate(run_cfg.judge).to(torch.device("cpu"))
    model = judge.scorer().model  # loaded on first use, where the judge was sent
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cpu", torch.bfloat16)}
    judge.to(torch.device("meta"))  # the run moved after it was loaded: the judge follows
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert judge.scorer().device == torch.device("meta")
