"""inspo-eval: generation, scorers, win rates, Monte-Carlo KL, AlpacaEval export, eval stage."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from conftest import FAST
from inspo.eval import (
    EvalConfig,
    RewardModelScorer,
    cli,
    evaluate,
    log_wandb,
    monte_carlo_kl,
    preference_accuracy,
    sample_logps,
)
from inspo.models import tiny_llama
from inspo.synthetic import make_prompt

PROMPTS = [make_prompt(t) for t in ("bkt", "dfg", "hjl", "mnp", "rst", "vwz")]
SMALL = EvalConfig(n_prompts=6, max_new_tokens=6, batch_size=4, seed=3, progress=False)


def other_model(tokenizer, seed=1):
    return tiny_llama(tokenizer=tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=seed)


def test_sample_logps_match_token_by_token(small_model, tokenizer):
    samples = [[5, 6, tokenizer.eos_token_id], [7], []]
    got = sample_logps(small_model, tokenizer, PROMPTS[:3], samples, batch_size=2)
    for prompt, y, value in zip(PROMPTS[:3], samples, got, strict=True):
        ctx = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + y])
        with torch.no_grad():
            logp = small_model(input_ids=ids).logits.log_softmax(-1)[0]
        want = sum(float(logp[len(ctx) - 1 + t, tok]) for t, tok in enumerate(y))
        assert value.item() == pytest.approx(want, abs=1e-4)


def test_kl_of_a_model_with_itself_is_zero_and_positive_otherwise(small_model, tokenizer):
    samples = [[10, 20, 30], [40, tokenizer.eos_token_id], [50]]
    kl, _ = monte_carlo_kl(small_model, small_model, tokenizer, PROMPTS[:3], samples)
    assert kl == 0.0
    # On the policy's own samples, the MC estimate of KL to a different model is positive.
    ecfg = EvalConfig(n_prompts=6, max_new_tokens=12, batch_size=6, seed=0, progress=False)
    metrics, _ = evaluate(
        small_model, other_model(tokenizer), tokenizer, PROMPTS, ecfg, scorer=lambda p, r: [0] * 6
    )
    assert metrics["eval/kl"] > 0


def test_evaluate_against_itself_ties_everything(small_model, tokenizer, tmp_path):
    metrics, rows = evaluate(
        small_model, small_model, tokenizer, PROMPTS, SMALL, out_dir=tmp_path, generator="g"
    )
    # Same model, same seed: identical samples, all ties, zero KL, equal lengths and scores.
    assert [r["policy"] for r in rows] == [r["reference"] for r in rows]
    assert metrics["eval/win_rate"] == 0.5
    assert metrics["eval/kl"] == 0.0
    assert metrics["eval/length/policy"] == metrics["eval/length/reference"]
    assert metrics["eval/score/policy"] == metrics["eval/score/reference"]
    assert metrics["eval/win_rate_low"] < 0.5 < metrics["eval/win_rate_high"]
    assert 0 <= metrics["eval/valid/policy"] <= 1
    assert metrics["eval/n_prompts"] == 6
    gens = json.loads((tmp_path / "generations.json").read_text())
    assert [sorted(g) for g in gens] == [["generator", "instruction", "output"]] * 6
    assert [g["instruction"] for g in gens] == PROMPTS
    assert {g["generator"] for g in gens} == {"g"}
    ref = json.loads((tmp_path / "reference_generations.json").read_text())
    assert [g["output"] for g in ref] == [g["output"] for g in gens]
    assert {g["generator"] for g in ref} == {"reference"}


def test_win_rate_and_lengths_follow_the_scorer(small_model, tokenizer):
    # A scorer that is the length in bytes: the mean score is the mean length.
    longer = lambda ps, rs: [float(len(r.encode())) for r in rs]
    ecfg = EvalConfig(n_prompts=6, max_new_tokens=12, batch_size=6, seed=0, progress=False)
    pol_m, _ = evaluate(small_model, small_model, tokenizer, PROMPTS, ecfg, scorer=longer)
    assert pol_m["eval/score/policy"] == pytest.approx(pol_m["eval/length/policy"])


def test_reward_model_scorer(tmp_path, small_model, tokenizer):
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    rm = RewardModelScorer(str(tmp_path / "rm"), batch_size=2)
    scores = rm(PROMPTS[:3], ["ba", "bakoti", "zu"])
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
    assert len(set(scores)) == 3  # different inputs, different scores
    # Batched = one by one (right padding reads the last real token).
    assert rm(PROMPTS[1:2], ["bakoti"])[0] == pytest.approx(scores[1], abs=1e-5)
    ecfg = EvalConfig(**{**SMALL.__dict__, "scorer": str(tmp_path / "rm")})
    metrics, rows = evaluate(small_model, other_model(tokenizer), tokenizer, PROMPTS, ecfg)
    assert "eval/valid/policy" not in metrics  # the gold-only metric is absent with an RM
    want = rm([r["prompt"] for r in rows], [r["policy"] for r in rows])
    assert metrics["eval/score/policy"] == pytest.approx(sum(want) / len(want), abs=1e-5)


def test_preference_accuracy_side_by_side():
    m = {"val/plain/rewards/accuracies": 0.6, "val/rewards/accuracies": 0.8}
    assert preference_accuracy(m, "inspo") == {
        "eval/pref_accuracy/plain": 0.6,
        "eval/pref_accuracy/reflective": 0.8,
    }
    assert preference_accuracy({"val/rewards/accuracies": 0.7}, "off") == {
        "eval/pref_accuracy/plain": 0.7
    }


def test_wandb_table(small_model, tokenizer):
    logged = {}

    class FakeRun:
        def log(self, d):
            logged.update(d)

    metrics, rows = evaluate(small_model, small_model, tokenizer, PROMPTS, SMALL)
    log_wandb(FakeRun(), metrics, rows, n_table=4)
    assert logged["eval/win_rate"] == 0.5
    table = logged["eval/samples"]
    assert table.columns == ["prompt", "policy", "reference", "policy_score", "reference_score"]
    assert len(table.data) == 4


@pytest.mark.slow
def test_eval_stage_of_a_training_run_and_cli(tmp_path):
    from inspo.train import compose_config, run

    overrides = [*FAST, "trainer.max_steps=2", "eval.generate=true", "eval.n_prompts=8",
                 "eval.max_new_tokens=8", "eval.progress=false", "reflection=inspo",
                 "optim.lr=5e-3"]  # fmt: skip
    cfg = compose_config(overrides, tmp_path / "run")
    summary = run(cfg)
    m = summary["metrics"]
    for key in ("eval/win_rate", "eval/lc_win_rate", "eval/kl", "eval/length/policy",
                "eval/pref_accuracy/plain", "eval/pref_accuracy/reflective"):  # fmt: skip
        assert key in m, key
    assert m["eval/pref_accuracy/plain"] == m["val/plain/rewards/accuracies"]
    assert m["eval/kl"] > 0  # two optimiser steps moved the policy away from its start
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["metrics"]["eval/win_rate"] == m["eval/win_rate"]
    assert len(json.loads((tmp_path / "run" / "eval" / "generations.json").read_text())) == 8
    # The CLI on the finished run reproduces the stage (same seed, same prompts).
    again = cli([str(tmp_path / "run"), "--n-prompts", "8", "--max-new-tokens", "8",
                  "--no-progress", "--out", str(tmp_path / "cli")])  # fmt: skip
    assert again["eval/win_rate"] == m["eval/win_rate"]
    assert again["eval/kl"] == pytest.approx(m["eval/kl"], abs=1e-4)
