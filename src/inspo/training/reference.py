"""The reference π_ref of every kind, ``reference=`` in the config (``conf/reference/``):

    auto         the default: ``none`` if the objective is reference-free, else
                 ``policy_init`` (resolved at start-up by :func:`inspo.config.resolve_reference`;
                 summary.json and the tags record the resolved kind)
    policy_init  a frozen copy of the initial policy
    model        another model, ``reference.name_or_path``
    none         reference-free: no reference model, reference scores are 0
    adapter_disabled  the LoRA policy with its adapter off: no second copy of the weights
    precomputed  the reference's scores for every row and view of the train and val splits are
                 computed once before training and cached on disk; the reference model is then
                 freed. The batches carry the scores (``batch["reference_scores"]``).
    sync         TR-DPO (Gorbatovski et al. 2024): a frozen copy of the initial policy that
                 :class:`ReferenceSync` moves toward the policy every ``sync_every`` optimiser
                 steps, ref ← α·policy + (1−α)·ref. Because the reference is then training
                 state, it is kept in the checkpoint (other kinds drop it and rebuild it), so a
                 resumed run continues exactly.

Precomputed cache: ``{paths.cache_dir}/reference/{key}.pt``; the key hashes the reference model
(its name/path, commit and config for large checkpoints; its weights otherwise, which covers the
tiny model's config and seed), its dtype, the tokenizer, the template, the max lengths, the views
and the tokenised rows of each split. Any change gives a new key, so a stale cache is never read;
identical settings reuse the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from inspo.data.collate import PreferenceCollator
from inspo.data.encode import tokenizer_fingerprint
from inspo.hashing import fingerprint
from inspo.models.load import freeze, frozen_copy, load_policy
from inspo.models.scoring import Scoring, score_pairs
from inspo.names import ReferenceKind
from inspo.settings import ModelConfig, ReferenceConfig

log = logging.getLogger(__name__)

FIELDS = ("chosen", "rejected", "chosen_length", "rejected_length")
#: Above this many parameters, a model is identified by name, commit and config, not by hashing.
HASH_WEIGHTS_MAX_PARAMS = 200_000_000

Scores = dict[str, dict[str, Tensor]]  # view -> field -> [N] (indexed by the row's ``index``)


def make_reference(
    policy: PreTrainedModel, reference: ReferenceConfig, model: ModelConfig
) -> PreTrainedModel | None:
    """The frozen reference model of the ``reference`` settings (``conf/reference/``) for a
    policy of the ``model`` settings; None where there is none to hold (``none``;
    ``adapter_disabled``, the policy's own base model)."""
    kind, name = reference.kind, reference.name_or_path
    if kind in (ReferenceKind.none, ReferenceKind.adapter_disabled):
        return None
    if kind in (ReferenceKind.model, ReferenceKind.precomputed) and name:
        dtype = reference.dtype or model.dtype
        remote = model.trust_remote_code
        if reference.trust_remote_code is not None:
            remote = reference.trust_remote_code
        return freeze(load_policy(name, dtype=dtype, trust_remote_code=remote))
    if kind in (ReferenceKind.policy_init, ReferenceKind.sync, ReferenceKind.precomputed):
        return frozen_copy(policy)  # the initial policy (for precomputed: its scores)
    raise ValueError(f"reference.kind {kind} must be resolved before a reference is made")


@contextlib.contextmanager
def adapter_disabled(policy: Any) -> Iterator[Any]:
    """``reference=adapter_disabled``: the LoRA policy with its adapter off, in eval mode, is the
    reference, so no second copy of the weights is held."""
    was_training = policy.training
    policy.eval()
    try:
        with policy.disable_adapter():
            yield policy
    finally:
        policy.train(was_training)


@contextlib.contextmanager
def reference_model(
    policy: Any, reference: torch.nn.Module | None, adapter_reference: bool
) -> Iterator[torch.nn.Module]:
    """The model that scores as π_ref, in eval mode: the LoRA policy with its adapter off
    (``adapter_reference``), else the frozen ``reference``. Every live reference score, in
    training steps and in the loop's rounds, is taken inside this."""
    if adapter_reference:
        with adapter_disabled(policy) as base:
            yield base
        return
    if reference is None:
        raise RuntimeError("this objective needs reference scores but no reference is set")
    yield reference.eval()


# --------------------------------------------------------------------------- keys
def model_fingerprint(model: torch.nn.Module, name_or_path: str | None = None) -> str:
    """Identify a reference model: a hash of its weights, or for large named checkpoints its
    name/path, commit and config (plus size and mtime of local weight files)."""
    n_params = sum(p.numel() for p in model.parameters())
    if name_or_path is None or n_params <= HASH_WEIGHTS_MAX_PARAMS:
        h = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(str(tensor.dtype).encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return "weights:" + h.hexdigest()
    config = getattr(model, "config", None)
    files = []
    path = Path(name_or_path)
    if path.is_dir():
        files = [
            (f.name, f.stat().st_size, f.stat().st_mtime_ns)
            for f in sorted(path.iterdir())
            if f.suffix in (".safetensors", ".bin", ".pt")
        ]
    return "named:" + fingerprint(
        name_or_path,
        getattr(config, "_commit_hash", None),
        config.to_dict() if config is not None else None,
        files,
    )


def dataset_fingerprint(dataset: Any, views: Sequence[str]) -> str:
    """Hash of the tokenised sequences (and their response starts) of the given views."""
    cols = ["index"] + [
        f"{v}_{side}{suffix}"
        for v in views
        for side in ("chosen", "rejected")
        for suffix in ("", "_start")
    ]
    return fingerprint(*[dataset[c] for c in cols])


def cache_key(
    model_id: str, dtype: str, datamodule: Any, splits: Sequence[str], views: Sequence[str]
) -> str:
    """The cache key: model, dtype, tokenizer, template, max lengths, views and rows."""
    enc = datamodule.encoder
    return fingerprint(
        model_id,
        dtype,
        tokenizer_fingerprint(datamodule.tokenizer),
        enc.template.text,
        enc.template.chat,
        enc.max_length,
        enc.max_prompt_length,
        list(views),
        {s: dataset_fingerprint(datamodule.datasets[s], views) for s in splits},
    )[:24]


# --------------------------------------------------------------------------- computing
@torch.no_grad()
def compute_scores(
    model: torch.nn.Module,
    dataset: Any,
    views: Sequence[str],
    pad_id: int,
    batch_size: int,
    scoring: Scoring | None = None,
) -> Scores:
    """Score every row of ``dataset`` in every view, as training scores them (the same
    :func:`~inspo.models.scoring.score_pairs` and ``scoring`` settings)."""
    model.eval()
    device = next(model.parameters()).device
    collate = PreferenceCollator(pad_id, tuple(views))
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    n = len(dataset)
    out: Scores = {
        v: {f: torch.zeros(n, dtype=torch.long if "length" in f else torch.float32) for f in FIELDS}
        for v in views
    }
    for batch in tqdm(loader, desc="reference scores", leave=False):
        idx = batch["index"]
        for v in views:
            view = {k: t.to(device) for k, t in batch[v].items()}
            s, _ = score_pairs(model, view, scoring or Scoring())
            for f in FIELDS:
                out[v][f][idx] = getattr(s, f).detach().to("cpu", out[v][f].dtype)
    return out


def load_or_compute(
    path: Path, compute: Callable[[], dict[str, Scores]]
) -> tuple[dict[str, Scores], bool]:
    """Read the cache at ``path`` or compute and write it (atomically). Returns (scores, hit)."""
    if path.exists():
        log.info("reference scores: cache hit %s", path)
        return torch.load(path, weights_only=True), True
    log.info("reference scores: computing (cache miss %s)", path)
    scores = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(scores, tmp)
    os.replace(tmp, path)
    return scores, False


def precompute_reference(
    module: Any,
    reference: torch.nn.Module,
    datamodule: Any,
    cache_dir: str | Path,
    *,
    model_id: str,
    dtype: str = "fp32",
    batch_size: int = 64,
) -> tuple[Path, bool]:
    """Compute (or load) the reference scores of the train and val splits for every view the
    data module builds, hand them to the data module's loaders and drop the module's reference.

    Returns (cache file, whether it was a cache hit).
    """
    splits = [s for s in (datamodule.train_split, datamodule.val_split) if s is not None]
    views = datamodule.views
    key = cache_key(model_id, dtype, datamodule, splits, views)
    path = Path(cache_dir) / f"{key}.pt"
    if torch.cuda.is_available():
        reference = reference.to("cuda")
    pad = datamodule.tokenizer.pad_token_id

    def compute() -> dict[str, Scores]:
        return {
            s: compute_scores(
                reference, datamodule.datasets[s], views, pad, batch_size, module.scoring
            )
            for s in splits
        }

    scores, hit = load_or_compute(path, compute)
    datamodule.reference_scores = scores
    module.reference = None  # freed: the scores travel in the batches
    return path, hit


# --------------------------------------------------------------------------- sync (TR-DPO)
@torch.no_grad()
def soft_update(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """reference ← α·policy + (1−α)·reference, parameter by parameter."""
    pol = dict(policy.named_parameters())
    for name, p in reference.named_parameters():
        p.mul_(1.0 - alpha).add_(pol[name].detach().to(p.dtype), alpha=alpha)


class ReferenceSync(L.Callback):
    """TR-DPO's soft update of the reference every ``every`` optimiser steps.

    Gorbatovski et al., "Learn Your Reference Model for Real Good Alignment", 2024. α = 1 is the
    hard update (the reference becomes the current policy). The update owed after step k·every
    is made right before the next step runs (:meth:`catch_up`), never after the last one: a
    validation after step k compares the policy with the reference step k trained with (an
    update first would compare the policy with itself: every margin 0). The last synced step
    is callback state, and the reference weights are kept in the checkpoint
    (``reference_in_checkpoint``), so a resumed run makes the same updates.
    """

    def __init__(self, every: int, alpha: float = 0.5) -> None:
        if every < 1:
            raise ValueError(f"reference.sync_every must be >= 1, got {every}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"reference.sync_alpha must be in (0, 1], got {alpha}")
        self.every, self.alpha = int(every), float(alpha)
        self.last_synced = 0

    def catch_up(self, steps_done: int, pl_module: Any) -> None:
        """Make the update owed once ``steps_done`` optimiser steps are done, before the next
        step (or the batch it trains on: the iterative loop scores a round's samples with the
        reference its steps train with) uses the reference."""
        if steps_done > self.last_synced and steps_done % self.every == 0:
            soft_update(pl_module.reference, pl_module.policy, self.alpha)
            self.last_synced = steps_done

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.catch_up(trainer.global_step, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"last_synced": self.last_synced}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_synced = int(state_dict.get("last_synced", 0))


# --------------------------------------------------------------------------- wiring
def reference_callbacks(reference: ReferenceConfig) -> list[L.Callback]:
    """The Lightning callbacks a reference kind needs (``sync``: :class:`ReferenceSync`)."""
    if reference.kind is ReferenceKind.sync:
        return [ReferenceSync(reference.sync_every, reference.sync_alpha)]
    return []


def prepare_reference(
    module: Any,
    datamodule: Any,
    reference: ReferenceConfig,
    model: ModelConfig,
    cache_dir: str | Path,
) -> None:
    """For ``reference=precomputed``: fill the data module with the cached (or freshly computed)
    reference scores and free the module's reference model. A no-op for other kinds."""
    if reference.kind is not ReferenceKind.precomputed or module.reference is None:
        return
    name = reference.name_or_path or model.name_or_path
    path, hit = precompute_reference(
        module,
        module.reference,
        datamodule,
        Path(cache_dir) / "reference",
        model_id=model_fingerprint(module.reference, name),
        dtype=str(reference.dtype or model.dtype),
        batch_size=reference.batch_size or datamodule.data.eval_batch_size,
    )
    print(f"reference scores: {'reused' if hit else 'computed and cached in'} {path}")
