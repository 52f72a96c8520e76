"""Where transformers' API moved between the releases inspo is tested on, found from the
installed library's public objects rather than assumed.

- The KV cache keyword of a model's ``forward``: ``past_key_values`` up to 5.2x, ``cache`` from
  the release that deprecated the old name (it is removed in 5.40).
- The eager attention function an attention module falls back to: the module-level
  ``eager_attention_forward`` of the file that defines the module's class (read from that
  module, not from a method's globals, which a decorator may have replaced).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from functools import cache
from typing import Any

import torch


def cache_kwargs(model: torch.nn.Module, cache_object: Any) -> dict[str, Any]:
    """``{name: cache_object}`` under the cache keyword ``model.forward`` takes."""
    return {cache_keyword(type(_unwrapped(model))): cache_object}


@cache
def cache_keyword(cls: type) -> str:
    """``cache`` where the model class's ``forward`` names it, else ``past_key_values``."""
    parameters = inspect.signature(inspect.unwrap(cls.forward)).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (whose forward takes ``**kwargs``)."""
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model


def eager_attention(module: torch.nn.Module) -> Callable | None:
    """The ``eager_attention_forward`` of the file defining ``module``'s class, or None."""
    for cls in type(module).__mro__:
        found = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if callable(found):
            return found
    return None
