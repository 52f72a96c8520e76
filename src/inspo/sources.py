"""Where preference rows come from. Each source is a callable returning ``{split: rows}``.

A row is a mapping with at least ``prompt``, ``chosen`` and ``rejected`` (strings). Sources are
picked in ``conf/data/*.yaml`` by ``source._target_``, so a new source is a function anywhere on
the Python path.
"""

from __future__ import annotations

from typing import Any

from inspo.synthetic import SyntheticConfig, make_splits


def synthetic(**kwargs: Any) -> dict[str, list[dict]]:
    """The embedded task (``inspo.synthetic``): splits ``sft``, ``train``, ``val``, ``eval``."""
    return make_splits(SyntheticConfig(**kwargs))
