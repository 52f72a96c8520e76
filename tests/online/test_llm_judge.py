"""The LLM judge: both orders and ties, the answer tokens' probabilities, the local backend's
batching, the endpoint's concurrency, timeouts, retries and failures, and a failing endpoint in
the loop (the round fails naming the judge and the round; the resumed run continues).
Agreement with a real model behind a real server: test_llm_judge_server.py."""

from __future__ import annotations

import math

import pytest
import torch
from fake_openai import FakeOpenAI
from hydra.utils import instantiate
from test_rounds import ITER, stop_after

from inspo.config import compose_config
from inspo.models.load import byte_tokenizer, tiny_llama
from inspo.online import run as online_run
from inspo.online.judges import Group, JudgeError
from inspo.online.llm_judge import (
    LLM,
    Endpoint,
    EndpointError,
    LocalLM,
    _answer_logprob,
    verdict,
)

INF = math.inf


@pytest.fixture
def server():
    s = FakeOpenAI()
    yield s
    s.close()


# =========================================================================== the judge's logic
def test_verdict_needs_both_orders_to_agree():
    # (log P(A), log P(B)) with i shown first, then with j shown first
    assert verdict((-1, -2), (-2, -1)) == 1  # i preferred in both orders
    assert verdict((-2, -1), (-1, -2)) == -1  # j preferred in both orders
    assert verdict((-1, -2), (-1, -2)) == 0  # "A" both times: position bias, a tie
    assert verdict((-2, -1), (-2, -1)) == 0
    assert verdict((-1, -1), (-2, -1)) == 0  # undecided in one order
    assert verdict((-1, -INF), (-INF, -1)) == 1  # B absent from the candidates: below A
    assert verdict((-INF, -INF), (-2, -1)) == 0  # unreadable: a tie


def test_answer_probability_sums_the_tokens_that_read_as_it():
    candidates = [("A", math.log(0.5)), (" A", math.log(0.25)), ("B", math.log(0.1)), ("a", -1)]
    assert _answer_logprob(candidates, "A") == pytest.approx(math.log(0.75))
    assert _answer_logprob(candidates, "B") == pytest.approx(math.log(0.1))
    assert _answer_logprob(candidates, "C") == -INF


class ScriptedBackend:
    """Answers by a rule of the two responses shown; records what it was asked."""

    def __init__(self, rule):
        self.rule, self.asked = rule, []

    def answer_logprobs(self, conversations, answers):
        self.asked += conversations
        out = []
        for c in conversations:
            a, b = c[-1]["content"].split("[Response A]\n")[1].split("\n\n[Response B]\n")
            b = b.split("\n\nReply")[0]
            out.append(self.rule(a, b))
        return out


def test_each_pair_is_asked_in_both_orders_and_scored_by_copeland():
    longer = ScriptedBackend(lambda a, b: (-1.0, -2.0) if len(a) > len(b) else (-2.0, -1.0))
    groups = [Group("p", ["aaa", "a", "aa"], [True] * 3), Group("q", ["x", "yy"], [True] * 2)]
    judge = LLM(backend=longer, system="Be fair.")
    assert judge.judge(groups) == [[2.0, 0.0, 1.0], [0.0, 1.0]]
    assert len(longer.asked) == 2 * (3 + 1)
    shown = [(c[-1]["content"].count("aaa\n\n[Response B]"), c[0]["role"]) for c in longer.asked]
    assert shown[:2] == [(1, "system"), (0, "system")]  # (0, 1) asked as A/B, then B/A
    biased = ScriptedBackend(lambda a, b: (-1.0, -2.0))  # always "A": every pair ties
    assert LLM(backend=biased).judge(groups) == [[1.0, 1.0, 1.0], [0.5, 0.5]]


def test_a_judging_prompt_with_unknown_fields_is_refused():
    with pytest.raises(ValueError, match="only"):
        LLM(backend=ScriptedBackend(None), prompt="{prompt} {a} {c}")


# =========================================================================== local backend
@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("judge_model")
    tok = byte_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    tiny_llama(tokenizer=tok, hidden_size=32, num_layers=2, num_heads=2).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_local_backend_batches_as_it_scores_one_by_one(chat_model):
    """Left-padded batches of prompts of different lengths give each prompt's own next-token
    log-probs of "A" and "B" (the byte model: token ids 65 and 66)."""
    judge = LLM(backend=LocalLM(name_or_path=str(chat_model), batch_size=3))
    asked = [("hi", "x", "yyy"), ("a longer prompt here", "first answer", "b"), ("q", "", "z")]
    convs = [judge.conversation(p, a, b) for p, a, b in asked]
    got = judge.backend.answer_logprobs(convs, ("A", "B"))
    backend = judge.backend
    assert backend.answer_ids("A") == [65] and backend.answer_ids("B") == [66]
    for conv, row in zip(convs, got, strict=True):
        ids = torch.tensor([backend.encode([conv])[0]])
        with torch.no_grad():
            logp = torch.log_softmax(backend._model(input_ids=ids).logits[0, -1].float(), -1)
        assert row == pytest.approx([float(logp[65]), float(logp[66])], abs=1e-5)


def test_a_judge_model_without_a_chat_template_is_refused(tmp_path):
    tok = byte_tokenizer()
    tiny_llama(tokenizer=tok, hidden_size=32, num_layers=2, num_heads=2).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(JudgeError, match="no chat template"):
        LocalLM(name_or_path=str(tmp_path)).answer_logprobs([[{"role": "user", "content": ""}]], [])


# =========================================================================== endpoint
GROUPS = [Group("p", ["abc", "aa", "abcdef"], [True] * 3), Group("q", ["xy", "x"], [True] * 2)]


def endpoint(server, **kw):
    return Endpoint(base_url=server.url, model="fake", backoff=0.01, **kw)


def test_endpoint_judges_with_concurrent_requests(server):
    server.mode, server.delay = "hang", 0.2  # slow enough that requests overlap
    judge = LLM(backend=endpoint(server, concurrency=4))
    assert judge.judge(GROUPS) == [[1.0, 0.0, 2.0], [1.0, 0.0]]  # more distinct characters win
    assert server.requests == 2 * (3 + 1) and server.max_in_flight == 4


def test_endpoint_retries_a_server_error_then_succeeds(server):
    server.mode, server.failures = "status", 2
    assert LLM(backend=endpoint(server, max_retries=2, concurrency=1)).judge(GROUPS[1:]) == [[1, 0]]
    assert server.requests == 2 + 2


@pytest.mark.parametrize(
    ("mode", "status", "retries", "match", "requests"),
    [
        ("status", 503, 2, r"failed 3 times; last: HTTP 503", 3),
        ("status", 400, 2, r"refused the request \(HTTP 400", 1),  # not retried
        ("hang", None, 1, r"failed 2 times; last: TimeoutError", 2),
        ("no_logprobs", None, 2, r"without the first token's top_logprobs", 1),
    ],
)
def test_endpoint_failures_are_named(server, mode, status, retries, match, requests):
    server.mode, server.status, server.failures, server.delay = mode, status, 99, 1.0
    backend = endpoint(server, max_retries=retries, timeout=0.3)
    question = LLM(backend=backend).conversation("q", "xy", "x")
    with pytest.raises(EndpointError, match=match):
        backend.answer_logprobs([question], ("A", "B"))
    assert server.requests == requests


def test_an_unreachable_endpoint_fails_after_its_retries(server):
    url = server.url
    server.close()  # nothing listens there any more
    backend = Endpoint(base_url=url, model="m", max_retries=1, backoff=0.01, timeout=1)
    with pytest.raises(EndpointError, match=r"failed 2 times; last: URLError.*refused"):
        LLM(backend=backend).judge(GROUPS[1:2])


def test_judge_llm_config_builds_either_backend(tmp_path, server):
    cfg = compose_config(["judge=llm", "judge.backend.name_or_path=m", "model.dtype=bf16"],
                         tmp_path, "iterate")  # fmt: skip
    judge = instantiate(cfg.judge)
    assert isinstance(judge.backend, LocalLM) and judge.backend.dtype == "bf16"
    assert judge.answers == ("A", "B") and judge.template.startswith("Which of the two")
    cfg = compose_config(["judge=llm", "judge/backend=endpoint", "judge.backend.model=fake",
                          f"judge.backend.base_url={server.url}"], tmp_path, "iterate")  # fmt: skip
    assert instantiate(cfg.judge).judge(GROUPS[1:]) == [[1.0, 0.0]]


# =========================================================================== in the loop
def test_a_failing_endpoint_fails_its_round_and_the_resumed_run_continues(
    tmp_path, server, monkeypatch
):
    """Round 0 is judged, the run is killed; the resumed run's round 1 meets a failing server:
    it fails naming the judge and the round, and writes no round folder. Resumed again with
    the server back, the run finishes without redoing round 0."""
    llm = ["judge=llm", "judge/backend=endpoint", "judge.backend.model=fake",
           f"judge.backend.base_url={server.url}", "judge.backend.max_retries=1",
           "judge.backend.backoff=0.01", "eval.n_prompts=0",
           "checkpoint.every_n_train_steps=2"]  # fmt: skip
    base = [o for o in ITER if not o.startswith("judge")]
    cfg = lambda *more: compose_config([*base, *llm, *more], tmp_path, name="iterate")
    with monkeypatch.context() as m:
        stop_after(m, 2)  # killed at the end of round 0
        online_run.iterate(cfg())
    pairs0 = (tmp_path / "rounds" / "000" / "pairs.jsonl").read_text()
    assert server.requests > 0 and pairs0
    server.mode, server.failures = "status", 10**6
    with pytest.raises(JudgeError, match=r"judge LLM\(.*127\.0\.0\.1.*failed in round 1.*HTTP 503"):
        online_run.iterate(cfg("ckpt_path=last"))
    assert not (tmp_path / "rounds" / "001").exists()
    server.mode, before = "ok", server.requests
    resumed = online_run.iterate(cfg("ckpt_path=last"))
    assert resumed["status"] == "finished" and resumed["steps"] == 4
    assert [r["round"] for r in resumed["rounds"]] == [0, 1]
    assert server.requests > before and (tmp_path / "rounds" / "001" / "pairs.jsonl").exists()
    assert (tmp_path / "rounds" / "000" / "pairs.jsonl").read_text() == pairs0  # not redone
