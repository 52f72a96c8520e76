"""Which rows form each training batch: length-grouped batches and token-budget batches.

Both are batch samplers over pairs, seeded, exactly resumable mid-epoch (``skip`` batches), and
the same on every process: each process builds the whole epoch's batches from the seed and
takes every ``world``-th one (the list padded by wrapping around, as ``DistributedSampler``
pads rows), so every process runs the same number of steps. ``sampler`` only says which epoch
it is and, under DDP, which process this is (Lightning injects its ``DistributedSampler``
there); the order of rows is :func:`~inspo.data.sampler.epoch_order`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from datasets import Dataset
from torch import Tensor
from torch.utils.data import BatchSampler, Sampler

from inspo.data.sampler import epoch_order


def pair_lengths(dataset: Dataset, views: Sequence[str]) -> Tensor:
    """[N, views, 2]: every pair's chosen and rejected sequence lengths in ``views``, read from
    the tokenised dataset's Arrow columns (its row selection applied; no Python token lists)."""
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")
    cols = [
        torch.tensor(pc.list_value_length(table[f"{v}_{side}"]).to_numpy(False))
        for v in views
        for side in ("chosen", "rejected")
    ]
    return torch.stack(cols, -1).view(-1, len(views), 2).long()


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 100_003 + epoch) * 4 + stream)


def by_length(rows: Sequence[int], longest: Tensor, chunk: int) -> list[int]:
    """``rows`` cut into consecutive chunks of ``chunk`` rows, each sorted longest first
    (stable): rows of similar length end up in the same batch, while the chunks keep the
    order random at a larger scale."""
    out: list[int] = []
    for start in range(0, len(rows), chunk):
        part = list(rows[start : start + chunk])
        out += sorted(part, key=lambda i: -int(longest[i]))
    return out


class _Batches(BatchSampler):
    """The machinery both batch samplers share: epoch, processes, skip, length."""

    def __init__(self, sampler: Sampler, seed: int, skip: int) -> None:
        # BatchSampler's own __init__ wants a batch size; these decide batches themselves.
        self.sampler, self.seed, self.skip = sampler, seed, skip
        self.drop_last = False
        self._cached: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of ``epoch``, in order, for all processes together."""
        if self._cached is None or self._cached[0] != epoch:  # Lightning asks len() often
            self._cached = (epoch, self._epoch_batches(epoch))
        return self._cached[1]

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        raise NotImplementedError

    @property
    def epoch(self) -> int:
        return getattr(self.sampler, "epoch", 0)

    def _process(self) -> tuple[int, int]:
        return getattr(self.sampler, "rank", 0), getattr(self.sampler, "num_replicas", 1)

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = self._process()
        batches = self.epoch_batches(self.epoch)
        padded = batches + batches[: (-len(batches)) % world]
        mine, self.skip = padded[rank::world][self.skip :], 0
        return iter(mine)

    def __len__(self) -> int:
        return math.ceil(len(self.epoch_batches(self.epoch)) / self._process()[1])


class LengthGroupedBatches(_Batches):
    """Batches of ``batch_size`` pairs of similar length, in a random order.

    Each epoch: the seeded row order, cut into mega-batches of ``group_size`` batches, each
    sorted by ``longest`` (a pair's longest sequence, which sets its batch's padded width),
    split into batches; then the batches are shuffled, and the one holding the epoch's longest
    pair goes first, so a batch that does not fit in memory fails at the first step.
    """

    def __init__(
        self,
        sampler: Sampler,
        longest: Tensor,
        batch_size: int,
        group_size: int,
        seed: int = 0,
        skip: int = 0,
    ) -> None:
        super().__init__(sampler, seed, skip)
        self.longest, self.batch_size, self.group_size = longest, batch_size, group_size

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        order = epoch_order(len(self.longest), self.seed, epoch)
        rows = by_length(order, self.longest, self.group_size * self.batch_size)
        batches = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        shuffled = torch.randperm(len(batches), generator=_generator(self.seed, epoch, 1))
        batches = [batches[i] for i in shuffled.tolist()]
        first = max(range(len(batches)), key=lambda b: int(self.longest[batches[b]].max()))
        batches.insert(0, batches.pop(first))
        return batches


class TokenBudgetBatches(_Batches):
    """As many pairs per batch as fit ``max_tokens`` computed tokens, so that long and short
    pairs cost the same memory.

    ``lengths`` [N, views, 2]: each pair's chosen and rejected sequence lengths in every view
    the batch carries. A batch costs Σ lengths when ``packed`` (no padding is computed; a
    context two rows share is counted twice, so the budget is an upper bound), else, per view,
    rows × the view's longest sequence (the padded tensor). A pair over the budget on its own
    forms a batch alone. The batches are formed once, from the seeded row order (length-sorted
    within mega-batches of ``group_rows`` pairs when given), so every epoch has the same number
    of steps; each epoch shuffles their order.
    """

    def __init__(
        self,
        sampler: Sampler,
        lengths: Tensor,
        max_tokens: int,
        packed: bool,
        group_rows: int | None = None,
        seed: int = 0,
        skip: int = 0,
    ) -> None:
        super().__init__(sampler, seed, skip)
        self.lengths, self.max_tokens, self.packed = lengths, max_tokens, packed
        order = epoch_order(len(lengths), seed, 0)
        if group_rows:
            order = by_length(order, lengths.flatten(1).max(-1).values, group_rows)
        self.batches = self._fill(order)

    def cost(self, rows: Sequence[int]) -> int:
        """Tokens a batch of these pairs computes."""
        lengths = self.lengths[list(rows)]
        if self.packed:
            return int(lengths.sum())
        return int((2 * len(rows) * lengths.amax(dim=(0, 2))).sum())

    def _fill(self, order: Sequence[int]) -> list[list[int]]:
        lengths = self.lengths.tolist()  # [N][views][2], read in a Python loop
        batches: list[list[int]] = [[]]
        widths: list[int] = [0] * self.lengths.shape[1]  # per view: the padded width
        total = 0  # Σ lengths
        for i in order:
            row = lengths[i]
            grown = [max(w, *side) for w, side in zip(widths, row, strict=True)]
            tokens = sum(map(sum, row))
            n = len(batches[-1]) + 1
            cost = total + tokens if self.packed else 2 * n * sum(grown)
            if batches[-1] and cost > self.max_tokens:
                batches.append([])
                grown, total = [max(side) for side in row], 0
            batches[-1].append(i)
            widths, total = grown, total + tokens
        return batches

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        shuffled = torch.randperm(len(self.batches), generator=_generator(self.seed, epoch, 2))
        return [self.batches[i] for i in shuffled.tolist()]


def batch_tokens(batches: Sequence[Sequence[int]], lengths: Tensor, packed: bool) -> dict:
    """What a list of batches computes (``lengths`` as in :class:`TokenBudgetBatches`): real
    tokens, the tokens of the padded tensors, and the share of the computed tokens that are
    padding, with packing (none) and without."""
    real = padded = 0
    for rows in batches:
        part = lengths[list(rows)]
        real += int(part.sum())
        padded += int((2 * len(rows) * part.amax(dim=(0, 2))).sum())
    share = 1 - real / padded if padded else 0.0
    return {
        "packing": packed,
        "batches": len(batches),
        "pairs_per_batch": sum(map(len, batches)) / max(len(batches), 1),
        "real_tokens": real,
        "padded_tokens": padded,
        "padding_share": 0.0 if packed else share,
        "padding_share_without_packing": share,
    }
