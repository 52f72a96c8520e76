"""Reward-model training: the Bradley–Terry loss by hand and against TRL's RewardTrainer, rewards
read where the saved classifier reads them (padded and packed), the margin column, a step that
raises the margin, the run end to end (saved model loaded as judge and scorer, resume)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from conftest import FAST, REPO, SHARED_DATA, data_module, full_and_resumed
from inspo.config import ConfigError, compose_config
from inspo.data.collate import PreferenceCollator
from inspo.evaluation.scorers import make_scorer
from inspo.models.load import byte_tokenizer, load_tokenizer, tiny_llama
from inspo.models.reward import reward_positions, score_rewards
from inspo.models.scoring import Scoring, prepare_packing
from inspo.names import PLAIN
from inspo.objectives import BradleyTerry
from inspo.online.judges import Group
from inspo.settings import ModelConfig, TinyConfig
from inspo.training.reward import RewardModule
from inspo.training.run import run


def rm(tokenizer, seed: int = 0, dtype=torch.float64):
    model = tiny_llama(
        tokenizer=tokenizer, hidden_size=32, num_layers=2, num_heads=2, num_labels=1, seed=seed
    )
    return model.to(dtype)


ROWS = [
    {"prompt": "Say hi.", "chosen": " Hello there!", "rejected": " no", "margin": 0.5},
    {"prompt": "Count: 1 2", "chosen": " 3 4 5", "rejected": " banana split", "margin": 0.0},
    {"prompt": "Name a colour", "chosen": " red", "rejected": " a car, a tree", "margin": 2.0},
    {"prompt": "Q", "chosen": " yes indeed", "rejected": " nope", "margin": -1.0},
]


def batch_of(rows, tokenizer, packing: bool = False, **kw):
    source = lambda: {"train": rows, "val": rows}
    dm = data_module(source, tokenizer, batch_size=len(rows), packing=packing, **kw)
    dm.setup("fit")
    data = dm.datasets["train"]
    return PreferenceCollator(tokenizer.pad_token_id)([data[i] for i in range(len(data))]), dm


# =========================================================================== the loss
def test_bradley_terry_by_hand():
    chosen, rejected = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    margin = torch.tensor([0.25, -1.0])
    got = BradleyTerry()(chosen, rejected)
    want = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(1.0))]
    assert got.tolist() == pytest.approx(want)
    # with the data's margin: −log σ(r_w − r_l − m)
    got = BradleyTerry()(chosen, rejected, margin)
    assert got.tolist() == pytest.approx([math.log1p(math.exp(-0.75)), math.log1p(math.exp(0.0))])
    # centring adds c·(r_w + r_l)² per pair (TRL: c·mean((r_w + r_l)²) over the batch)
    got = BradleyTerry(center_rewards_coefficient=0.1)(chosen, rejected)
    assert got.tolist() == pytest.approx([want[0] + 0.1 * 1.0, want[1] + 0.0])
    # finite where the naive −log(sigmoid(z)) is not
    assert torch.isfinite(BradleyTerry()(torch.tensor([-200.0]), torch.tensor([200.0]))).all()


# =========================================================================== where rewards are read
@pytest.mark.parametrize("pad_is_eos", [False, True])
@pytest.mark.parametrize("packing", [False, True])
def test_rewards_are_what_the_saved_classifier_returns(pad_is_eos, packing):
    """score_rewards (padded, or packed with shared contexts) equals the transformers forward
    that judge=reward_model and eval.scorer run, including with pad = EOS, where the reward is
    read at the token before the final EOS."""
    tok = byte_tokenizer()
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    batch, _ = batch_of(ROWS, tok)
    model = rm(tok).eval()
    model.config.pad_token_id = tok.pad_token_id
    prepare_packing(model)  # as RewardModule does; its padded calls are unchanged
    view = batch[PLAIN]
    with torch.no_grad():
        got, tokens = score_rewards(model, view, Scoring(packing=packing))
        want = model(input_ids=view["input_ids"], attention_mask=view["attention_mask"]).logits
    torch.testing.assert_close(got, want[:, 0], rtol=0, atol=1e-10)
    last = reward_positions(view["input_ids"], tok.pad_token_id)
    lengths = view["attention_mask"].sum(-1)
    assert (last == lengths - (2 if pad_is_eos else 1)).all()  # the EOS, or the token before
    # packed: no padding, and each pair's shared prompt once
    computed, real = int(tokens.computed), int(view["attention_mask"].sum())
    assert computed < real if packing else computed == view["input_ids"].numel()


# =========================================================================== TRL
@pytest.fixture(scope="module")
def trl_reward():
    from trl import RewardConfig, RewardTrainer

    return RewardConfig, RewardTrainer


@pytest.mark.parametrize(
    ("center", "with_margin", "packing"),
    [(None, False, False), (0.05, True, False), (None, False, True), (0.05, True, True)],
)
def test_matches_trl_reward_trainer(tmp_path, trl_reward, center, with_margin, packing):
    """The same rows (our tokenisation) and model, float64: TRL's ``RewardTrainer.compute_loss``
    on its own collator's batch gives our loss and gradients, and its accuracy, margin and mean
    reward are ours. Padded, to float64 rounding; packed, to float32 rounding (parts of the
    model compute in float32 whatever its dtype, and the pack runs them in another order)."""
    from datasets import Dataset

    RewardConfig, RewardTrainer = trl_reward
    tok = byte_tokenizer()
    rows = ROWS if with_margin else [{k: v for k, v in r.items() if k != "margin"} for r in ROWS]
    batch, dm = batch_of(rows, tok, packing=packing)
    ds = dm.datasets["train"]
    trl_rows = [
        {"chosen_ids": r["plain_chosen"], "rejected_ids": r["plain_rejected"]}
        | ({"margin": r["margin"]} if with_margin else {})
        for r in ds
    ]
    ours_model, trl_model = rm(tok), rm(tok)
    args = RewardConfig(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True,
                        center_rewards_coefficient=center)  # fmt: skip
    trainer = RewardTrainer(
        model=trl_model, args=args, train_dataset=Dataset.from_list(trl_rows), processing_class=tok
    )
    trl_batch = trainer.data_collator(trl_rows)
    trl_model.train()
    trl_loss = trainer.compute_loss(trl_model, dict(trl_batch))
    trl_loss.backward()

    objective = BradleyTerry(center_rewards_coefficient=center)
    module = RewardModule(ours_model, objective, scoring=Scoring(packing=packing))
    chosen, rejected, losses, _ = module.rewards(batch)
    assert ("margin" in batch) == with_margin
    loss = losses.mean()
    loss.backward()
    tol = 1e-6 if packing else 1e-12
    torch.testing.assert_close(loss, trl_loss, rtol=tol, atol=tol)
    for (name, p), q in zip(ours_model.named_parameters(), trl_model.parameters(), strict=True):
        atol = tol * float(q.grad.abs().max())
        torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=atol, msg=name)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    rewards = torch.cat([chosen, rejected])
    assert logged["accuracy"] == pytest.approx(float((chosen > rejected).double().mean()))
    assert logged["margin"] == pytest.approx(float((chosen - rejected).mean()), abs=1e-12)
    assert logged["mean_reward"] == pytest.approx(float(rewards.mean()), abs=1e-12)


def test_a_step_raises_the_margin(tokenizer):
    batch, _ = batch_of(ROWS, tokenizer, packing=True)
    module = RewardModule(rm(tokenizer, dtype=torch.float32), BradleyTerry())
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    chosen, rejected, losses, _ = module.rewards(batch)
    losses.mean().backward()
    opt.step()
    with torch.no_grad():
        after_c, after_r, after_losses, _ = module.rewards(batch)
    assert (after_c - after_r).mean() > (chosen - rejected).mean()
    assert after_losses.mean() < losses.mean()


def test_the_margin_column_is_checked_and_counted(tokenizer):
    no_margin = {k: v for k, v in ROWS[1].items() if k != "margin"}
    rows = [*ROWS, {**ROWS[0], "margin": "big"}, no_margin]
    batch, dm = batch_of(rows, tokenizer)
    assert batch["margin"].tolist() == [r["margin"] for r in ROWS]
    assert dict(dm.report.split("train").skipped) == {"invalid_margin": 1, "missing_margin": 1}


# =========================================================================== the run
def train_rm(path: Path, *overrides: str) -> dict:
    cfg = compose_config([*FAST, "experiment=reward_model", "optim.lr=1e-3", *overrides], path)
    return run(cfg)


def test_trained_reward_model_loads_as_judge_and_scorer(tmp_path):
    """inspo-train saves RUN/reward_model; judge=reward_model and eval.scorer load it as it is
    and score the validation pairs as training did (the same accuracy and mean reward)."""
    summary = train_rm(tmp_path / "run", "trainer.max_steps=8")
    metrics = summary["metrics"]
    assert summary["status"] == "finished" and "val/plain/accuracy" not in metrics
    for name in ("loss", "accuracy", "margin", "mean_reward", "std_reward", "min_reward"):
        assert f"train/{name}" in metrics and f"val/{name}" in metrics
    saved = tmp_path / "run" / "reward_model"
    config = json.loads((saved / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["id2label"] == {"0": "LABEL_0"}  # one label: the reward
    assert config["pad_token_id"] == byte_tokenizer().pad_token_id  # where rewards are read

    cfg = compose_config(["judge=reward_model", f"judge.name_or_path={saved}"], tmp_path, "iterate")
    judge = instantiate(cfg.judge)
    scorer = make_scorer(str(saved))
    from inspo.data.sources import synthetic

    val = synthetic(n_sft=64, n_train=64, n_val=32, n_eval=16)["val"]
    groups = [Group(r["prompt"], [r["chosen"], r["rejected"]], [True, True]) for r in val]
    scores = judge.judge(groups)
    direct = scorer([r["prompt"] for r in val for _ in range(2)],
                    [x for r in val for x in (r["chosen"], r["rejected"])])  # fmt: skip
    assert [s for row in scores for s in row] == pytest.approx(direct, abs=1e-6)
    accuracy = sum(c > r for c, r in scores) / len(scores)
    assert accuracy == pytest.approx(metrics["val/accuracy"])
    mean = sum(map(sum, scores)) / (2 * len(scores))
    assert mean == pytest.approx(metrics["val/mean_reward"], abs=1e-5)


def test_a_killed_reward_model_run_resumes_to_the_same_metrics(tmp_path):
    full, resumed = full_and_resumed(train_rm, tmp_path, "trainer.max_steps=6",
                                     "checkpoint.every_n_train_steps=3")  # fmt: skip
    assert resumed["steps"] == full["steps"] == 6
    for key in ("train/loss", "val/loss", "val/accuracy", "val/std_reward"):
        assert resumed["metrics"][key] == pytest.approx(full["metrics"][key], rel=1e-6), key


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["reflection=inspo"], "reflection=off"),
        (["eval.generate=true"], "does not generate"),
        (["reference=policy_init"], "reference=none"),
    ],
)
def test_settings_a_reward_model_cannot_use_fail_before_any_model(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        train_rm(tmp_path, *overrides)


def test_inspo_iterate_refuses_a_reward_objective(tmp_path):
    from inspo.online.run import iterate

    cfg = compose_config([*FAST, "objective=bradley_terry"], tmp_path, "iterate")
    with open_dict(cfg):
        cfg.iterate.rounds = 1
    with pytest.raises(ConfigError, match="inspo-train"):
        iterate(cfg)


# =========================================================================== a real tokenizer
HH = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
SMOLLM2 = Path(os.environ.get("INSPO_SMOLLM2", REPO.parent / "models/smollm2-135m-instruct"))


@pytest.mark.skipif(not HH.exists(), reason=f"shared data file absent: {HH}")
@pytest.mark.skipif(not SMOLLM2.exists(), reason=f"no SmolLM2 checkpoint at {SMOLLM2}")
def test_a_saved_reward_model_scores_real_rows_as_training_did(tmp_path):
    """SmolLM2's BPE tokenizer (pad = EOS) on HH-RLHF rows: the saved reward model, loaded by
    judge=reward_model / eval.scorer, gives the rewards training computed on the same pairs
    (the prompt and the response tokenised apart, the reward read before the final EOS)."""
    from inspo.data.rows import to_text
    from inspo.data.sources import read_json_lines
    from inspo.evaluation.scorers import RewardModelScorer
    from inspo.models.reward import load_reward_model

    tok = load_tokenizer(str(SMOLLM2))
    assert tok.pad_token_id == tok.eos_token_id
    lines, _ = read_json_lines(HH)
    rows = [t for t in (to_text(r, tok) for r in lines[:40]) if isinstance(t, dict)][:24]
    cfg = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_position_embeddings": 2048}
    tiny = TinyConfig(**cfg, vocab_size=len(tok))
    model = load_reward_model(ModelConfig(tiny=tiny), tok).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    batch, dm = batch_of(rows, tok, packing=True, max_length=2048, max_prompt_length=2048)
    assert dm.report.split("train").truncated == 0  # the scorer does not truncate
    prepare_packing(model)  # as RewardModule does
    with torch.no_grad():
        trained, _ = score_rewards(model, batch[PLAIN], Scoring(packing=True))
    scorer = RewardModelScorer(str(tmp_path), batch_size=8)
    prompts = [r["prompt"] for r in rows] * 2
    responses = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    assert scorer(prompts, responses) == pytest.approx(trained.tolist(), abs=1e-4)


def test_a_file_with_a_margin_column_reaches_the_loss_and_its_halves_swap(tmp_path):
    """A JSON Lines file's ``margin`` column reaches the batch; ``swap_held_out`` trains on
    the rows the default run holds out and holds out the rest (a second reward model)."""
    from inspo.data.sources import preference_data

    path = tmp_path / "pairs.jsonl"
    rows = [{**r, "prompt": f"{r['prompt']} #{i}"} for i in range(5) for r in ROWS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = preference_data(str(path), val_fraction=0.5, seed=1)
    second = preference_data(str(path), val_fraction=0.5, seed=1, swap_held_out=True)
    assert second["train"] == first["val"] and second["val"] == first["train"]
    assert {r["margin"] for r in first["train"]} <= {r["margin"] for r in ROWS}
    batch, _ = batch_of(first["train"], byte_tokenizer())
    assert batch["margin"].tolist() == [r["margin"] for r in first["train"]]


def test_a_trained_reward_model_judges_the_loop_and_scores_its_evaluation(tmp_path):
    """The recipe's pieces on the tiny task: a reward model trained by inspo-train judges an
    inspo-iterate round (its samples' scores are the model's) and scores the round's
    evaluation against the initial policy (eval.scorer; the recipe's is a second model)."""
    from inspo.evaluation.scorers import RewardModelScorer
    from inspo.online.run import iterate

    judge_rm = eval_rm = tmp_path / "rm"
    train_rm(judge_rm, "trainer.max_steps=2")
    loop = [o for o in FAST if not o.startswith(("data.batch_size", "+data.source.n_train"))]
    cfg = compose_config([*loop, "data.batch_size=4", "iterate.rounds=1",
                          "iterate.steps_per_round=1", "generation.max_new_tokens=6",
                          "judge=reward_model",
                          f"judge.name_or_path={judge_rm}/reward_model", "eval.n_prompts=4",
                          "eval.max_new_tokens=6", f"eval.scorer={eval_rm}/reward_model"],
                         tmp_path / "loop", name="iterate")  # fmt: skip
    summary = iterate(cfg)
    samples = [json.loads(x) for x in (tmp_path / "loop/rounds/000/samples.jsonl").open()]
    rescored = RewardModelScorer(f"{judge_rm}/reward_model")(
        [s["prompt"] for s in samples], [s["response"] for s in samples]
    )
    assert [s["score"] for s in samples] == pytest.approx(rescored, abs=1e-5)
    evaluation = json.loads((tmp_path / "loop/rounds/000/eval/metrics.json").read_text())
    generations = json.loads((tmp_path / "loop/rounds/000/eval/generations.json").read_text())
    scored = RewardModelScorer(f"{eval_rm}/reward_model")(
        [g["instruction"] for g in generations], [g["output"] for g in generations]
    )
    assert summary["rounds"][0]["eval/score/policy"] == pytest.approx(
        sum(scored) / len(scored), abs=1e-5
    )
    assert evaluation  # the round's evaluation was written
