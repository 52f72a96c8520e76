"""Which rows a training epoch visits, in which order: seeded, and resumable mid-epoch."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of ``n`` rows in an epoch: a permutation drawn from (seed, epoch) alone."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class EpochShuffle(Sampler[int]):
    """A permutation drawn from (seed, epoch) alone, never from the global RNG.

    A resumed run therefore sees the same order as an uninterrupted one, and ``skip`` drops
    the samples its interrupted epoch had already consumed, once, so a run resumed mid-epoch
    continues exactly where it stopped. Lightning calls ``set_epoch`` at the start of every
    epoch. (Under DDP, Lightning swaps in its own ``DistributedSampler``, which is seeded the
    same way but restarts an interrupted epoch's permutation from its beginning.)
    """

    def __init__(self, n: int, seed: int, skip: int = 0) -> None:
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, skip

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order, self.skip = epoch_order(self.n, self.seed, self.epoch)[self.skip :], 0
        return iter(order)

    def __len__(self) -> int:
        return self.n
