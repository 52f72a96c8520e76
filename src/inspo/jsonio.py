"""Writing JSON: one function for every file a run writes (summaries, reports, rounds,
evaluations), one for every line of a JSON Lines file.

Strict JSON: NaN and ±inf become null (Python's ``json`` would write ``NaN``, which other
readers refuse), and values JSON has no type for (paths) are written as strings. Files are
written atomically: to a temporary name, then renamed into place, so a reader, or a run killed
while writing, never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def jsonable(value: Any) -> Any:
    """``value`` with every non-finite float as None (dicts, lists and tuples walked)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def dumps(value: Any, indent: int | None = 2) -> str:
    return json.dumps(jsonable(value), indent=indent, allow_nan=False, default=str)


def write_json(path: str | Path, value: Any) -> None:
    """``value`` as indented, strict JSON at ``path``, written atomically."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(dumps(value) + "\n")
    os.replace(tmp, path)


def json_line(value: Any) -> str:
    """One line of a JSON Lines file (strict, as :func:`write_json`), with its newline."""
    return dumps(value, indent=None) + "\n"
