"""Reward models: a causal LM with a scalar head on its last token, r(x, y).

A reward model is an ordinary ``AutoModelForSequenceClassification`` with one label, built from
any causal-LM checkpoint (the decoder's weights, a new linear head) or, with no path, from the
embedded tiny model's config. It saves with ``save_pretrained`` and loads back as it is, which
is what ``judge=reward_model`` and ``eval.scorer`` do.

Where the reward is read is the transformers rule for sequence classifiers: the rightmost token
that is not the pad token. With pad ≠ EOS that is the EOS the encoder appends; with pad = EOS (a
common choice when a tokenizer has no pad token), the token before it. :func:`score_rewards`
reads it there too, padded or packed, so training and every later use of the saved model
agree.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import Tensor
from transformers import (
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from inspo.models.load import (
    DTYPES,
    checkpoint_path,
    enable_checkpointing,
    pretrained_kwargs,
    tiny_llama,
    turn_off_dropout,
)
from inspo.models.packed_attention import PackingUnsupported
from inspo.models.packing import shared_contexts
from inspo.models.scoring import Scoring, TokenCount, _refuse, forward, packed, packed_forward
from inspo.settings import ModelConfig, SettingError


def load_reward_model(
    m: ModelConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
    cache_dir: str | None = None,
) -> PreTrainedModel:
    """A one-label sequence classifier of the ``model`` settings: ``tiny_llama(**m.tiny)``'s
    architecture when no path is given, else ``AutoModelForSequenceClassification
    .from_pretrained`` (a causal-LM checkpoint gets a new head, initialised from the seeded RNG;
    a reward model loads as it is; a GGUF file's converted checkpoint is read from
    ``cache_dir``). The pad token id is the tokenizer's."""
    if m.lora is not None:
        raise SettingError("model.lora", "a reward model trains all its weights (set it null)")
    if m.is_tiny:
        model = tiny_llama(tokenizer, num_labels=1, **asdict(m.tiny)).to(DTYPES[m.dtype])
        if m.attn_implementation:
            model.set_attn_implementation(m.attn_implementation)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            checkpoint_path(m, cache_dir), num_labels=1, **pretrained_kwargs(m)
        )
    if tokenizer is not None:
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
    if m.disable_dropout:
        turn_off_dropout(model)
    if m.gradient_checkpointing:
        enable_checkpointing(model)
    return model


def reward_positions(input_ids: Tensor, pad_id: int | None) -> Tensor:
    """Per row [N], the column whose hidden state gives the reward: the rightmost token that is
    not ``pad_id`` (as transformers' sequence classifiers read it)."""
    if pad_id is None:
        raise ValueError("a reward model needs config.pad_token_id to find each row's last token")
    columns = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (columns * (input_ids != pad_id)).argmax(-1)


def split_score_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(decoder, head) when the model's reward is ``head(decoder(...))`` at the last token (the
    transformers layout ``base_model_prefix`` + ``score``); None otherwise (other layouts, FSDP
    roots, whose parameters only their own forward gathers)."""
    if type(model).__name__.startswith("FSDP"):
        return None
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear) or not isinstance(decoder, torch.nn.Module):
        return None
    return (decoder, head) if decoder is not model else None


def score_rewards(
    model: torch.nn.Module, view: dict[str, Tensor], how: Scoring | None = None
) -> tuple[Tensor, TokenCount]:
    """The reward of every row of a right-padded view [N] (float32 at least) and what computing
    them ran through the model. ``how.packing``: the rows as one sequence without padding, a
    pair's shared context once (:mod:`inspo.models.packing`), its attention computed by
    ``how.packing_kernel``; the same numbers as the padded forward, which is
    ``model(input_ids, attention_mask).logits[:, 0]``. None: padded."""
    how = how or Scoring()
    ids, att = view["input_ids"], view["attention_mask"]
    last = reward_positions(ids, model.config.get_text_config().pad_token_id)
    rows = torch.arange(ids.shape[0], device=ids.device)
    padded = TokenCount(torch.tensor(ids.numel(), device=ids.device), att.sum())
    parts = split_score_head(model)
    if parts is None:
        logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits
        return _float(logits[:, 0]), padded
    decoder, head = parts
    if packed(model, how):
        try:
            return _packed_rewards(model, decoder, head, view, last, how)
        except PackingUnsupported as e:  # found during the forward: scored padded from now on
            _refuse(model, str(e))
    hidden = forward(decoder, view, output="last_hidden_state")[rows, last]
    return _float(head(hidden)[:, 0]), padded


def _packed_rewards(
    model: torch.nn.Module,
    decoder: torch.nn.Module,
    head: torch.nn.Linear,
    view: dict[str, Tensor],
    last: Tensor,
    how: Scoring,
) -> tuple[Tensor, TokenCount]:
    ids = view["input_ids"]
    out, pack = packed_forward(model, decoder, view, shared_contexts(view), how)
    rows = torch.arange(ids.shape[0], device=ids.device)
    hidden = out.last_hidden_state[0][pack.index[rows, last]]
    real = torch.tensor(pack.tokens, device=ids.device)
    return _float(head(hidden)[:, 0]), TokenCount(real, real)


def _float(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
