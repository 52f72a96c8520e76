"""transformers' moving parts, found from the installed library: the KV cache keyword of a
model's forward (``past_key_values`` before 5.2x's rename, ``cache`` after) and the eager
attention function of an attention module, also when a decorator wraps its forward."""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import types
import warnings

import torch
from test_packing import batch, tiny

from inspo.models.hf_compat import cache_keyword, cache_kwargs, eager_attention
from inspo.models.scoring import Scoring, prepare_packing, score_pairs


def test_the_cache_keyword_is_the_one_the_forward_takes(tokenizer):
    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, **kwargs): ...

    def renamed(fn):  # as transformers' deprecate_kwarg wraps a forward
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)

        return wrapper

    New.forward = renamed(New.forward)
    assert cache_keyword(Old) == "past_key_values"
    assert cache_keyword(New) == "cache"
    # The installed model takes the keyword, and shared-prompt scoring passes no deprecated one.
    model = tiny("llama", tokenizer)
    (name,) = cache_kwargs(model, None)
    assert name in inspect.signature(inspect.unwrap(type(model).forward)).parameters
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        score_pairs(model, batch(tokenizer)["plain"], Scoring(share_prompt=True))


def test_eager_attention_is_found_under_a_decorated_forward(tokenizer):
    model = tiny("llama", tokenizer, "eager")
    attention = model.model.layers[0].self_attn
    module = sys.modules[type(attention).__module__]
    assert eager_attention(attention) is module.eager_attention_forward
    # A forward wrapped by a decorator defined elsewhere: its __globals__ are the decorator's.
    wrapped = type("Wrapped", (type(attention),), {})
    wrapped.forward = functools.wraps(type(attention).forward)(lambda *a, **k: None)
    assert "eager_attention_forward" not in wrapped.forward.__globals__
    assert eager_attention(wrapped.__new__(wrapped)) is module.eager_attention_forward


def test_a_model_without_an_eager_function_is_scored_padded(tokenizer, caplog, monkeypatch):
    """No ``eager_attention_forward`` where the model is defined: packing falls back to the
    padded batch with its one warning, never a KeyError mid-training."""
    model = tiny("llama", tokenizer, "eager")
    view = batch(tokenizer)["plain"]
    want = score_pairs(model, view, Scoring())[0].chosen
    defining = sys.modules[type(model).__module__]
    stripped = types.ModuleType(defining.__name__)
    stripped.__dict__.update(
        {k: v for k, v in vars(defining).items() if k != "eager_attention_forward"}
    )
    monkeypatch.setitem(sys.modules, defining.__name__, stripped)
    with caplog.at_level(logging.WARNING, logger="inspo.models.scoring"):
        assert not prepare_packing(model)
        got = score_pairs(model, view, Scoring(packing=True))[0]
    torch.testing.assert_close(got.chosen, want)
    assert int(got.tokens.computed) > int(got.tokens.real)  # padding was computed
    assert "no eager_attention_forward" in caplog.text
    assert model.config._attn_implementation == "eager"
