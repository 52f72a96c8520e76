"""What every entry point sets before it starts work."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only setting")
def test_cpu_matmuls_stay_full_fp32():
    """Without CUDA, setup() must not switch oneDNN's fp32 matmuls to TF32 (a reduced
    precision on CPUs that have it, which changes results between machines)."""
    code = (
        "import torch; from inspo import runtime; runtime.setup(); "
        "print(torch.backends.mkldnn.matmul.fp32_precision)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() in ("none", "ieee")
