"""inspo-eval: generation, scorers, win rates, Monte-Carlo KL, AlpacaEval export, eval stage."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

import inspo.evaluation.stage
from conftest import FAST
from inspo.cli.eval import cli
from inspo.data.synthetic import make_prompt
from inspo.evaluation.metrics import (
    length_controlled_win_rate,
    monte_carlo_kl,
    preference_accuracy,
    sample_logps,
    win_rate,
)
from inspo.evaluation.scorers import RewardModelScorer
from inspo.evaluation.stage import eval_stage, evaluate, log_wandb, resolve_device, save
from inspo.models.load import tiny_llama
from inspo.settings import EvalConfig, load_settings

PROMPTS = [make_prompt(t) for t in ("bkt", "dfg", "hjl", "mnp", "rst", "vwz")]
SMALL = EvalConfig(n_prompts=6, max_new_tokens=6, batch_size=4, seed=3, progress=False)


def other_model(tokenizer, seed=1):
    return tiny_llama(tokenizer=tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=seed)


def sharp_model(tokenizer, seed):
    """A tiny model with peaked next-token distributions (scaled final norm), like a trained
    one: sampler settings then visibly change the samples."""
    model = other_model(tokenizer, seed)
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)
    return model


def no_score(prompts, responses):
    return [0.0] * len(responses)


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
    metrics = evaluate(
        small_model, other_model(tokenizer), tokenizer, PROMPTS, ecfg, scorer=lambda p, r: [0] * 6
    ).metrics
    assert metrics["eval/kl"] > 0


def test_evaluate_against_itself_ties_everything(small_model, tokenizer, tmp_path):
    ev = evaluate(small_model, small_model, tokenizer, PROMPTS, SMALL)
    save(ev, tmp_path, SMALL, "cpu", generator="g")
    metrics, rows = ev.metrics, ev.rows()
    # Same model, same seed: identical samples, all ties, zero KL, equal lengths and scores.
    assert [r["policy"] for r in rows] == [r["reference"] for r in rows]
    assert metrics["eval/win_rate"] == 0.5
    assert metrics["eval/kl"] == 0.0
    # Equal lengths everywhere: length cannot be regressed out; the LC rate is the raw one.
    assert (metrics["eval/lc_win_rate"], metrics["eval/lc_identified"]) == (0.5, 0.0)
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
    pol_m = evaluate(small_model, small_model, tokenizer, PROMPTS, ecfg, scorer=longer).metrics
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
    ecfg = replace(SMALL, scorer=str(tmp_path / "rm"))
    ev = evaluate(small_model, other_model(tokenizer), tokenizer, PROMPTS, ecfg)
    metrics, rows = ev.metrics, ev.rows()
    assert "eval/valid/policy" not in metrics  # the gold-only metric is absent with an RM
    want = rm([r["prompt"] for r in rows], [r["policy"] for r in rows])
    assert metrics["eval/score/policy"] == pytest.approx(sum(want) / len(want), abs=1e-5)


def test_the_reward_model_scorer_runs_where_the_policy_is_in_its_dtype(
    tmp_path, small_model, tokenizer, monkeypatch
):
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    # Placed on the device asked for, in the dtype asked for (meta stands in for a GPU).
    rm = RewardModelScorer(str(tmp_path / "rm"), device="meta", dtype="bf16")
    assert {(p.device.type, p.dtype) for p in rm.model.parameters()} == {("meta", torch.bfloat16)}
    # evaluate() asks for the policy's device and dtype.
    asked = {}
    real = inspo.evaluation.stage.make_scorer

    def spy(name, tok, device, dtype):
        asked.update(device=device, dtype=dtype)
        return real(name, tok, device=device, dtype=dtype)

    monkeypatch.setattr(inspo.evaluation.stage, "make_scorer", spy)
    policy = small_model.to(torch.bfloat16)
    ecfg = replace(SMALL, scorer=str(tmp_path / "rm"), n_prompts=2)
    ev = evaluate(policy, policy, tokenizer, PROMPTS, ecfg)
    assert asked == {"device": torch.device("cpu"), "dtype": torch.bfloat16}
    assert math.isfinite(ev.metrics["eval/score/policy"])


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

    ev = evaluate(small_model, small_model, tokenizer, PROMPTS, SMALL)
    metrics, rows = ev.metrics, ev.rows()
    log_wandb(FakeRun(), metrics, rows, n_table=4)
    assert logged["eval/win_rate"] == 0.5
    table = logged["eval/samples"]
    assert table.columns == ["prompt", "policy", "reference", "policy_score", "reference_score"]
    assert len(table.data) == 4


def test_the_checkpoints_generation_config_changes_nothing(tokenizer, tmp_path):
    """A checkpoint's sampling defaults must move neither the samples nor eval/kl."""
    ecfg = EvalConfig(n_prompts=6, max_new_tokens=12, batch_size=4, seed=0, progress=False)
    runs = []
    for defaults in ({}, {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2,
                          "min_length": 5, "top_k": 3}):  # fmt: skip
        policy, reference = sharp_model(tokenizer, 0), sharp_model(tokenizer, 1)
        for model in (policy, reference):
            model.generation_config.update(**defaults)
        ev = evaluate(policy, reference, tokenizer, PROMPTS, ecfg, scorer=no_score)
        runs.append((ev.metrics, ev.rows()))
    (plain, plain_rows), (loaded, loaded_rows) = runs
    assert loaded_rows == plain_rows
    assert loaded["eval/kl"] == plain["eval/kl"] and loaded["eval/kl_se"] == plain["eval/kl_se"]
    assert plain["eval/kl"] > 1.0  # the policies differ: a shifted sample set would show


def test_kl_is_estimated_on_temperature_1_samples(tokenizer, tmp_path):
    policy, reference = sharp_model(tokenizer, 0), sharp_model(tokenizer, 1)
    pure = EvalConfig(n_prompts=6, max_new_tokens=12, batch_size=4, seed=0, progress=False)
    tempered = replace(pure, temperature=0.5, top_k=20, top_p=0.9)
    got = {}
    for name, ecfg in (("pure", pure), ("tempered", tempered)):
        out = tmp_path / name
        ev = evaluate(policy, reference, tokenizer, PROMPTS, ecfg, scorer=no_score)
        save(ev, out, ecfg, "cpu")
        metrics, rows = ev.metrics, ev.rows()
        got[name] = (metrics, rows, json.loads((out / "metrics.json").read_text()))
    assert got["pure"][2]["kl_samples"] == "eval"
    assert got["tempered"][2]["kl_samples"] == "separate temperature-1 samples"
    # The tempered eval samples differ, but the KL comes from the same temperature-1 draws.
    assert [r["policy"] for r in got["tempered"][1]] != [r["policy"] for r in got["pure"][1]]
    assert got["tempered"][0]["eval/kl"] == got["pure"][0]["eval/kl"]
    assert got["tempered"][0]["eval/kl_se"] == got["pure"][0]["eval/kl_se"]


# --------------------------------------------------------------------------- LC win rate
def test_lc_win_rate_with_a_constant_length_gap_is_the_raw_rate_flagged():
    scores, baseline = [1.0] * 18 + [0.0] * 2, [0.5] * 20
    lengths = [40.0 + i for i in range(20)]
    lc = length_controlled_win_rate(scores, baseline, lengths, [n - 28 for n in lengths])
    assert win_rate(scores, baseline).rate == pytest.approx(0.9)
    assert lc.rate == pytest.approx(0.9) and lc.identified is False


def test_lc_win_rate_removes_an_edge_that_comes_from_length_only():
    # The policy wins exactly when it is longer (ties at equal length), and is longer more
    # often than not: a raw win rate of 15.5/21, none of it from anything but length.
    gaps = [float(g) for g in range(-10, 31, 2)]
    scores = [1.0 if g > 0 else 0.5 if g == 0 else 0.0 for g in gaps]
    base = [20.0] * len(gaps)
    lc = length_controlled_win_rate(scores, [0.5] * len(gaps), [20.0 + g for g in gaps], base)
    raw = win_rate(scores, [0.5] * len(gaps)).rate
    assert raw == pytest.approx(15.5 / 21)
    assert lc.identified and abs(lc.rate - 0.5) < 0.05
    # A policy that wins 90% at every length difference keeps (about) its edge.
    scores = [0.0 if i % 10 == 0 else 1.0 for i in range(len(gaps))]
    lc = length_controlled_win_rate(scores, [0.5] * len(gaps), [20.0 + g for g in gaps], base)
    assert lc.identified and lc.rate > 0.85


# --------------------------------------------------------------------------- device
def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert EvalConfig().device == "auto"


def spy_on_resolve_device(monkeypatch):
    calls = []
    real = inspo.evaluation.stage.resolve_device

    def spy(spec):
        calls.append(spec)
        return real(spec)

    monkeypatch.setattr(inspo.evaluation.stage, "resolve_device", spy)
    return calls


def test_the_stage_and_the_cli_resolve_the_same_device(tmp_path, tokenizer, monkeypatch):
    from omegaconf import OmegaConf

    from inspo.config import compose_config

    overrides = [*FAST, "eval.n_prompts=4", "eval.max_new_tokens=4", "eval.progress=false"]
    cfg = compose_config(overrides, tmp_path / "run")
    settings = load_settings(cfg)
    policy = tiny_llama(tokenizer=tokenizer, **{**cfg.model.tiny, "seed": 5})
    calls = spy_on_resolve_device(monkeypatch)
    stage = eval_stage(settings, policy, tokenizer, {}, tmp_path / "run")
    assert calls == ["auto"]
    info = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert info["device"] == str(resolve_device("auto")) and info["config"]["device"] == "auto"
    # The CLI on the same run: the same resolver, from eval.device or --device.
    run = tmp_path / "run"
    (run / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]),
                   run / ".hydra" / "config.yaml")  # fmt: skip
    policy.save_pretrained(run / "policy")
    tokenizer.save_pretrained(run / "policy")
    again = cli([str(run), "--no-progress", "--out", str(tmp_path / "cli")])
    assert calls == ["auto", "auto"]
    assert again["eval/kl"] == pytest.approx(stage["eval/kl"], abs=1e-6)  # the same evaluation
    cli([str(run), "--no-progress", "--device", "cpu", "--top-k", "5", "--out", str(run / "o")])
    assert calls[-1] == "cpu"
    info = json.loads((run / "o" / "metrics.json").read_text())
    assert (info["device"], info["config"]["top_k"]) == ("cpu", 5)
    assert info["kl_samples"] == "separate temperature-1 samples"


@pytest.mark.slow
def test_eval_stage_of_a_training_run_and_cli(tmp_path):
    from inspo.config import compose_config
    from inspo.training.run import run

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


def test_eval_prompts_of_the_tuning_split_and_a_missing_split(tmp_path, tokenizer):
    """data.eval_split=tune scores the tuning prompts (none of them a test prompt); a split the
    data lack is an error, never a silent fallback to other prompts, and a training run that
    would be scored on it fails before it trains, not after."""
    from conftest import FAST
    from inspo.config import compose_config
    from inspo.data.report import DataError
    from inspo.data.sources import source_of
    from inspo.evaluation.stage import eval_prompts
    from inspo.settings import load_settings
    from inspo.training.run import run

    def prompts(*overrides):
        data = load_settings(compose_config([*sizes, *overrides], tmp_path)).data
        return eval_prompts(source_of(data), data, tokenizer)

    sizes = ["+data.source.n_sft=8", "+data.source.n_train=8", "+data.source.n_val=8",
             "+data.source.n_eval=16", "+data.source.n_tune=12"]  # fmt: skip
    test, tune = prompts(), prompts("data.eval_split=tune")
    assert (len(test), len(tune)) == (16, 12) and not set(test) & set(tune)
    with pytest.raises(DataError, match=r"'tuning'.*no such split"):
        prompts("data.eval_split=tuning")
    cfg = compose_config([*FAST, "eval.generate=true", "data.eval_split=tuning"], tmp_path / "r")
    with pytest.raises(DataError, match=r"'tuning'.*no such split"):
        run(cfg)
    assert not (tmp_path / "r" / "checkpoints").exists()
    assert not (tmp_path / "r" / "data_report.json").exists()  # before the trainer was built
