"""PreferenceDataModule: rows → checked, tokenised ``datasets.Dataset`` → pair/reflection batches.

Rows are validated once (bad ones are counted in the :class:`~inspo.data.report.DataReport`,
never silently dropped and never able to crash training), tokenised once with ``Dataset.map``
(cached on disk under a key of the rows, tokenizer and layout), and padded per batch by
:class:`~inspo.data.collate.PreferenceCollator`. Training batches are drawn in a seeded order
(:class:`~inspo.data.sampler.EpochShuffle`), or grouped by length or filled to a token budget
(:mod:`inspo.data.batching`); with ``packing`` the scorer runs each view's rows as one sequence
without padding (:mod:`inspo.models.packing`), and the data report says what share of the
computed tokens is padding either way.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from inspo.data.batching import (
    LengthGroupedBatches,
    TokenBudgetBatches,
    batch_tokens,
    pair_lengths,
)
from inspo.data.collate import PreferenceCollator, WithReferenceScores
from inspo.data.encode import Encoder, tokenizer_fingerprint
from inspo.data.report import DataReport
from inspo.data.rows import COLUMNS, check_row, to_text
from inspo.data.sampler import EpochShuffle
from inspo.data.templates import resolve_template
from inspo.hashing import fingerprint
from inspo.names import MARGIN_COLUMN, PLAIN, REFLECTIVE, OverLong
from inspo.settings import DataConfig

log = logging.getLogger(__name__)


@functools.cache
def _code_version() -> str:
    """A hash of the source that turns rows into token sequences."""
    import inspect

    from inspo.data import encode, templates

    return fingerprint(*(inspect.getsource(m) for m in (encode, templates, PreferenceDataModule)))


class PreferenceDataModule(L.LightningDataModule):
    """Pair batches, and reflection batches when ``reflective``.

    Args:
        source: a callable returning ``{split: rows}`` (see :mod:`inspo.data.sources`; the
            run builds it from ``data.source``).
        tokenizer: the policy's tokenizer.
        data: the ``data`` settings (:class:`~inspo.settings.DataConfig`): splits, batch sizes,
            lengths, bad-row policy, packing and batching. ``data.train_split=None``: no
            training split (an iterative run's training batches come from its rounds).
        reflective: whether reflective sequences are built at all. Validation batches then
            carry both views, so the plain-context policy (the model at inference) is always
            evaluated.
        train_views: the views the training step needs, e.g. ``("plain",)`` for the standard
            form, ``("reflective",)`` for InSPO with a reflective reference context, and
            ``("reflective", "plain")`` when the plain view is also needed (plain reference
            context, a mixed-in standard loss, self-distillation).
        template: the reflective layout R(x, y') (``reflection.template``).
        sft_fraction: for an SFT stage, this share of the training rows is laid out
            reflectively, R(x, other) then the chosen response, so the SFT policy learns the
            layout InSPO scores in (rows picked by a seeded draw over the row order).
        seed: the training order's seed (the run's ``seed``).
        cache_dir: where tokenised splits are cached (None: not cached).
    """

    def __init__(
        self,
        source: Callable[[], dict[str, Sequence[dict]]],
        tokenizer: PreTrainedTokenizerBase,
        data: DataConfig | None = None,
        *,
        reflective: bool = False,
        train_views: Sequence[str] = (PLAIN,),
        template: str = "default",
        sft_fraction: float = 0.0,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.source = source
        self.tokenizer = tokenizer
        self.data = data = data or DataConfig()
        self.train_split, self.val_split = data.train_split, data.val_split
        self.views = (PLAIN, REFLECTIVE) if reflective else (PLAIN,)
        self.train_views = tuple(train_views)
        if not set(self.train_views) <= set(self.views):
            raise ValueError(f"train_views {self.train_views} need reflective=True")
        self.encoder = Encoder(
            tokenizer, resolve_template(template), data.max_length, data.max_prompt_length
        )
        self.template = template
        self.report = DataReport(strict=data.strict)
        self.seed = seed
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.sft_fraction = sft_fraction
        self.datasets: dict[str, Dataset] = {}
        self.raw: dict[str, Sequence[dict]] = {}
        # {split: {view: {field: [N]}}}: precomputed reference scores (training.reference),
        # added to each batch by row index as batch["reference_scores"].
        self.reference_scores: dict[str, dict] = {}

    @property
    def batch_size(self) -> int:
        return self.data.batch_size

    # ------------------------------------------------------------------ building
    def setup(self, stage: str | None = None) -> None:
        if self.datasets:  # idempotent: the run sets up early, to fail before any model is built
            return
        self.raw = self.source()
        for split in (self.train_split, self.val_split):
            if split is None:
                continue
            if split not in self.raw:
                raise ValueError(f"split {split!r} not in the data; found {sorted(self.raw)}")
            self.datasets[split] = self._build(split, self.raw[split])
        self._report_batches()
        log.debug("%s", self.report)

    def _build(self, split: str, rows: Sequence[dict]) -> Dataset:
        rep = self.report.split(split)
        clean: list[dict] = []
        for i, row in enumerate(rows):
            if self.data.max_samples is not None and len(clean) >= self.data.max_samples:
                break
            rep.rows_read += 1
            row_id = row.get("row_id", i) if isinstance(row, dict) else i
            # Implicit-prompt and conversational layouts become text rows (inspo.data.rows).
            text = to_text(row, self.tokenizer, keep_chat=self.encoder.template.chat)
            reason = text if isinstance(text, str) else check_row(text)
            if reason:
                self.report.skip(split, reason, i if row_id is None else row_id)
                continue
            extra = {"chat": text["chat"]} if self.encoder.template.chat else {}
            if MARGIN_COLUMN in text:
                extra[MARGIN_COLUMN] = float(text[MARGIN_COLUMN])
            clean.append({"row_id": row_id, **{c: text[c] for c in COLUMNS}, **extra})
        if any(MARGIN_COLUMN in row for row in clean):  # a margin column: every pair needs one
            for row in [r for r in clean if MARGIN_COLUMN not in r]:
                self.report.skip(split, "missing_margin", row["row_id"])
            clean = [r for r in clean if MARGIN_COLUMN in r]
        if not clean:
            raise ValueError(f"split {split!r} has no usable rows:\n{self.report}")
        if self.sft_fraction > 0 and split == self.train_split:
            g = torch.Generator().manual_seed(self.seed)
            picks = (torch.rand(len(clean), generator=g) < self.sft_fraction).tolist()
            for row, pick in zip(clean, picks, strict=True):
                row["sft_reflective"] = pick
        ds = Dataset.from_list(clean)
        ds = ds.map(
            self._encode_rows,
            batched=True,
            batch_size=512,
            remove_columns=[
                c for c in (*COLUMNS, "chat", "sft_reflective") if c in ds.column_names
            ],
            cache_file_name=self._cache_file(split, clean),
            desc=f"tokenising {split}",
        )
        # Truncation can make the two sequences of a pair identical: such pairs carry no
        # preference signal, so they are dropped here and counted, before any batch is built.
        # A cut scored response is counted (response_truncated), or dropped as over_long under
        # data.over_long=drop: its score is no longer the score of the labelled response.
        keep = []
        for i, (same, cut, resp_cut, row_id) in enumerate(
            zip(ds["identical"], ds["truncated"], ds["response_cut"], ds["row_id"], strict=True)
        ):
            if same:
                self.report.skip(split, "identical_after_truncation", row_id)
            elif resp_cut and self.data.over_long is OverLong.drop:
                self.report.skip(split, "over_long", row_id)
            else:
                keep.append(i)
                rep.truncated += int(cut)
                rep.response_truncated += int(resp_cut)
        if len(keep) < len(ds):
            ds = ds.select(keep)
        ds = ds.add_column("index", list(range(len(ds))))
        rep.rows_used = len(ds)
        if len(ds) == 0:
            raise ValueError(f"split {split!r} has no usable rows:\n{self.report}")
        return ds

    def _encode_rows(self, rows: dict[str, list]) -> dict[str, list]:
        enc = self.encoder.encode_batch(rows, self.views)
        picked = [i for i, f in enumerate(rows.get("sft_reflective") or []) if f]
        if picked:  # reflective-layout SFT rows: the plain chosen sequence becomes R(x, y') + y
            sub = {c: [rows[c][i] for i in picked] for c in rows if c != "sft_reflective"}
            ref = self.encoder.encode_batch(sub, (REFLECTIVE,))
            for j, i in enumerate(picked):
                enc["plain_chosen"][i] = ref["reflective_chosen"][j]
                enc["plain_chosen_start"][i] = ref["reflective_chosen_start"][j]
        # The pair is identical for the policy when its two scored responses are.
        v = self.views[0]
        enc["identical"] = [
            a[sa:] == b[sb:]
            for a, sa, b, sb in zip(
                enc[f"{v}_chosen"],
                enc[f"{v}_chosen_start"],
                enc[f"{v}_rejected"],
                enc[f"{v}_rejected_start"],
                strict=True,
            )
        ]
        return enc

    def _cache_file(self, split: str, rows: list[dict]) -> str | None:
        if self.cache_dir is None:
            return None
        key = fingerprint(
            _code_version(),  # a change to the encoding code invalidates every cached file
            rows,
            tokenizer_fingerprint(self.tokenizer),
            self.encoder.template.text,
            self.encoder.template.chat,
            self.encoder.max_length,
            self.encoder.max_prompt_length,
            self.views,
        )
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return str(self.cache_dir / f"{split}-{key[:16]}.arrow")

    # ------------------------------------------------------------------ batches
    def lengths(self, split: str, views: Sequence[str]) -> torch.Tensor:
        """[N, views, 2]: every pair's chosen and rejected sequence lengths in ``views``."""
        return pair_lengths(self.datasets[split], views)

    def train_batches(
        self, sampler: torch.utils.data.Sampler, skip: int = 0
    ) -> LengthGroupedBatches | TokenBudgetBatches | None:
        """The training batch sampler of ``group_by_length`` / ``max_tokens_per_batch``, or
        None when batches are plain runs of ``batch_size`` rows of ``sampler``'s order."""
        d, lengths = self.data, self.lengths(self.train_split, self.train_views)
        if d.max_tokens_per_batch is not None:
            group = d.group_size * d.batch_size if d.group_by_length else None
            budget = d.max_tokens_per_batch
            return TokenBudgetBatches(sampler, lengths, budget, d.packing, group, self.seed, skip)
        if d.group_by_length:
            longest = lengths.flatten(1).max(-1).values
            return LengthGroupedBatches(
                sampler, longest, d.batch_size, d.group_size, self.seed, skip
            )
        return None

    def _report_batches(self) -> None:
        """What one epoch's batches compute, as one process draws them (epoch 0)."""
        for split, views in ((self.train_split, self.train_views), (self.val_split, self.views)):
            if split not in self.datasets:
                continue
            n = len(self.datasets[split])
            if split == self.train_split:
                sampler = EpochShuffle(n, self.seed)
                batcher = self.train_batches(sampler)
                if batcher is None:
                    batches = _runs(list(sampler), self.data.batch_size)
                else:
                    batches = batcher.epoch_batches(0)
            else:
                batches = _runs(list(range(n)), self.data.eval_batch_size)
            self.report.split(split).batches = batch_tokens(
                batches, self.lengths(split, views), self.data.packing
            )

    # ------------------------------------------------------------------ loaders
    def _loader(self, split: str, views: tuple[str, ...], batch_size: int, shuffle: bool):
        ds = self.datasets[split]
        distributed = self.trainer is not None and self.trainer.world_size > 1
        sampler = EpochShuffle(len(ds), self.seed) if shuffle and not distributed else None
        collate = PreferenceCollator(self.tokenizer.pad_token_id, views)
        if split in self.reference_scores:
            collate = WithReferenceScores(collate, self.reference_scores[split])
        workers = self.data.num_workers
        common = {"collate_fn": collate, "num_workers": workers, "persistent_workers": workers > 0}
        batches = self.train_batches(EpochShuffle(len(ds), self.seed)) if shuffle else None
        if batches is not None:
            # skip is an argument, not an attribute set afterwards: under DDP Lightning
            # re-creates a batch sampler from its arguments, with its DistributedSampler
            # (which then only tells the process's rank; see inspo.data.batching).
            world = self.trainer.world_size if self.trainer is not None else 1
            skip = self._consumed(math.ceil(len(batches.epoch_batches(0)) / world))
            if skip:
                batches = self.train_batches(EpochShuffle(len(ds), self.seed), skip)
            return DataLoader(ds, batch_sampler=batches, **common)
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            **common,
        )

    def _consumed(self, per_epoch: int) -> int:
        """Batches this process already ran in the current epoch (0 unless resuming); on
        resume, global_step and current_epoch are restored before the loaders are built."""
        t = self.trainer
        if t is None:
            return 0
        return max(t.global_step * t.accumulate_grad_batches - t.current_epoch * per_epoch, 0)

    def train_dataloader(self) -> DataLoader:
        size = self.data.batch_size
        loader = self._loader(self.train_split, self.train_views, size, shuffle=True)
        if isinstance(loader.sampler, EpochShuffle):
            loader.sampler.skip = self._consumed(len(loader)) * size
        return loader

    def val_dataloader(self) -> DataLoader | list:
        if self.val_split is None:
            return []
        return self._loader(self.val_split, self.views, self.data.eval_batch_size, shuffle=False)


def _runs(order: list[int], size: int) -> list[list[int]]:
    """Consecutive batches of ``size`` rows, as a DataLoader without a batch sampler makes."""
    return [order[i : i + size] for i in range(0, len(order), size)]
