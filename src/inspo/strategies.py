"""Lightning strategies used by ``conf/hardware``.

``FSDP2Strategy`` is Lightning's ``ModelParallelStrategy`` (FSDP2 + optional tensor parallel,
``PreferenceModule.configure_model`` applies ``fully_shard``) with one difference: when
``data_parallel_size="auto"`` and the tensor-parallel size is given, the data-parallel size is
the rest of the world (``num_nodes × devices / tensor_parallel_size``). Lightning's own
``"auto"`` means "the number of nodes", which with ``tensor_parallel_size=1`` only fits a
single process per node.
"""

from __future__ import annotations

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
