"""inspo.models.sampling: explicit, seeded sampling with a prefilled-once KV cache."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, LlamaConfig
from transformers import LlamaForCausalLM as Llama
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from inspo.models import sampling
from inspo.models.load import tiny_llama
from inspo.models.sampling import SamplingConfig, prompt_ids, sample, sample_ids

PROMPTS = ["Word with b, k, t: ", "a much longer prompt, to pad the others: ", "x"]
# Defaults a real checkpoint may ship; none of them may change what the sampler draws.
CHECKPOINT_DEFAULTS = {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "min_length": 5,
                       "top_k": 3, "top_p": 0.5, "temperature": 0.3}  # fmt: skip
PAD, BOS, EOS = 0, 1, 2  # the 6-token vocabulary of the exact-KL test


def sharp(model, factor):
    """Scale the final norm: sharper next-token distributions, like a trained model's."""
    with torch.no_grad():
        model.model.norm.weight.mul_(factor)
    return model


def byte_llama(tokenizer, seed=0):
    return sharp(tiny_llama(tokenizer=tokenizer, hidden_size=32, num_layers=2, num_heads=2,
                            seed=seed), 6.0)  # fmt: skip


def six_token_llama(seed):
    cfg = LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=PAD,
                      bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    model = Llama(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # far from uniform: the two models' KL is about 0.7
    model.generation_config.update(**CHECKPOINT_DEFAULTS)
    return model


def flat(groups):
    return [s for g in groups for s in g]


def full_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


# --------------------------------------------------------------------------- (a)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_the_checkpoints_generation_config_is_never_read(tokenizer, temperature):
    plain, loaded = byte_llama(tokenizer), byte_llama(tokenizer)
    loaded.generation_config.update(**CHECKPOINT_DEFAULTS)
    cfg = SamplingConfig(temperature=temperature, top_k=50, max_new_tokens=12, seed=3)
    got = sample(loaded, tokenizer, PROMPTS, cfg, n=2, batch_size=4)
    assert got == sample(plain, tokenizer, PROMPTS, cfg, n=2, batch_size=4)


# --------------------------------------------------------------------------- (b)
def exact_response_logps(model, prompt):
    """log π(y | x) of every response of at most 2 tokens: [EOS], or any first token but EOS
    followed by any second token (max_new_tokens = 2 ends it there)."""
    first = full_logits(model, prompt)[-1].log_softmax(-1)
    out = {(EOS,): float(first[EOS])}
    for a in range(6):
        if a != EOS:
            second = full_logits(model, [*prompt, a])[-1].log_softmax(-1)
            out |= {(a, b): float(first[a] + second[b]) for b in range(6)}
    return out


def test_monte_carlo_kl_matches_the_exact_kl_over_all_responses():
    policy, reference = six_token_llama(0), six_token_llama(1)
    prompts = [[BOS, 3, 4], [BOS, 5]]  # different lengths: left padding in the batch
    n = 3000
    cfg = SamplingConfig(max_new_tokens=2, seed=11)
    groups = sample_ids(policy, prompts, cfg, n=n, eos_token_ids=[EOS], pad_token_id=PAD,
                        batch_size=2 * n)  # fmt: skip
    diffs, exact = [], 0.0
    for prompt, group in zip(prompts, groups, strict=True):
        pol, ref = exact_response_logps(policy, prompt), exact_response_logps(reference, prompt)
        assert math.fsum(math.exp(v) for v in pol.values()) == pytest.approx(1.0, abs=1e-5)
        exact += sum(math.exp(lp) * (lp - ref[y]) for y, lp in pol.items()) / len(prompts)
        for s in group:
            assert s.finished == (s.ids[-1] == EOS) and (len(s.ids) == 2 or s.finished)
            assert s.logp == pytest.approx(pol[tuple(s.ids)], abs=1e-4)
            diffs.append(s.logp - ref[tuple(s.ids)])
    assert {len(s.ids) for s in flat(groups)} == {1, 2}  # both kinds of response were drawn
    d = torch.tensor(diffs, dtype=torch.float64)
    mc, se = float(d.mean()), float(d.std() / math.sqrt(len(d)))
    assert exact > 0.3  # far enough from 0 that a biased sampler would show
    assert abs(mc - exact) < 4 * se, (mc, exact, se)


def test_tempered_top_k_draws_follow_the_processed_distribution():
    """First-token frequencies against HF's own warpers (an independent implementation)."""
    model = six_token_llama(0)
    cfg = SamplingConfig(temperature=0.5, top_k=3, top_p=0.9, max_new_tokens=1, seed=5)
    n = 4000
    got = sample_ids(model, [[BOS, 3]], cfg, n=n, eos_token_ids=[EOS], pad_token_id=PAD,
                     batch_size=n)[0]  # fmt: skip
    logits = full_logits(model, [BOS, 3])[-1:]
    for warper in (TemperatureLogitsWarper(0.5), TopKLogitsWarper(3), TopPLogitsWarper(0.9)):
        logits = warper(None, logits)
    q = logits.softmax(-1)[0]
    freq = torch.bincount(torch.tensor([s.ids[0] for s in got]), minlength=6) / n
    assert (freq[q == 0] == 0).all()  # nothing outside the top-k / nucleus
    assert torch.all((freq - q).abs() <= 4 * (q * (1 - q) / n).sqrt() + 1e-9), (freq, q)
    for s in got:
        assert s.sampler_logp == pytest.approx(float(q[s.ids[0]].log()), abs=1e-5)


# --------------------------------------------------------------------------- (c)
@pytest.mark.parametrize(
    "cfg",
    [SamplingConfig(max_new_tokens=10, seed=0),
     SamplingConfig(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=10, seed=0),
     SamplingConfig(temperature=0.0, max_new_tokens=10)],
)  # fmt: skip
def test_per_sample_logps_equal_a_token_by_token_recomputation(tokenizer, cfg):
    model = byte_llama(tokenizer)
    groups = sample(model, tokenizer, PROMPTS, cfg, n=2, batch_size=3)
    warpers = [TemperatureLogitsWarper(cfg.temperature), TopKLogitsWarper(cfg.top_k or 259),
               TopPLogitsWarper(cfg.top_p)] if not cfg.greedy else []  # fmt: skip
    for ctx, group in zip(prompt_ids(tokenizer, PROMPTS), groups, strict=True):
        for s in group:
            logits = full_logits(model, ctx + s.ids)[len(ctx) - 1 : len(ctx) - 1 + len(s.ids)]
            want = logits.log_softmax(-1).gather(-1, torch.tensor(s.ids)[:, None]).sum()
            assert s.logp == pytest.approx(float(want), abs=1e-4)
            for w in warpers:
                logits = w(None, logits)
            q = logits.log_softmax(-1).gather(-1, torch.tensor(s.ids)[:, None]).sum()
            assert s.sampler_logp == pytest.approx(0.0 if cfg.greedy else float(q), abs=1e-4)
            if cfg.pure:
                assert s.sampler_logp == pytest.approx(s.logp, abs=1e-6)
            assert s.text == tokenizer.decode(s.ids, skip_special_tokens=True)
            assert len(s.ids) == cfg.max_new_tokens or s.finished


def test_stops_at_eos_and_prefills_each_prompt_once():
    model = six_token_llama(0)
    with torch.no_grad():
        model.lm_head.weight[EOS] = model.lm_head.weight[EOS].abs()  # EOS likely, not certain
    calls = []
    model.register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True
    )
    prompts = [[BOS, 3, 4], [BOS, 5]]
    cfg = SamplingConfig(max_new_tokens=50, seed=2)
    groups = sample_ids(model, prompts, cfg, n=8, eos_token_ids=[EOS], pad_token_id=PAD,
                        batch_size=16)  # fmt: skip
    samples = flat(groups)
    assert all(s.finished and s.ids.count(EOS) == 1 and s.ids[-1] == EOS for s in samples)
    longest = max(len(s.ids) for s in samples)
    assert longest < cfg.max_new_tokens and len({len(s.ids) for s in samples}) > 1
    # One prefill of the 2 prompts (not 16 rows), then one step per further token, and none
    # after the last row finished. Finished rows leave the batch once they are an eighth of
    # it: the step after token k runs the rows still going and fewer than a seventh more.
    assert calls[0] == torch.Size([2, 3]) and len(calls) == longest
    rows = [c[0] for c in calls[1:]]
    assert all(c[1] == 1 for c in calls[1:]) and rows == sorted(rows, reverse=True)
    for k, r in enumerate(rows, start=1):
        going = sum(len(s.ids) > k for s in samples)
        assert going <= r < going * 8 / 7 + 1, (k, r, going)
    assert rows[-1] < 16  # rows did leave


def test_finished_rows_leave_the_batch_without_changing_any_sample(monkeypatch):
    """The same samples (ids, ends, log-probs) as decoding every row to the end."""
    model = six_token_llama(1)
    with torch.no_grad():
        model.lm_head.weight[EOS] = model.lm_head.weight[EOS].abs()
    prompts = [[BOS, 3, 4], [BOS, 5], [BOS, 4, 4, 3]]
    cfg = SamplingConfig(max_new_tokens=30, seed=5)
    draw = lambda: flat(sample_ids(model, prompts, cfg, n=6, eos_token_ids=[EOS],
                                   pad_token_id=PAD, batch_size=18))  # fmt: skip
    leaving = draw()
    assert len({len(s.ids) for s in leaving}) > 3
    monkeypatch.setattr(sampling, "LEAVE_AT", 2.0)  # no row ever leaves
    for s, kept in zip(leaving, draw(), strict=True):
        assert (s.ids, s.finished) == (kept.ids, kept.finished)
        assert s.logp == pytest.approx(kept.logp, abs=1e-5)
        assert s.sampler_logp == pytest.approx(kept.sampler_logp, abs=1e-5)


# --------------------------------------------------------------------------- (d)
SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 2, "intermediate_size": 64}  # fmt: skip
FAMILIES = {"llama": SIZES, "qwen2": SIZES, "mistral": SIZES,
            "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2}}  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_equals_hf_generate_with_left_padding(tokenizer, family):
    cfg = AutoConfig.for_model(family, vocab_size=len(tokenizer), **FAMILIES[family],
                               pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    steps = 10
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=steps)
    groups = sample(model, tokenizer, PROMPTS, greedy, n=3, batch_size=9)
    rows = prompt_ids(tokenizer, PROMPTS)
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    att = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    gen = GenerationConfig(
        do_sample=False, max_new_tokens=steps, eos_token_id=eos, pad_token_id=pad
    )
    hf = model.generate(input_ids=ids, attention_mask=att, generation_config=gen)[:, width:]
    for want, group in zip(hf.tolist(), groups, strict=True):
        want = want[: want.index(eos) + 1] if eos in want else want
        assert [s.ids for s in group] == [want] * 3


# --------------------------------------------------------------------------- (e)
def test_seeds_fix_the_samples_and_nothing_else_does(tokenizer):
    model = byte_llama(tokenizer)
    cfg = SamplingConfig(max_new_tokens=8, seed=7)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = sample(model, tokenizer, PROMPTS, cfg, n=2, batch_size=6)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is neither used nor moved
    torch.manual_seed(123)
    assert sample(model, tokenizer, PROMPTS, cfg, n=2, batch_size=6) == first
    # Noise belongs to (seed, prompt, sample), not to the batch layout or to n (log-probs may
    # differ in the last bits: padding changes the float arithmetic).
    ids = lambda groups: [[s.ids for s in g] for g in groups]
    assert ids(sample(model, tokenizer, PROMPTS, cfg, n=2, batch_size=1)) == ids(first)
    more = sample(model, tokenizer, PROMPTS, cfg, n=3, batch_size=6)
    assert [g[:2] for g in ids(more)] == ids(first)
    other = sample(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=8, seed=8), n=2)
    assert [s.ids for s in flat(other)] != [s.ids for s in flat(first)]
    # Different samples of one prompt draw different noise.
    assert len({tuple(s.ids) for s in flat(first)}) == len(flat(first))


def test_top_k_1_and_a_tiny_nucleus_are_greedy(tokenizer):
    model = byte_llama(tokenizer)
    greedy = sample(model, tokenizer, PROMPTS, SamplingConfig(temperature=0, max_new_tokens=8))
    for cfg in (SamplingConfig(top_k=1, max_new_tokens=8, seed=4),
                SamplingConfig(top_p=1e-6, max_new_tokens=8, seed=4)):  # fmt: skip
        got = sample(model, tokenizer, PROMPTS, cfg)
        assert [s.ids for s in flat(got)] == [s.ids for s in flat(greedy)]
        assert all(s.sampler_logp == 0.0 for s in flat(got))  # one token kept: q = 1


def test_config_validation_and_purity():
    assert SamplingConfig().pure and not SamplingConfig(top_k=5).pure
    assert SamplingConfig(temperature=0.7, top_p=0.9, seed=3).as_pure() == SamplingConfig(seed=3)
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -1}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
    with pytest.raises(ValueError, match="empty prompt"):
        sample_ids(six_token_llama(0), [[BOS], []], SamplingConfig(), eos_token_ids=[EOS],
                   pad_token_id=PAD)  # fmt: skip
