"""The data module of an iterative or online run: training batches come from the rounds.

The training loader yields only a step number ("ticket"); the batch itself is built in
:meth:`OnlineDataModule.on_before_batch_transfer`, which Lightning calls right before the step
runs. Lightning fetches the loader one item ahead, so a batch built at fetch time would be
sampled from the policy before the previous step's update; a ticket costs nothing ahead of
time. Validation batches are the fixed held-out pairs of ``data``, as in an offline run.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader, IterableDataset

from inspo.data.datamodule import PreferenceDataModule
from inspo.online.rounds import Rounds


class Tickets(IterableDataset):
    """The step numbers ``start .. stop − 1``."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter({"step": k} for k in range(self.start, self.stop))


class OnlineDataModule(PreferenceDataModule):
    """:class:`PreferenceDataModule` whose training batches are built by :class:`Rounds`
    (set :attr:`rounds` before fitting)."""

    rounds: Rounds | None = None
    _resume: dict[str, Any] | None = None

    def train_dataloader(self) -> DataLoader:
        step = self.trainer.global_step if self.trainer is not None else 0
        if self._resume is not None:  # restored before the step counter: resolved here
            self.rounds.load_state_dict(self._resume, step)
            self._resume = None
        return DataLoader(Tickets(step, self.rounds.total_steps), batch_size=None)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and batch.keys() == {"step"}:
            return self.rounds.batch(batch["step"], self.trainer.lightning_module)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self.rounds.state_dict() if self.rounds is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = state
