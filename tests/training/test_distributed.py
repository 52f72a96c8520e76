"""Hardware presets: DDP and FSDP2 with 2 CPU processes (gloo), resume, multi-node configs.

The end-to-end tests run ``python -m inspo.cli.train`` in a subprocess exactly as a user would;
Lightning then re-launches the command for rank 1. ``hardware=gpu`` and GPU FSDP cannot run
here (no GPU); they are covered by the composition tests only.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import FAST
from inspo.config import config_dir
from inspo.models.load import byte_tokenizer, tiny_llama

DIST = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=4"]


def train(
    tmp_path: Path, name: str, *overrides: str, timeout: int = 300, processes: int = 2
) -> Path:
    """Run inspo-train in a subprocess; returns the run folder, failing with the output tail."""
    run_dir = tmp_path / name
    env = {**os.environ, "INSPO_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_MODE", None)
    cmd = [sys.executable, "-m", "inspo.cli.train", *FAST, *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-4000:]}"
    assert f"MEMBER: {processes}/{processes}" in out, "not every rank started"
    return run_dir


def check_run(run_dir: Path, steps: int, ckpt_file: bool = True) -> dict:
    """summary.json finite, last.ckpt without the reference, policy/ equal to the checkpoint
    (for a sharded last.ckpt/ folder: policy/ loads and differs from the initial weights)."""
    from transformers import AutoModelForCausalLM

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps
    losses = {k: v for k, v in summary["metrics"].items() if k.endswith("/loss")}
    assert "val/loss" in losses and "val/plain/loss" in losses
    assert all(math.isfinite(v) for v in losses.values()), losses

    loaded = AutoModelForCausalLM.from_pretrained(run_dir / "policy").eval()
    init = tiny_llama(tokenizer=byte_tokenizer(), hidden_size=32, num_layers=2, num_heads=2)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = loaded(ids).logits
        assert torch.isfinite(logits).all()
        assert not torch.allclose(logits, init.eval()(ids).logits), "policy was not trained"
    if not ckpt_file:
        assert (run_dir / "checkpoints" / "last.ckpt" / "meta.pt").exists()
        return summary

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == steps
    sd = ckpt["state_dict"]
    assert not [k for k in sd if k.startswith("reference.")], "frozen reference was stored"
    policy_sd = {k[len("policy.") :]: v for k, v in sd.items() if k.startswith("policy.")}
    from_ckpt = tiny_llama(tokenizer=byte_tokenizer(), hidden_size=32, num_layers=2, num_heads=2)
    from_ckpt.load_state_dict(policy_sd)
    with torch.no_grad():
        torch.testing.assert_close(logits, from_ckpt.eval()(ids).logits)
    return summary


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("hardware", "reflection"),
    [
        ("ddp", "off"),
        ("fsdp", "inspo"),
        pytest.param("ddp", "inspo", marks=pytest.mark.slow),
    ],
)
@pytest.mark.subprocess
def test_two_process_training(tmp_path, hardware, reflection):
    run_dir = train(tmp_path, "run", f"hardware={hardware}", f"reflection={reflection}", *DIST)
    summary = check_run(run_dir, steps=4)
    assert summary["choices"]["reflection"] == reflection
    # Rank 0 alone writes the run's files; rank 1 only leaves its Hydra log.
    assert (run_dir / "train_ddp_process_1.log").exists()
    assert len(list(run_dir.glob("summary*.json"))) == 1


@pytest.mark.distributed
@pytest.mark.subprocess
def test_fsdp_on_one_process_saves_the_trained_policy(tmp_path):
    """hardware=fsdp on one device (as on one GPU): the policy is still sharded (a world of
    one), so policy/ must come from its gathered state dict; its own parameters' storage is
    freed between forwards and cannot be written."""
    one = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.max_steps=4"]
    run_dir = train(tmp_path, "run", "hardware=fsdp", "reflection=inspo", *one, processes=1)
    check_run(run_dir, steps=4)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "batching",
    [
        ["data.max_tokens_per_batch=700"],
        pytest.param(["data.group_by_length=true", "data.group_size=2"], marks=pytest.mark.slow),
    ],
    ids=["budget", "grouped"],
)
@pytest.mark.subprocess
def test_two_process_training_packed_with_batch_samplers(tmp_path, batching):
    """Packed rows (the default) under DDP, with a batch sampler that Lightning re-creates with
    its DistributedSampler: both processes run the same number of steps, none hangs."""
    run_dir = train(tmp_path, "run", "hardware=ddp", "data.packing=true", *batching, *DIST)
    check_run(run_dir, steps=4)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "sharded_ckpt", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["file", "folder"]
)
@pytest.mark.subprocess
def test_fsdp_resume_from_last(tmp_path, sharded_ckpt):
    """A killed FSDP job resubmitted with the same command and ckpt_path=last continues,
    from a consolidated last.ckpt file or a sharded last.ckpt/ folder."""
    args = (
        "hardware=fsdp",
        "reflection=off",
        f"strategy.save_distributed_checkpoint={str(sharded_ckpt).lower()}",
        *DIST,
    )
    run_dir = train(tmp_path, "run", *args, "trainer.max_steps=2", "save_policy=false")
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    assert (run_dir / "checkpoints" / "last.ckpt").is_dir() == sharded_ckpt
    train(tmp_path, "run", *args, "ckpt_path=last")
    check_run(run_dir, steps=4, ckpt_file=not sharded_ckpt)


@pytest.mark.cuda
@pytest.mark.subprocess
def test_fsdp2_on_one_gpu_over_nccl(tmp_path):
    """hardware=fsdp on one CUDA device: NCCL, the policy and the reference fully_shard'ed,
    bf16-mixed, packed rows under the GPU's kernel; the trained policy saves and loads."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "INSPO_CACHE": str(tmp_path / "cache")}
    gpu = ["trainer.accelerator=gpu", "trainer.devices=1", "trainer.precision=bf16-mixed"]
    cmd = [sys.executable, "-m", "inspo.cli.train", *FAST, "hardware=fsdp", "reflection=inspo",
           *gpu, "trainer.max_steps=4", f"hydra.run.dir={run_dir}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-4000:]}"
    assert "MEMBER: 1/1" in out  # Lightning's distributed start (NCCL on a GPU)
    check_run(run_dir, steps=4)


# ---------------------------------------------------------------- in-process, no spawning
@pytest.fixture
def gloo_world_of_one():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this test process")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
    finally:
        dist.destroy_process_group()


def test_configure_model_shards_policy_and_reference_once(gloo_world_of_one, small_model):
    from torch.distributed.fsdp import FSDPModule

    from inspo.models.load import frozen_copy
    from inspo.models.sharding import decoder_layers
    from inspo.objectives import DPO
    from inspo.training.module import PreferenceModule

    plain = frozen_copy(small_model)
    module = PreferenceModule(small_model, DPO(), frozen_copy(small_model))
    module._device_mesh = gloo_world_of_one
    module._trainer = SimpleNamespace(precision="32-true")
    module.configure_model()
    for model in (module.policy, module.reference):
        assert isinstance(model, FSDPModule)
        layers = decoder_layers(model)
        assert len(layers) == 2 and all(isinstance(m, FSDPModule) for m in layers)
    before = [type(m).__mro__ for m in module.modules()]
    module.configure_model()  # Lightning calls it again for trainer.validate
    assert [type(m).__mro__ for m in module.modules()] == before
    assert module.strict_loading is False  # checkpoints carry no reference.* keys
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(module.policy(ids).logits, plain(ids).logits)


def test_configure_model_bf16_mixed_computes_in_bf16_reduces_in_fp32(
    gloo_world_of_one, small_model
):
    from inspo.objectives import SimPO
    from inspo.training.module import PreferenceModule

    module = PreferenceModule(small_model, SimPO())  # reference-free: reference is None
    module._device_mesh = gloo_world_of_one
    module._trainer = SimpleNamespace(precision="bf16-mixed")
    module.configure_model()
    assert module.strict_loading is True  # no reference, nothing left out of checkpoints
    logits = module.policy(torch.randint(0, 256, (2, 10))).logits
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in module.policy.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)  # fp32 master weights


def test_configure_model_is_a_noop_without_a_mesh(small_model):
    from inspo.objectives import SimPO
    from inspo.training.module import PreferenceModule

    module = PreferenceModule(small_model, SimPO())
    module.configure_model()
    assert type(module.policy) is type(small_model)
    assert module.strict_loading is True


def test_decoder_layers_fallback_to_model_layers(small_model):
    from inspo.models.sharding import decoder_layers

    assert [type(m).__name__ for m in decoder_layers(small_model)] == ["LlamaDecoderLayer"] * 2
    small_model._no_split_modules = None
    assert decoder_layers(small_model) == list(small_model.model.layers)


# ---------------------------------------------------------------- composition only
def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_multinode_and_slurm_launcher_compose():
    from hydra.utils import instantiate

    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher",
        reason="hydra-submitit-launcher (the slurm extra) is not installed",
    )
    cfg = composed("hardware=multinode", "hydra/launcher=slurm", "trainer.num_nodes=4")
    assert cfg.trainer.num_nodes == 4 and cfg.trainer.devices == 8
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.strategy._target_ == "inspo.models.sharding.FSDP2Strategy"
    launcher = cfg.hydra.launcher
    slurm = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher._target_ == slurm
    # One SLURM task per GPU, as many nodes as the trainer uses.
    assert launcher.nodes == 4 and launcher.tasks_per_node == 8 and launcher.gpus_per_node == 8
    assert launcher.timeout_min > 0 and launcher.max_num_timeout > 0
    # Hydra builds the launcher from this node; building it submits nothing.
    built = instantiate(launcher)
    assert type(built).__name__ == "SlurmLauncher" and built.params["nodes"] == 4


def test_gpu_preset_composes():
    cfg = composed("hardware=gpu")
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.strategy is None


def test_fsdp2_strategy_data_parallel_size_is_the_world(monkeypatch):
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import ModelParallelStrategy

    cfg = composed("hardware=multinode", "trainer.num_nodes=2")
    strategy = instantiate(cfg.strategy)
    monkeypatch.setattr(ModelParallelStrategy, "setup_environment", lambda self: None)
    strategy.num_nodes = 2
    strategy.parallel_devices = [torch.device("cpu")] * 8
    strategy.setup_environment()
    assert strategy._data_parallel_size == 16  # 2 nodes × 8 devices, tensor_parallel_size 1
    strategy._data_parallel_size, strategy._tensor_parallel_size = "auto", 3
    with pytest.raises(ValueError, match="not divisible"):
        strategy.setup_environment()


def _bco_rank(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from inspo.objectives import BCOPair, PairScores

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)

    def all_mean(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t / dist.get_world_size()

    obj = BCOPair(beta=1.0, running_mean=True)
    obj.all_mean = all_mean
    for step in range(3):  # chosen rewards 10·r + step, rejected 0: batch means differ by rank
        v = torch.full((4,), 10.0 * rank + step, requires_grad=True)
        zero = torch.zeros(4)
        obj(PairScores(v, zero, zero, zero, torch.ones(4), torch.ones(4)))
    Path(out, f"{rank}.json").write_text(json.dumps(obj.state_dict()))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_bco_running_mean_is_one_value_over_processes(tmp_path):
    """TRL gathers BCO's reward mean across processes; a per-rank δ would differ by rank."""
    torch.multiprocessing.spawn(
        _bco_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    states = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    # Batch means (10·r + step)/2 per rank; over both ranks 2.5 + step/2; δ is their running
    # mean over the 3 steps, 3.0 on both ranks (per rank it would be 0.5 and 5.5).
    assert states[0] == states[1] == {"delta": pytest.approx(3.0), "count": 3}
