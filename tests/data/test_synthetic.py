"""The embedded synthetic task: gold reward, determinism, labeller and splits."""

from __future__ import annotations

import pytest

from inspo.data.synthetic import (
    SyntheticConfig,
    gold_reward,
    is_valid,
    make_prompt,
    make_splits,
    prompt_letters,
    prompt_pool,
)
from inspo.settings import SettingError

SMALL = {"n_sft": 200, "n_train": 1000, "n_val": 200, "n_eval": 256}


def test_prompt_layout_round_trip():
    p = make_prompt("bkt")
    assert p == "Word with b, k, t: "
    assert prompt_letters(p) == ("b", "k", "t")
    assert len(p.encode()) <= 32
    with pytest.raises(ValueError):
        prompt_letters("word with b k t")


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("bakoti", 1.0 - 0.03 * 6),  # all three letters, 6 bytes
        ("bamoko", 2 / 3 - 0.03 * 6),  # b and k present, t missing
        ("mo", 0.0 - 0.03 * 2),  # valid, no letter
        ("", -0.5),  # empty
        ("bak oti", -0.5),  # a space: invalid
        ("bakt", -0.5),  # consonant cluster: not syllables
        ("BAKOTI", -0.5),  # upper case: invalid
        ("bakoti9", -0.5),  # digit: invalid
    ],
)
def test_gold_reward_by_hand(response, expected):
    assert gold_reward("Word with b, k, t: ", response) == pytest.approx(expected)


def test_validity():
    assert is_valid("ba") and is_valid("bakotu")
    assert not is_valid("ab") and not is_valid("b") and not is_valid("")


def test_deterministic_from_seed():
    a = make_splits(SyntheticConfig(seed=3, **SMALL))
    b = make_splits(SyntheticConfig(seed=3, **SMALL))
    c = make_splits(SyntheticConfig(seed=4, **SMALL))
    assert a == b
    assert a["train"] != c["train"]
    assert a["eval"] != c["eval"]


def test_split_shapes_and_contents():
    s = make_splits(SyntheticConfig(seed=0, **SMALL))
    assert [len(s[k]) for k in ("sft", "train", "val", "eval")] == [200, 1000, 200, 256]
    assert set(s["eval"][0]) == {"prompt"}
    for split in ("sft", "train", "val"):
        for r in s[split]:
            assert set(r) == {"prompt", "chosen", "rejected"}
            assert r["chosen"] != r["rejected"]
            assert len(r["chosen"].encode()) <= 64 and len(r["rejected"].encode()) <= 64
            assert "\n" not in r["chosen"] + r["rejected"]
            prompt_letters(r["prompt"])  # the fixed layout everywhere
    # the generator spreads over quality: some perfect-letter, some invalid responses
    golds = [gold_reward(r["prompt"], r["chosen"]) for r in s["train"]]
    assert min(golds) == -0.5 and max(golds) > 0.7
    assert 0.0 < sum(g == -0.5 for g in golds) / len(golds) < 0.15


def test_eval_prompts_disjoint_and_unique():
    s = make_splits(SyntheticConfig(seed=1, **SMALL))
    eval_prompts = [r["prompt"] for r in s["eval"]]
    assert len(set(eval_prompts)) == len(eval_prompts)
    seen = {r["prompt"] for split in ("sft", "train", "val") for r in s[split]}
    assert not seen & set(eval_prompts)
    train_prompts = {r["prompt"] for split in ("sft", "train") for r in s[split]}
    assert not train_prompts & {r["prompt"] for r in s["val"]}


def test_tune_prompts_disjoint_from_eval_and_training():
    """The tuning prompts (the search's validation signal) share no prompt with the test
    prompts, with any training row (sft, train) or with an iterative run's prompt pool, at the
    sizes the research runs use."""
    s = make_splits(SyntheticConfig(seed=0))
    tune = [r["prompt"] for r in s["tune"]]
    assert len(tune) == len(set(tune)) == 256 and set(s["tune"][0]) == {"prompt"}
    assert not set(tune) & {r["prompt"] for r in s["eval"]}
    assert not set(tune) & {r["prompt"] for split in ("sft", "train") for r in s[split]}
    assert not set(tune) & {r["prompt"] for r in prompt_pool(seed=0)}


def test_tune_split_leaves_the_other_splits_unchanged():
    """Its size changes no other split: the tuning prompts are not drawn from the generator."""
    a = make_splits(SyntheticConfig(seed=2, n_tune=8, **SMALL))
    b = make_splits(SyntheticConfig(seed=2, n_tune=512, **SMALL))
    assert len(a["tune"]) == 8 and len(b["tune"]) == 512 and b["tune"][:8] == a["tune"]
    a.pop("tune"), b.pop("tune")
    assert a == b
    with pytest.raises(SettingError, match=r"n_tune: must lie in \[1, 512\], got 513"):
        SyntheticConfig(n_tune=513, **SMALL)


def _agreement(rows):
    strict = [
        (gold_reward(r["prompt"], r["chosen"]), gold_reward(r["prompt"], r["rejected"]))
        for r in rows
    ]
    strict = [(c, j) for c, j in strict if c != j]
    return sum(c > j for c, j in strict) / len(strict)


def test_bradley_terry_labels_agree_with_gold():
    clean = _agreement(make_splits(SyntheticConfig(seed=0, **SMALL))["train"])
    assert 0.87 < clean < 0.96
    noisy = _agreement(make_splits(SyntheticConfig(seed=0, label_noise=0.3, **SMALL))["train"])
    assert noisy < clean - 0.15
    sharp = _agreement(make_splits(SyntheticConfig(seed=0, bt_scale=100.0, **SMALL))["train"])
    assert sharp > 0.98


def test_length_bias_prefers_longer_responses():
    def longer_chosen(cfg):
        rows = make_splits(cfg)["train"]
        return sum(len(r["chosen"]) > len(r["rejected"]) for r in rows) / len(rows)

    base = longer_chosen(SyntheticConfig(seed=0, **SMALL))
    biased = longer_chosen(SyntheticConfig(seed=0, length_bias=0.2, **SMALL))
    assert biased > base + 0.15
