"""Cache keys: one hash of any JSON-serialisable parts (what changes the cached result)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def fingerprint(*parts: Any) -> str:
    """SHA-256 of the parts, each as sorted-key JSON (non-JSON values by ``str``)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()
