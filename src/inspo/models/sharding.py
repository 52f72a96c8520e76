"""Lightning strategies used by ``conf/hardware``.

``FSDP2Strategy`` is Lightning's ``ModelParallelStrategy`` (FSDP2 + optional tensor parallel,
``PreferenceModule.configure_model`` applies ``fully_shard``) with one difference: when
``data_parallel_size="auto"`` and the tensor-parallel size is given, the data-parallel size is
the rest of the world (``num_nodes × devices / tensor_parallel_size``). Lightning's own
``"auto"`` means "the number of nodes", which with ``tensor_parallel_size=1`` only fits a
single process per node.

It also resumes from a *sharded* checkpoint (``save_distributed_checkpoint=true``) that leaves
out the frozen reference (``PreferenceModule.on_save_checkpoint``): Lightning's loader asks
torch.distributed.checkpoint for every key of the model, reference included, and fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP2Strategy(ModelParallelStrategy):
    def setup_environment(self) -> None:
        tp = self._tensor_parallel_size
        if self._data_parallel_size == "auto" and tp != "auto":
            world = self.num_nodes * self.num_processes
            if world % int(tp):
                raise ValueError(
                    f"world size {world} (num_nodes × devices) is not divisible by "
                    f"tensor_parallel_size={tp}"
                )
            self._data_parallel_size = world // int(tp)
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict:
        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path) or self.lightning_module.strict_loading:
            return super().load_checkpoint(path, weights_only=weights_only)
        from torch.distributed.checkpoint import DefaultLoadPlanner, load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        # Keys absent from the checkpoint (the frozen reference) keep their current values.
        state = {"state_dict": get_model_state_dict(self.model)}
        load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
        self.model.load_state_dict(state["state_dict"], strict=False)
        for idx, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{idx}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(
                self.model,
                optimizer,
                optim_state_dict=optim_state[key],
                options=StateDictOptions(cpu_offload=True),
            )
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
