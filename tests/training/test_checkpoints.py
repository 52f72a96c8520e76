"""Checkpoints are written without a second copy of them in memory."""

from __future__ import annotations

import pickle
import tracemalloc

import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from inspo.config import compose_config
from inspo.settings import load_settings
from inspo.training.checkpoints import StreamingCheckpointIO
from inspo.training.run import build_trainer

MB = 2**20


def traced_peak(io, checkpoint, path) -> int:
    """Peak of the Python allocations while ``io`` saves ``checkpoint`` (torch's own tensor
    storages are not traced; a serialisation buffer is)."""
    tracemalloc.start()
    try:
        io.save_checkpoint(checkpoint, path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_checkpoint_streams_to_disk_instead_of_through_a_buffer(tmp_path):
    """A 32 MB checkpoint (weights and AdamW-like state): Lightning's writer holds its bytes
    in Python memory (at least its size), ours under 2 MB; the file loads back equal, and no
    temporary file is left beside it."""
    weights = torch.randn(8 * MB // 4)
    checkpoint = {"state_dict": {"w": weights},
                  "optimizer_states": [{"exp_avg": weights * 2, "exp_avg_sq": weights * 3,
                                        "step": 7}]}  # fmt: skip
    theirs = traced_peak(TorchCheckpointIO(), checkpoint, tmp_path / "a" / "lightning.ckpt")
    ours = traced_peak(StreamingCheckpointIO(), checkpoint, tmp_path / "b" / "last.ckpt")
    assert theirs > 24 * MB  # the measurement sees a buffer where there is one
    assert ours < 2 * MB
    loaded = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    assert torch.equal(loaded["optimizer_states"][0]["exp_avg_sq"], weights * 3)
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["last.ckpt"]


def test_a_failed_save_leaves_the_last_checkpoint_whole(tmp_path):
    path = tmp_path / "last.ckpt"
    StreamingCheckpointIO().save_checkpoint({"step": 1}, path)
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        StreamingCheckpointIO().save_checkpoint({"bad": lambda: 0}, path)  # not picklable
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_runs_write_their_checkpoints_with_it(tmp_path):
    cfg = compose_config([], tmp_path)
    trainer = build_trainer(load_settings(cfg), cfg.logger, cfg.strategy, tmp_path)
    assert isinstance(trainer.strategy.checkpoint_io, StreamingCheckpointIO)
