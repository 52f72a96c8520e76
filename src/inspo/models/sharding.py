"""FSDP2: which blocks are sharded (:func:`shard`) and the strategy ``hardware=fsdp`` uses.

``FSDP2Strategy`` is Lightning's ``ModelParallelStrategy`` (FSDP2 + optional tensor parallel;
``PreferenceModule.configure_model`` calls :func:`shard`) with one difference: when
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


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP shards one by one: modules whose class is in the model's
    ``_no_split_modules`` (the HF convention), else ``model.model.layers``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if not layers:
        layers = list(getattr(getattr(model, "model", None), "layers", None) or ())
    return layers


def shard(models: list[torch.nn.Module | None], mesh: Any, bf16_mixed: bool) -> None:
    """``fully_shard`` each decoder layer, then the root, of every model over ``mesh``'s
    ``data_parallel`` dimension; models already sharded are left alone (Lightning calls the
    hook again for ``trainer.validate`` after ``fit``). ``bf16_mixed``: compute in bf16, reduce
    gradients in fp32."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    dp_mesh = mesh["data_parallel"]
    mp = MixedPrecisionPolicy()
    if bf16_mixed:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for model in models:
        if model is None or isinstance(model, FSDPModule):
            continue
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=dp_mesh, mp_policy=mp)
        fully_shard(model, mesh=dp_mesh, mp_policy=mp)
