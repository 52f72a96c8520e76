"""Writing Lightning checkpoints without holding a second copy of them in memory.

Lightning's ``TorchCheckpointIO`` serialises a checkpoint into an in-memory buffer and then
copies the buffer out to the file, so a checkpoint with optimiser state (three times the
weights under AdamW) briefly costs up to twice its size on top of what training holds: the
run's peak memory is then set by its last checkpoint, not by training.
:class:`StreamingCheckpointIO` streams ``torch.save`` into a file beside the target (tensors
are written from their own storage) and renames it into place, so a checkpoint is still whole
or absent. Paths that are not local files (``s3://``, ...) keep Lightning's writer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["StreamingCheckpointIO"]


class StreamingCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves stream to disk: written aside, then renamed."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def is_local(path: Any) -> bool:
    return type(get_filesystem(path)).__name__ == "LocalFileSystem"
