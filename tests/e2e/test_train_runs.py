"""End-to-end runs of inspo-train: both forms, the run folder, resume, and start-up errors."""

from __future__ import annotations

import json
import math

import pytest
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import FAST, full_and_resumed
from inspo.config import ConfigError, compose_config
from inspo.training.run import run


def train(tmp_path, *overrides, synthetic=True):
    fast = FAST if synthetic else [o for o in FAST if not o.startswith("+data.source.")]
    return run(compose_config([*fast, *overrides], tmp_path))


@pytest.mark.parametrize("reflection", ["off", "inspo"])
def test_few_steps_write_the_run_folder(tmp_path, reflection):
    summary = train(tmp_path, f"reflection={reflection}", "trainer.max_steps=3")
    assert summary["steps"] == 3
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    m = on_disk["metrics"]
    for name in ("loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert math.isfinite(m[f"val/{name}"])
        assert math.isfinite(m[f"val/plain/{name}"])
    if reflection == "inspo":  # reflective and plain contexts are different evaluations
        assert m["val/logps/chosen"] != m["val/plain/logps/chosen"]
    assert on_disk["choices"]["reflection"] == reflection
    assert on_disk["status"] == "finished"
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / ".hydra" / "config.yaml").exists()
    report = json.loads((tmp_path / "data_report.json").read_text())
    for split in ("train", "val"):
        r = report[split]
        assert r["rows_read"] == r["rows_used"] + sum(r["skipped"].values())
    # The saved policy is an ordinary HF checkpoint that a later run can start from.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    tok = AutoTokenizer.from_pretrained(tmp_path / "policy")
    assert model.config.hidden_size == 32 and tok.eos_token_id == 258
    assert (tmp_path / "policy" / "model.safetensors").exists()
    metrics_csv = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/rewards/accuracies" in metrics_csv


def test_a_run_can_start_from_a_saved_policy(tmp_path):
    train(tmp_path / "a", "objective=sft", "reference=none", "trainer.max_steps=2")
    summary = train(
        tmp_path / "b", f"model.name_or_path={tmp_path / 'a' / 'policy'}", "trainer.max_steps=1"
    )
    assert summary["steps"] == 1
    saved = OmegaConf.load(tmp_path / "b" / ".hydra" / "config.yaml")
    assert saved.model.name_or_path == str(tmp_path / "a" / "policy")


def test_resume_matches_an_uninterrupted_run(tmp_path):
    common = ["trainer.max_steps=6", "checkpoint.every_n_train_steps=1", "reflection=inspo"]
    full, resumed = full_and_resumed(train, tmp_path, *common)
    assert resumed["steps"] == full["steps"] == 6
    for key in ("val/loss", "val/rewards/margins", "val/plain/logps/chosen"):
        assert resumed["metrics"][key] == pytest.approx(full["metrics"][key], rel=1e-4, abs=1e-6)


def test_ckpt_path_last_without_checkpoint_starts_fresh(tmp_path):
    assert train(tmp_path, "ckpt_path=last", "trainer.max_steps=1")["steps"] == 1


def test_reference_mismatch_is_refused_before_any_model_is_built(tmp_path):
    with pytest.raises(ConfigError, match="needs a reference model but reference=none"):
        train(tmp_path, "objective=dpo", "reference=none")
    with pytest.raises(ConfigError, match="reference-free but reference=policy_init"):
        train(tmp_path, "objective=sft", "reference=policy_init")
    assert not (tmp_path / "checkpoints").exists()


def test_bad_rows_are_counted_not_fatal(tmp_path):
    """Empty prompts/responses, identical pairs and broken lines are skipped and counted."""
    good = [{"prompt": f"Word with b, k, {c}: ", "chosen": "baku", "rejected": "zz"} for c in "tvw"]
    bad = [
        {"prompt": "", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "", "rejected": "b"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
    ]
    lines = [json.dumps(r) for r in good * 4 + bad] + ["{not json"]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    summary = train(
        tmp_path / "run", "data=jsonl", f"data.source.path={path}", "data.source.val_fraction=0.25",
        "trainer.max_steps=1", "data.batch_size=2", synthetic=False,
    )  # fmt: skip
    assert summary["steps"] == 1
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    skipped: dict[str, int] = {}
    for split in report.values():
        assert split["rows_read"] == split["rows_used"] + sum(split["skipped"].values())
        for reason, n in split["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert skipped == {
        "empty_prompt": 1, "empty_response": 1, "identical_responses": 1, "malformed_json": 1,
    }  # fmt: skip


def test_resume_continues_bco_running_mean(tmp_path):
    """BCO-pair's running reward mean δ is training state: a resumed run continues it, so it
    ends where the uninterrupted run ends (it restarted from 0 when it was not checkpointed)."""
    common = ["objective=bco_pair", "objective.running_mean=true", "trainer.max_steps=6",
              "checkpoint.every_n_train_steps=1"]  # fmt: skip
    full, resumed = full_and_resumed(train, tmp_path, *common)
    assert full["metrics"]["val/delta"] != 0.0
    assert resumed["metrics"]["val/delta"] == pytest.approx(full["metrics"]["val/delta"], rel=1e-6)


def test_summary_keeps_train_metrics_and_validates_once_at_the_end(tmp_path):
    """The final train/* metrics reach summary.json, and a run whose last step validated does not
    validate again (trainer.validate after fit cleared train/* and ran a second pass)."""
    summary = train(tmp_path, "trainer.max_steps=4", "trainer.val_check_interval=4",
                    "trainer.check_val_every_n_epoch=null")  # fmt: skip
    m = summary["metrics"]
    assert math.isfinite(m["train/loss"]) and math.isfinite(m["train/rewards/margins"])
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    col = rows[0].split(",").index("val/loss")
    assert sum(1 for r in rows[1:] if r.split(",")[col]) == 1
    # When the last step did not validate, the run validates once more at its end.
    summary = train(tmp_path / "b", "trainer.max_steps=3", "trainer.val_check_interval=2",
                    "trainer.check_val_every_n_epoch=null")  # fmt: skip
    rows = (tmp_path / "b" / "csv" / "metrics.csv").read_text().splitlines()
    col = rows[0].split(",").index("val/loss")
    assert sum(1 for r in rows[1:] if r.split(",")[col]) == 2
    assert math.isfinite(summary["metrics"]["train/loss"])


def test_limit_val_batches_bounds_the_validation(tmp_path):
    """trainer.limit_val_batches=0: no validation at all (not even the final one); 1: one batch
    of the val split."""
    summary = train(tmp_path, "trainer.max_steps=2", "trainer.limit_val_batches=0")
    assert not [k for k in summary["metrics"] if k.startswith("val/")]
    assert math.isfinite(summary["metrics"]["train/loss"])
    summary = train(tmp_path / "b", "trainer.max_steps=2", "trainer.limit_val_batches=1")
    assert "val/rewards/accuracies" in summary["metrics"]


def test_reference_free_objective_needs_no_reference_flag(tmp_path):
    """reference=auto is the default: naming a reference-free objective means no reference."""
    summary = train(tmp_path, "objective=simpo", "trainer.max_steps=1")
    assert summary["choices"]["reference"] == "none"
    assert train(tmp_path / "b", "trainer.max_steps=1")["choices"]["reference"] == "policy_init"
    with pytest.raises(ConfigError, match="reference-free but reference=model"):
        train(tmp_path / "c", "objective=simpo", "reference=model", "reference.name_or_path=x")


def test_a_run_without_validation_data_prints_no_empty_loader_warning(tmp_path, recwarn):
    """An SFT stage has no val split: the validation loop is off, not an empty loader that
    Lightning warns about in every stage ("Total length of `list` across ranks is zero")."""
    summary = train(tmp_path, "experiment=sft", "trainer.max_steps=2", "model.tiny.hidden_size=32")
    assert summary["steps"] == 2
    assert not [w for w in recwarn if "across ranks is zero" in str(w.message)]


def test_the_progress_bar_counts_steps_not_a_negative_epoch(tmp_path, capsys):
    """max_epochs=-1 (steps bound the run): the bar must not read "Epoch 0/-2"."""
    train(tmp_path, "trainer.max_steps=2", "trainer.enable_progress_bar=true")
    out = capsys.readouterr()
    text = out.out + out.err
    assert "/-2" not in text
    assert "Epoch 0" in text or "2/2" in text
