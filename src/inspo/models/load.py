"""Policies, references and tokenizers: the embedded tiny model and anything from_pretrained.

:func:`load_model` builds the policy of the ``model`` settings
(:class:`~inspo.settings.ModelConfig`); :func:`load_policy` loads a saved checkpoint. The
embedded default (``model=tiny``) is a small Llama with random weights and a byte-level
tokenizer built in memory, so the whole pipeline runs with no downloads. Both save with
``save_pretrained`` and load back with the ``Auto*`` classes, so a trained tiny policy is an
ordinary Hugging Face checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from inspo.names import Dtype
from inspo.settings import LoraConfig, ModelConfig, TinyConfig

log = logging.getLogger(__name__)

DTYPES = {Dtype.fp32: torch.float32, Dtype.bf16: torch.bfloat16, Dtype.fp16: torch.float16}
BYTE_SPECIALS = ("<pad>", "<s>", "</s>")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: token id = byte value (0–255), then <pad>, <s>, </s>.

    Built from the ``tokenizers`` library with no files; ``save_pretrained`` writes an
    ordinary ``tokenizer.json`` that ``AutoTokenizer`` loads.
    """
    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    for i, tok in enumerate(BYTE_SPECIALS):
        vocab[tok] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.padding_side = "right"
    return fast


def tiny_llama(
    tokenizer: PreTrainedTokenizerBase | None = None,
    num_labels: int | None = None,
    **sizes: Any,
) -> LlamaForCausalLM | LlamaForSequenceClassification:
    """A random-init Llama sized for CPU experiments: 3.2 M parameters by default, 0.8 M at
    ``hidden_size=128`` (the demo's). ``sizes``: fields of :class:`~inspo.settings.TinyConfig`
    (its defaults and checks; ``seed`` None is 0). With ``num_labels``, the same decoder as a
    sequence classifier (a reward model's head)."""
    t = TinyConfig(**sizes)
    hidden_size = t.hidden_size
    cfg = LlamaConfig(
        vocab_size=t.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=t.intermediate_size or int(hidden_size * 8 / 3 // 8 * 8),
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_heads,
        max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=True,
    )
    if tokenizer is not None:
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.bos_token_id = tokenizer.bos_token_id
        cfg.eos_token_id = tokenizer.eos_token_id
    if num_labels is not None:
        cfg.num_labels = num_labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed or 0)
        return LlamaForCausalLM(cfg) if num_labels is None else LlamaForSequenceClassification(cfg)


def load_tokenizer(name_or_path: str | None, **kwargs: Any) -> PreTrainedTokenizerBase:
    """The byte tokenizer when ``name_or_path`` is None, else ``AutoTokenizer.from_pretrained``.

    A missing pad token is set to EOS (the usual choice for causal LMs); padding is on the right
    for training, and generation code switches to the left where it needs to.
    """
    if name_or_path is None:
        return byte_tokenizer()
    tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Activation checkpointing: recompute each layer's activations in backward (memory for
    time). transformers ≥ 5.2 renamed gradient_checkpointing_* to activation_checkpointing_*."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()
    model.config.use_cache = False


def turn_off_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Turn every dropout off, as TRL does by default: ``nn.Dropout`` modules, and the float
    rates that attention modules read at call time (``attention_dropout`` in Llama, Qwen2,
    Mistral, Gemma, ...), which ``nn.Dropout``-only code misses; the config too, so that
    copies and saved checkpoints agree. With dropout on, the margin at step 0 is noise and two
    forward passes of one batch disagree."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for name, value in config.to_dict().items():
            if ("dropout" in name or name.endswith("pdrop")) and isinstance(value, float):
                setattr(config, name, 0.0)
    return model


def load_model(m: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """The policy of ``model`` settings: ``tiny_llama(**m.tiny)`` when no path is given, else
    ``from_pretrained``; dropout off unless ``m.disable_dropout`` is false (see
    :func:`turn_off_dropout`), activation checkpointing and a LoRA adapter when asked."""
    dtype = DTYPES[m.dtype]
    if m.name_or_path is None:
        model = tiny_llama(tokenizer, **dataclasses.asdict(m.tiny)).to(dtype)
        if m.attn_implementation:
            model.set_attn_implementation(m.attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(m.name_or_path, **pretrained_kwargs(m))
    if m.disable_dropout:
        turn_off_dropout(model)
    if m.gradient_checkpointing:
        enable_checkpointing(model)
    if m.lora is not None:
        model = add_lora(model, m.lora)
    return model


def load_policy(path: str, **settings: Any) -> PreTrainedModel:
    """A saved checkpoint (a run's ``policy/``, a Hub id) with the defaults of
    :class:`~inspo.settings.ModelConfig`, or the given ones (``dtype=...``, ...)."""
    return load_model(ModelConfig(name_or_path=str(path), tiny=None, **settings))


def pretrained_kwargs(m: ModelConfig) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments of the ``model`` settings."""
    kwargs: dict[str, Any] = {"dtype": DTYPES[m.dtype], "trust_remote_code": m.trust_remote_code}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    return kwargs


def add_lora(model: PreTrainedModel, lora: LoraConfig) -> PreTrainedModel:
    """Wrap ``model`` with a LoRA adapter (the ``peft`` extra); only the adapter trains.

    With ``reference=adapter_disabled`` the reference is this same model with the adapter off.
    """
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("model.lora needs peft: pip install 'inspo[peft]'") from e
    cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A frozen reference: a deep copy in eval mode with ``requires_grad=False``."""
    ref = copy.deepcopy(model)
    return freeze(ref)


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
