"""Reference kinds beyond a frozen model: ``auto``, ``precomputed`` (a disk cache) and ``sync``.

``reference=`` in the config picks one of (see ``conf/reference/``):

    policy_init  a frozen copy of the initial policy (default)
    model        another model, ``reference.name_or_path``
    none         reference-free: no reference model, reference scores are 0
    auto         ``none`` if the objective is reference-free, else ``policy_init`` (resolved at
                 start-up; summary.json and the tags record the resolved kind). Lets one sweep
                 mix reference-free and reference-based objectives.
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

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, open_dict
from torch import Tensor
from torch.utils.data import DataLoader

from inspo.data.encode import PreferenceCollator, tokenizer_fingerprint

log = logging.getLogger(__name__)

KINDS = ("policy_init", "model", "none", "auto", "precomputed", "sync")
FIELDS = ("chosen", "rejected", "chosen_length", "rejected_length")
#: Above this many parameters, a model is identified by name, commit and config, not by hashing.
HASH_WEIGHTS_MAX_PARAMS = 200_000_000

Scores = dict[str, dict[str, Tensor]]  # view -> field -> [N] (indexed by the row's ``index``)


# --------------------------------------------------------------------------- auto
def resolve_auto(cfg: DictConfig, objective: Any) -> None:
    """``reference=auto`` → ``none`` for reference-free objectives, else ``policy_init``."""
    if cfg.reference.kind != "auto":
        return
    with open_dict(cfg):
        cfg.reference.kind = "policy_init" if objective.requires_reference else "none"


# --------------------------------------------------------------------------- keys
def _sha(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


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
    return "named:" + _sha(
        name_or_path,
        getattr(config, "_commit_hash", None),
        config.to_dict() if config is not None else None,
        files,
    )


def dataset_fingerprint(dataset: Any, views: Sequence[str]) -> str:
    """Hash of the tokenised sequences (and their response starts) of the given views."""
    cols = ["index"] + [
        f"{v}_{side}{suffix}" for v in views for side in ("chosen", "rejected")
        for suffix in ("", "_start")
    ]  # fmt: skip
    return _sha(*[dataset[c] for c in cols])


def cache_key(
    model_id: str, dtype: str, datamodule: Any, splits: Sequence[str], views: Sequence[str]
) -> str:
    """The cache key: model, dtype, tokenizer, template, max lengths, views and rows."""
    enc = datamodule.encoder
    return _sha(
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
    score_view: Callable, model: torch.nn.Module, dataset: Any, views: Sequence[str],
    pad_id: int, batch_size: int,
) -> Scores:  # fmt: skip
    """Score every row of ``dataset`` in every view with ``score_view(model, view_batch)``
    (``PreferenceModule.score_view``, so the values are computed as in training)."""
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(
        dataset, batch_size=batch_size, collate_fn=PreferenceCollator(pad_id, tuple(views))
    )
    n = len(dataset)
    out: Scores = {
        v: {f: torch.zeros(n, dtype=torch.long if "length" in f else torch.float32) for f in FIELDS}
        for v in views
    }
    for batch in loader:
        idx = batch["index"]
        for v in views:
            s, _ = score_view(model, {k: t.to(device) for k, t in batch[v].items()})
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
                module.score_view, reference, datamodule.datasets[s], views, pad, batch_size
            )
            for s in splits
        }

    scores, hit = load_or_compute(path, compute)
    datamodule.reference_scores = scores
    module.reference = None  # freed: the scores travel in the batches
    return path, hit


@dataclass
class WithReferenceScores:
    """Wraps a collator: adds ``batch["reference_scores"][view][field]`` looked up by ``index``."""

    collate: Callable[[Sequence[dict]], dict[str, Any]]
    scores: Scores

    def __call__(self, rows: Sequence[dict]) -> dict[str, Any]:
        batch = self.collate(rows)
        idx = batch["index"]
        batch["reference_scores"] = {
            v: {f: t[idx] for f, t in fields.items()} for v, fields in self.scores.items()
        }
        return batch


# --------------------------------------------------------------------------- sync (TR-DPO)
@torch.no_grad()
def soft_update(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """reference ← α·policy + (1−α)·reference, parameter by parameter."""
    pol = dict(policy.named_parameters())
    for name, p in reference.named_parameters():
        p.mul_(1.0 - alpha).add_(pol[name].detach().to(p.dtype), alpha=alpha)


class ReferenceSync(L.Callback):
    """TR-DPO's soft update of the reference after every ``every``-th optimiser step.

    Gorbatovski et al., "Learn Your Reference Model for Real Good Alignment", 2024. α = 1 is the
    hard update (the reference becomes the current policy). The last synced step is callback
    state, and the reference weights are kept in the checkpoint (``reference_in_checkpoint``).
    """

    def __init__(self, every: int, alpha: float = 0.5) -> None:
        if every < 1:
            raise ValueError(f"reference.sync_every must be >= 1, got {every}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"reference.sync_alpha must be in (0, 1], got {alpha}")
        self.every, self.alpha = int(every), float(alpha)
        self.last_synced = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimiser steps done (accumulation-aware)
        if step > self.last_synced and step % self.every == 0:
            soft_update(pl_module.reference, pl_module.policy, self.alpha)
            self.last_synced = step

    def state_dict(self) -> dict[str, Any]:
        return {"last_synced": self.last_synced}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_synced = int(state_dict.get("last_synced", 0))


# --------------------------------------------------------------------------- wiring (train.py)
def reference_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The Lightning callbacks a reference kind needs (``sync``: :class:`ReferenceSync`)."""
    r = cfg.reference
    if r.kind == "sync":
        return [ReferenceSync(r.sync_every, r.sync_alpha)]
    return []


def prepare_reference(cfg: DictConfig, module: Any, datamodule: Any) -> None:
    """For ``reference=precomputed``: fill the data module with the cached (or freshly computed)
    reference scores and free the module's reference model. A no-op for other kinds."""
    r = cfg.reference
    if r.kind != "precomputed" or module.reference is None:
        return
    name = r.get("name_or_path") or cfg.model.name_or_path
    path, hit = precompute_reference(
        module,
        module.reference,
        datamodule,
        Path(cfg.paths.cache_dir) / "reference",
        model_id=model_fingerprint(module.reference, name),
        dtype=str(r.get("dtype", cfg.model.dtype)),
        batch_size=int(r.get("batch_size", 64)),
    )
    print(f"reference scores: {'reused' if hit else 'computed and cached in'} {path}")
