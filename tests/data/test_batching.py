"""Length-grouped and token-budget batches: seeded, every row once per epoch, exact mid-epoch
resume, the same step count on every process; the data report's padding share."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import data_module
from inspo.data.batching import LengthGroupedBatches, TokenBudgetBatches, batch_tokens
from inspo.data.sampler import EpochShuffle

N = 203  # not a multiple of any batch size used here


def skewed_lengths(n=N, views=1, seed=0):
    """[n, views, 2] sequence lengths, long-tailed like real preference data: a pair's rows
    share their prompt, so their lengths are close."""
    g = torch.Generator().manual_seed(seed)
    prompt = (torch.rand(n, 1, 1, generator=g) ** 3 * 500).long() + 8
    return prompt + torch.randint(1, 40, (n, views, 2), generator=g)


def epoch(batches, epoch_no=0):
    batches.sampler.set_epoch(epoch_no)
    return list(batches)


def grouped(skip=0, seed=0, batch_size=8, group_size=5):
    longest = skewed_lengths().flatten(1).max(-1).values
    return LengthGroupedBatches(EpochShuffle(N, seed), longest, batch_size, group_size, seed, skip)


def budget(skip=0, packed=False, max_tokens=4000, group_rows=None, sampler=None):
    sampler = sampler or EpochShuffle(N, 0)
    lengths = skewed_lengths(views=2)
    return TokenBudgetBatches(sampler, lengths, max_tokens, packed, group_rows, seed=0, skip=skip)


def padding(batches, lengths):
    return batch_tokens(batches, lengths, packed=False)["padding_share"]


def test_length_grouping_covers_every_row_once_and_cuts_padding():
    lengths = skewed_lengths()
    first = epoch(grouped())
    assert sorted(i for b in first for i in b) == list(range(N))
    assert [len(b) for b in first].count(8) == len(first) - 1  # one short batch (203 = 25·8 + 3)
    assert len(first) == len(grouped())
    longest = lengths.flatten(1).max(-1).values
    assert int(longest[first[0]].max()) == int(longest.max())  # the longest batch first
    order = EpochShuffle(N, 0)
    random_batches = [list(order)[i : i + 8] for i in range(0, N, 8)]
    assert padding(first, lengths) < 0.5 * padding(random_batches, lengths)
    # seeded: the same again; another epoch or seed gives another order
    assert epoch(grouped()) == first
    assert epoch(grouped(), 1) != first
    assert epoch(grouped(seed=1)) != first


@pytest.mark.parametrize("make", [grouped, budget], ids=["grouped", "budget"])
@pytest.mark.parametrize("k", [1, 7])
def test_resume_mid_epoch_continues_exactly(make, k):
    """Stopped after k batches of epoch 1 and rebuilt with skip=k: the rest of the epoch is
    the uninterrupted epoch's rest, and the next epoch is whole again."""
    full = make()
    whole = epoch(full, 1)
    resumed = make(skip=k)
    assert epoch(resumed, 1) == whole[k:]
    assert epoch(resumed, 2) == epoch(make(), 2)


@pytest.mark.parametrize("packed", [False, True])
def test_token_budget_respects_the_budget_and_covers_every_row(packed):
    full = budget(packed=packed)
    for e in range(2):
        batches = epoch(full, e)
        assert sorted(i for b in batches for i in b) == list(range(N))
        assert all(full.cost(b) <= 4000 or len(b) == 1 for b in batches)
    sizes = {len(b) for b in batches}
    assert len(sizes) > 3  # short pairs share a batch, long ones do not
    # a pair costlier than the budget on its own forms a batch alone
    huge = budget(packed=packed, max_tokens=300)
    alone = [b for b in epoch(huge) if huge.cost(b) > 300]
    assert alone and all(len(b) == 1 for b in alone)
    # grouping by length fills the same budget with fewer, fuller batches when padded
    if not packed:
        assert len(budget(group_rows=64)) < len(full)


def test_processes_get_disjoint_batches_and_the_same_step_count():
    """Under DDP the sampler is Lightning's DistributedSampler: it only says rank and epoch."""
    from torch.utils.data import DistributedSampler

    ds = list(range(N))
    per_rank = []
    for rank in range(3):
        sampler = DistributedSampler(ds, num_replicas=3, rank=rank, shuffle=False)
        per_rank.append(epoch(budget(sampler=sampler)))
    everything = epoch(budget())
    assert len({len(r) for r in per_rank}) == 1
    seen = [i for r in per_rank for b in r for i in b]
    assert set(seen) == set(range(N))
    assert len(seen) - N == sum(len(b) for b in everything[: (-len(everything)) % 3])  # wrapped


def rows(n=40):
    def row(i):
        prompt = f"Question {i}: " + "x" * (i % 7) * 9
        return {"prompt": prompt, "chosen": "a" * (3 + i % 11), "rejected": "b" * (2 + i % 13)}

    return [row(i) for i in range(n)]


def datamodule(tokenizer, **kw):
    source = lambda: {"train": rows(), "val": rows(12)}
    sizes = {"batch_size": 4, "eval_batch_size": 8, "max_length": 128, "max_prompt_length": 96}
    dm = data_module(source, tokenizer, **sizes, **kw)
    dm.setup()
    return dm


def batch_ids(loader):
    return [b["index"].tolist() for b in loader]


@pytest.mark.parametrize(
    "options",
    [{}, {"group_by_length": True, "group_size": 2}, {"max_tokens_per_batch": 300}],
    ids=["plain", "grouped", "budget"],
)
def test_datamodule_resumes_mid_epoch(tokenizer, options):
    """A run resumed after 3 steps of epoch 1 sees the batches the uninterrupted run saw."""
    dm = datamodule(tokenizer, **options)
    whole = batch_ids(dm.train_dataloader())
    n = len(whole)
    dm.trainer = SimpleNamespace(
        world_size=1, global_step=n + 3, accumulate_grad_batches=1, current_epoch=1
    )
    loader = dm.train_dataloader()
    loader.batch_sampler.sampler.set_epoch(1)  # as Lightning does at the start of the epoch
    resumed = batch_ids(loader)
    dm.trainer = None
    fresh = dm.train_dataloader()
    fresh.batch_sampler.sampler.set_epoch(1)
    assert resumed == batch_ids(fresh)[3:]


@pytest.mark.parametrize("packing", [False, True])
def test_data_report_says_what_share_of_computed_tokens_is_padding(tokenizer, packing):
    """The report's counts are those of the batches the loaders really build."""
    dm = datamodule(tokenizer, packing=packing)
    report = dm.report.to_dict()
    for split, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader())):
        real = padded = 0
        for b in loader:
            real += int(b["plain"]["attention_mask"].sum())
            padded += b["plain"]["input_ids"].numel()
        got = report[split]["batches"]
        assert (got["real_tokens"], got["padded_tokens"]) == (real, padded)
        assert got["padding_share_without_packing"] == pytest.approx(1 - real / padded)
        assert got["padding_share"] == (0.0 if packing else pytest.approx(1 - real / padded))
        assert 0 < got["padding_share_without_packing"] < 1
    assert "padding" in str(dm.report)
    assert "data/train/padding_share" in dm.report.flat_metrics()
