"""Where preference rows come from. Each source is a callable returning ``{split: rows}``.

A row is a mapping with ``chosen`` and ``rejected`` and, unless the prompt is implicit, ``prompt``
(strings, or message lists for conversational data; :mod:`inspo.data.rows` turns every layout
into text). Sources are picked in ``conf/data/*.yaml`` by ``source._target_``, so a new source
is a function anywhere on the Python path.

:func:`preference_data` reads local JSON Lines / JSON / Parquet / CSV files, a
``Dataset.save_to_disk`` folder, or a Hub dataset name, always through ``datasets``. Rows that
cannot be read at all (a malformed JSON line, bytes that are not UTF-8, a line that is not an
object, a value of the wrong type) are not dropped: they come back as *error rows*
``{"row_id": "file:line", "_error": reason}`` so that the data module counts them in the data
report under their reason.
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from inspo.data.report import DataError
from inspo.data.synthetic import SyntheticConfig, make_splits
from inspo.names import ERROR, MARGIN_COLUMN
from inspo.settings import DataConfig, SettingError, require_values

log = logging.getLogger(__name__)

LINE_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".jsonl.bz2")
BUILDERS = {".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}


def source_of(data: DataConfig) -> Callable[[], dict[str, Sequence[dict]]]:
    """The rows source of the ``data`` settings: its ``source`` config (a ``_target_`` and
    its arguments) as a callable, built, not yet called."""
    from hydra.utils import instantiate

    if not data.source:
        raise SettingError("data.source", "needs a _target_ that returns {split: rows}")
    require_values(data.source, "data.source")
    return instantiate(data.source, _partial_=True)


def synthetic(**kwargs: Any) -> dict[str, list[dict]]:
    """The embedded task (:mod:`inspo.data.synthetic`): splits sft, train, val, eval."""
    return make_splits(SyntheticConfig(**kwargs))


# --------------------------------------------------------------------------- readers
def read_json_lines(path: str | Path) -> tuple[list[dict], list[dict]]:
    """Parse a (possibly gzipped) JSON Lines file line by line.

    Returns ``(good, errors)``: good rows carry ``row_id = "name:line"`` (1-based), and every
    line that cannot be used becomes an error row with reason ``invalid_utf8``,
    ``malformed_json`` or ``not_a_mapping``. Blank lines are not rows and are not counted.
    """
    path = Path(path)
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix, open)
    good: list[dict] = []
    errors: list[dict] = []
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            row_id = f"{path.name}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                errors.append({"row_id": row_id, ERROR: "invalid_utf8"})
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                errors.append({"row_id": row_id, ERROR: "malformed_json"})
                continue
            if not isinstance(obj, dict):
                errors.append({"row_id": row_id, ERROR: "not_a_mapping"})
                continue
            good.append({**obj, "row_id": row_id})
    return good, errors


def _is_line_file(path: str) -> bool:
    return path.lower().endswith(LINE_SUFFIXES)


def _builder(path: str) -> str | None:
    p = path.lower().removesuffix(".gz").removesuffix(".bz2")
    return next((b for s, b in BUILDERS.items() if p.endswith(s)), None)


def _looks_local(path: str) -> bool:
    """A path-like string (not a Hub name such as ``org/name``)."""
    return path.startswith((".", "/", "~")) or _builder(path) is not None or _is_line_file(path)


def _load_hub(name: str, config_name: str | None, revision: str | None) -> DatasetDict:
    try:
        ds = load_dataset(name, config_name, revision=revision)
    except (ConnectionError, OSError, TimeoutError) as e:  # offline, DNS, HF_HUB_OFFLINE=1
        raise DataError(
            f"could not reach the Hub for dataset {name!r}; pass a local path "
            f"(data.source.path=/path/to/file.jsonl or a save_to_disk folder) [{type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}]"
        ) from e
    except Exception as e:  # datasets raises its own errors when offline (e.g. DatasetNotFound)
        msg = str(e)
        if "offline" in msg.lower() or "connect" in msg.lower() or "resolve" in msg.lower():
            raise DataError(
                f"could not reach the Hub for dataset {name!r}; pass a local path ({msg})"
            ) from e
        raise
    return ds if isinstance(ds, DatasetDict) else DatasetDict({"train": ds})


def load_raw(
    path: str | Mapping[str, str],
    config_name: str | None = None,
    revision: str | None = None,
) -> dict[str, tuple[Sequence[dict] | Dataset, list[dict]]]:
    """``{split: (rows, error_rows)}`` from a file, a ``{split: file}`` mapping, a
    ``save_to_disk`` folder or a Hub name. A single file is the split ``train``."""
    if isinstance(path, Mapping):
        out: dict[str, tuple[Any, list[dict]]] = {}
        for split, p in path.items():
            loaded = load_raw(str(p), config_name, revision)
            if len(loaded) != 1:
                raise DataError(f"data file for split {split!r} holds several splits: {p}")
            out[split] = next(iter(loaded.values()))
        return out
    path = str(path)
    local = Path(path).expanduser()
    if local.is_dir():
        try:
            ds = load_from_disk(str(local))
        except FileNotFoundError as e:
            raise DataError(f"{local} is a folder but not a Dataset.save_to_disk folder") from e
        ds = ds if isinstance(ds, DatasetDict) else DatasetDict({"train": ds})
        return {split: (d, []) for split, d in ds.items()}
    if local.is_file():
        if _is_line_file(path):
            good, errors = read_json_lines(local)
            return {"train": (good, errors)}
        builder = _builder(path)
        if builder is None:
            raise DataError(
                f"unknown data file type: {local} (use .jsonl, .json, .parquet, .csv, or a folder)"
            )
        try:
            ds = load_dataset(builder, data_files=str(local), split="train")
        except Exception as e:
            if builder == "json":  # maybe JSON Lines with bad lines: read them one by one
                good, errors = read_json_lines(local)
                if good or errors:
                    return {"train": (good, errors)}
            raise DataError(f"could not read {local} as {builder}: {e}") from e
        return {"train": (ds, [])}
    if _looks_local(path):
        raise DataError(f"data file not found: {local} (cwd {Path.cwd()})")
    ds = _load_hub(path, config_name, revision)
    return {split: (d, []) for split, d in ds.items()}


# --------------------------------------------------------------------------- columns
def _columns(rows: Sequence[dict] | Dataset) -> set[str]:
    if isinstance(rows, Dataset):
        return set(rows.column_names)
    cols: set[str] = set()
    for r in rows[:1000]:
        cols |= set(r)
    return cols


def select_columns(
    rows: Sequence[dict] | Dataset,
    keys: Mapping[str, str | None],
    source_name: str,
) -> list[dict]:
    """Rename the mapped columns to prompt/chosen/rejected and keep ``row_id`` (and ``margin``,
    a reward model's per-pair margin, when the data has that column).

        A chosen/rejected column that no row has, or an explicitly mapped prompt column
        (``prompt_key`` other than ``prompt``) that no row has, is a start-up :class:`DataError`
        naming the expected and found columns. An absent ``prompt`` column means the prompt is
        implicit in the dialogues (HH-RLHF). Value types are checked per row later
        (:mod:`inspo.data.rows`), so one bad row never fails the whole file.
    """
    found = _columns(rows)
    needed = {k: v for k, v in keys.items() if v}
    missing = [v for k, v in needed.items() if v not in found and (k != "prompt" or v != "prompt")]
    if missing:
        raise DataError(
            f"{source_name}: missing column(s) {missing}; expected "
            f"{sorted(needed.values())}, found {sorted(found)}. Map them with "
            "data.source.prompt_key / chosen_key / rejected_key."
        )
    mapping = {k: v for k, v in needed.items() if v in found}
    is_ds = isinstance(rows, Dataset)
    out: list[dict] = []
    for i, r in enumerate(rows):
        row = {k: r.get(v) for k, v in mapping.items()}
        row["row_id"] = i if is_ds else r.get("row_id", i)
        if MARGIN_COLUMN in found and MARGIN_COLUMN in r:
            row[MARGIN_COLUMN] = r[MARGIN_COLUMN]
        out.append(row)
    return out


def _hold_out(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split rows into (train, held-out) by a seeded permutation, keeping file order within."""
    import random

    n_out = round(len(rows) * fraction)
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    held = set(idx[:n_out])
    return [r for i, r in enumerate(rows) if i not in held], [
        r for i, r in enumerate(rows) if i in held
    ]


def _part(rows: list[dict], parts: int, part: int, seed: int) -> list[dict]:
    """Part ``part`` of ``rows`` cut into ``parts`` seeded parts of (nearly) equal size, in
    file order."""
    import random

    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    kept = set(idx[part::parts])
    return [r for i, r in enumerate(rows) if i in kept]


def preference_data(
    path: str | Mapping[str, str],
    splits: Mapping[str, str] | None = None,
    prompt_key: str | None = "prompt",
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
    val_fraction: float = 0.0,
    val_split: str = "val",
    train_split: str = "train",
    seed: int = 0,
    config_name: str | None = None,
    revision: str | None = None,
    swap_held_out: bool = False,
    train_parts: int = 1,
    train_part: int = 0,
) -> dict[str, list[dict]]:
    """Preference rows from a local file/folder or a Hub dataset, as ``{split: rows}``.

    Args:
        path: a file (``.jsonl[.gz]``, ``.json``, ``.parquet``, ``.csv``), a ``{split: file}``
            mapping, a ``Dataset.save_to_disk`` folder, or a Hub dataset name.
        splits: our split name → the data's split name, e.g. ``{train: train_prefs,
            val: test_prefs}``; by default every split of the data under its own name.
        prompt_key, chosen_key, rejected_key: the data's column names. A missing prompt
            column (or ``prompt_key: null``) means the prompt is implicit in the dialogues.
        val_fraction: when the data has no ``val_split``, hold this fraction of the train
            split out as ``val_split``, drawn with ``seed``. ``swap_held_out``: train on the
            held-out rows and validate on the rest (a second model, e.g. a second reward model,
            on the other part of the same rows).
        train_parts, train_part: cut the train split (what is left of it after the hold-out)
            into ``train_parts`` seeded parts of equal size and keep part ``train_part``:
            models trained on different parts share no row, and all validate on the same
            held-out rows (two reward models, one to train against and one to judge with).
    """
    if train_parts < 1:
        raise SettingError("data.source.train_parts", f"must be at least 1, got {train_parts}")
    if not 0 <= train_part < train_parts:
        raise SettingError(
            "data.source.train_part", f"must lie in [0, {train_parts - 1}], got {train_part}"
        )
    raw = load_raw(path, config_name, revision)
    if splits:
        absent = [s for s in splits.values() if s not in raw]
        if absent:
            raise DataError(f"split(s) {absent} not in {path}; found {sorted(raw)}")
        raw = {ours: raw[theirs] for ours, theirs in splits.items()}
    keys = {"prompt": prompt_key, "chosen": chosen_key, "rejected": rejected_key}
    out: dict[str, list[dict]] = {}
    for split, (rows, errors) in raw.items():
        name = f"{path}[{split}]"
        out[split] = select_columns(rows, keys, name) + list(errors)
    if val_split not in out and val_fraction > 0:
        if train_split not in out:
            raise DataError(
                f"no {train_split!r} split to hold {val_split!r} out of; found {sorted(out)}"
            )
        out[train_split], out[val_split] = _hold_out(out[train_split], val_fraction, seed)
        if swap_held_out:
            out[train_split], out[val_split] = out[val_split], out[train_split]
        log.info(
            "held out %d of the %s rows as %r (fraction %.3g, seed %d)",
            len(out[val_split]),
            train_split,
            val_split,
            val_fraction,
            seed,
        )
    if train_parts > 1 and train_split in out:
        n = len(out[train_split])
        out[train_split] = _part(out[train_split], train_parts, train_part, seed)
        log.info(
            "kept part %d of %d of the %s rows: %d of %d",
            train_part,
            train_parts,
            train_split,
            len(out[train_split]),
            n,
        )
    return out
