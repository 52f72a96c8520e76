"""Reference kinds: precomputed = live, the cache key, TR-DPO sync, start-up checks."""

from __future__ import annotations

import shutil

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import inspo.training.reference as R
from conftest import FAST, data_module
from inspo.config import ConfigError, check_run, compose_config, resolve_reference
from inspo.data.sources import synthetic
from inspo.models.load import byte_tokenizer, frozen_copy, tiny_llama
from inspo.objectives import DPO, SimPO
from inspo.settings import OptimConfig, ReferenceConfig, ReflectionConfig, RunConfig
from inspo.training.module import PreferenceModule
from inspo.training.run import run


def datamodule(template="default", max_length=128, batch_size=4):
    dm = data_module(
        lambda: synthetic(n_sft=8, n_train=12, n_val=8, n_eval=4),
        byte_tokenizer(),
        batch_size=batch_size,
        eval_batch_size=8,
        max_length=max_length,
        max_prompt_length=64,
        template=template,
        reflective=True,
        train_views=("reflective", "plain"),
    )
    dm.setup("fit")
    return dm


def tiny(seed=0):
    return tiny_llama(tokenizer=byte_tokenizer(), hidden_size=16, num_layers=1, num_heads=2,
                      seed=seed)  # fmt: skip


def make_module(policy, reference, **settings):
    # plain reference context + a mixed-in standard loss: both views' reference scores are used
    reflection = ReflectionConfig(mode="inspo", reference_context="plain", standard_weight=0.5)
    return PreferenceModule(policy, DPO(beta=0.5), reference, reflection=reflection, **settings)


def test_precomputed_gives_the_live_losses(tmp_path):
    dm = datamodule()
    policy, reference = tiny(0), frozen_copy(tiny(1))  # reference ≠ policy
    live = make_module(policy, reference)
    pre = make_module(policy, frozen_copy(reference))
    path, hit = R.precompute_reference(pre, pre.reference, dm, tmp_path,
                                       model_id=R.model_fingerprint(reference))  # fmt: skip
    assert not hit and path.exists()
    assert pre.reference is None  # freed: scores travel in the batch
    n = 0
    for batch in dm.train_dataloader():
        assert set(batch["reference_scores"]) == {"plain", "reflective"}
        plain = {k: v for k, v in batch.items() if k != "reference_scores"}
        with torch.no_grad():
            l_live, out_live, *_ = live.compute_loss(plain)
            l_pre, out_pre, *_ = pre.compute_loss(batch)
        torch.testing.assert_close(out_pre.losses, out_live.losses, atol=1e-5, rtol=0)
        torch.testing.assert_close(l_pre, l_live, atol=1e-5, rtol=0)
        n += 1
    assert n == 3
    for batch in dm.val_dataloader():  # validation: reflective and plain-context evaluations
        plain = {k: v for k, v in batch.items() if k != "reference_scores"}
        for pv, rv in (("reflective", "plain"), ("plain", "plain"), ("reflective", "reflective")):
            with torch.no_grad():
                a, *_ = live.evaluate_view(plain, pv, rv)
                b, *_ = pre.evaluate_view(batch, pv, rv)
            torch.testing.assert_close(b.losses, a.losses, atol=1e-5, rtol=0)
    assert out_live.losses.abs().sum() > 0


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    calls = []
    real = R.compute_scores
    monkeypatch.setattr(R, "compute_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    reference = frozen_copy(tiny(1))

    def run(template="default", max_length=128, ref=reference):
        module = make_module(tiny(0), frozen_copy(ref))
        before = len(calls)
        path, hit = R.precompute_reference(module, module.reference, datamodule(template,
                                           max_length), tmp_path,
                                           model_id=R.model_fingerprint(ref))  # fmt: skip
        assert hit == (len(calls) == before)  # a hit computes nothing
        return path, hit

    p1, hit1 = run()
    assert not hit1 and len(calls) == 2  # train and val splits
    p2, hit2 = run()  # nothing changed: reused, not recomputed
    assert hit2 and p2 == p1 and len(calls) == 2
    p3, hit3 = run(template="raw")  # the template changed: a new key, recomputed
    assert not hit3 and p3 != p1
    p4, hit4 = run(max_length=96)
    assert not hit4 and p4 not in (p1, p3)
    p5, hit5 = run(ref=frozen_copy(tiny(2)))  # other reference weights
    assert not hit5 and p5 not in (p1, p3, p4)
    assert run(template="raw") == (p3, True)


class Recorder(L.Callback):
    """The reference each optimiser step trains with, and the policy after each step."""

    def __init__(self):
        self.reference: dict[int, list] = {}
        self.policy: dict[int, list] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):  # after ReferenceSync's
        step = trainer.global_step + 1
        self.reference[step] = [p.detach().clone() for p in module.reference.parameters()]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.policy[trainer.global_step] = [p.detach().clone() for p in module.policy.parameters()]


def test_sync_updates_the_reference_exactly_every_k_steps(tmp_path):
    """every=2, α=0.25 over 5 steps: steps 3 and 5 train with ref ← α·policy + (1−α)·ref,
    the update owed after steps 2 and 4 made right before them; the others with the
    reference of the step before."""
    dm = datamodule(batch_size=2)
    policy = tiny(0)
    module = make_module(policy, frozen_copy(policy), reference_in_checkpoint=True,
                         optim=OptimConfig(lr=1e-2, warmup_steps=0))  # fmt: skip
    sync, rec = R.ReferenceSync(every=2, alpha=0.25), Recorder()
    trainer = L.Trainer(max_steps=5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[sync, rec],
                        default_root_dir=str(tmp_path))  # fmt: skip
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    assert trainer.global_step == 5
    ref = rec.reference

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    assert [s for s in range(2, 6) if not same(ref[s], ref[s - 1])] == [3, 5]
    for b, a, p in zip(ref[2], ref[3], rec.policy[2], strict=True):
        torch.testing.assert_close(a, 0.25 * p + 0.75 * b)
    assert all(not p.requires_grad for p in module.reference.parameters())
    assert sync.state_dict() == {"last_synced": 4}
    # the synced reference is training state: it stays in the checkpoint
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert any(k.startswith("reference.") for k in ckpt["state_dict"])


def test_a_sync_never_follows_the_last_step(tmp_path):
    """``reference=sync`` with max_steps a multiple of sync_every: the validation after the
    last step compares the policy with the reference that step trained with, not with itself.
    With the hard update (α = 1, what iterate.reference=previous uses) a sync after the last
    step made every margin exactly 0 and every accuracy 0."""
    summary = run(compose_config([*FAST, "reference=sync", "reference.sync_every=2",
                                  "reference.sync_alpha=1.0", "trainer.max_steps=4",
                                  "optim.lr=1e-3"], tmp_path))  # fmt: skip
    m = summary["metrics"]
    assert m["val/rewards/margins"] != 0 and m["val/logps/chosen"] != m["val/rewards/chosen"]
    assert abs(m["val/rewards/margins"]) > 1e-4
    assert m["val/rewards/accuracies"] > 0


def test_a_soft_sync_leaves_the_reference_the_last_step_trained_with(tmp_path):
    """every=2, α=0.25, 4 steps: the update owed after step 4 is never made (no step follows),
    so what validates after training is the reference step 4 trained with, not one moved
    towards the final policy."""
    dm = datamodule(batch_size=2)
    policy = tiny(0)
    module = make_module(policy, frozen_copy(policy), reference_in_checkpoint=True,
                         optim=OptimConfig(lr=1e-2, warmup_steps=0))  # fmt: skip
    sync, rec = R.ReferenceSync(every=2, alpha=0.25), Recorder()
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[sync, rec],
                        default_root_dir=str(tmp_path))  # fmt: skip
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    assert trainer.global_step == 4 and sync.state_dict() == {"last_synced": 2}
    for now, trained in zip(module.reference.parameters(), rec.reference[4], strict=True):
        assert torch.equal(now, trained)


def settings(kind):
    return RunConfig(reference=ReferenceConfig(kind=kind), reflection=ReflectionConfig(mode="off"))


def test_start_up_checks_and_auto():
    for kind in ("policy_init", "precomputed", "sync"):
        check_run(settings(kind), DPO())
    with pytest.raises(ConfigError, match="needs a reference"):
        check_run(settings("none"), DPO())
    for kind in ("precomputed", "sync", "policy_init"):
        with pytest.raises(ConfigError, match="reference-free"):
            check_run(settings(kind), SimPO())
    assert resolve_reference(ReferenceConfig(kind="auto"), SimPO()).kind == "none"
    assert resolve_reference(ReferenceConfig(kind="auto"), DPO()).kind == "policy_init"
    with pytest.raises(ValueError, match="sync_every"):
        R.ReferenceSync(every=0)


def test_other_kinds_drop_the_reference_from_checkpoints():
    policy = tiny(0)
    module = make_module(policy, frozen_copy(policy))
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert not any(k.startswith("reference.") for k in ckpt["state_dict"])


def test_sync_resume_is_exact(tmp_path):
    """A run resumed from its step-3 checkpoint (as ``ckpt_path=last`` does) ends with the
    reference and policy of the uninterrupted 6-step run: the synced reference and the last
    synced step are in the checkpoint. (3 steps = one epoch of 12 rows, so the checkpoint is
    taken at an epoch end; mid-epoch resume is tested in tests/e2e/test_train_runs.py.)"""
    dm = datamodule()
    assert len(dm.datasets["train"]) == 12 and dm.batch_size == 4

    def fit(max_steps, ckpt=None, save=False):
        policy = tiny(0)
        module = make_module(policy, frozen_copy(policy), reference_in_checkpoint=True,
                             optim=OptimConfig(lr=1e-2, warmup_steps=0))  # fmt: skip
        callbacks = [R.ReferenceSync(every=2, alpha=0.25)]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0,
                                             every_n_train_steps=3))  # fmt: skip
        trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=save,
                            enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, callbacks=callbacks,
                            default_root_dir=str(tmp_path))  # fmt: skip
        trainer.fit(module, train_dataloaders=dm.train_dataloader(), ckpt_path=ckpt)
        return module

    full = fit(5, save=True)  # syncs after steps 2 and 4; checkpoint at step 3
    shutil.copy(tmp_path / "last.ckpt", tmp_path / "step3.ckpt")
    assert torch.load(tmp_path / "step3.ckpt", weights_only=False)["global_step"] == 3
    resumed = fit(5, ckpt=tmp_path / "step3.ckpt")
    for a, b in zip(resumed.reference.parameters(), full.reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for a, b in zip(resumed.policy.parameters(), full.policy.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    first = frozen_copy(tiny(0))
    assert any(
        not torch.equal(a, b)
        for a, b in zip(first.parameters(), full.reference.parameters(), strict=True)
    )
