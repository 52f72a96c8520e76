"""A language-model judge (``judge=llm``): an instruction-following model compares two responses.

For every two responses of a prompt, the judge model is asked, with a judging prompt
(:data:`DEFAULT_PROMPT`, or ``judge.prompt``), which of "A" and "B" is better, and the answer is
read from the probabilities of the answer tokens at the first position of its reply, not from
free text: log P(A) and log P(B), each summed over the tokens that read as that answer ("A",
" A", ...). The question is asked in both orders, the responses swapped, to cancel the judge's
position bias: a response wins when both orders prefer it, and the two tie when the orders
disagree (or an answer cannot be read). A response scores its wins + ½ ties against the other
responses of its prompt (:func:`~inspo.online.judges.copeland`): with two responses, 1 and 0,
or ½ each on a tie, which pairing then drops as a ``tie``. This is the AI feedback of OAIF
(Guo et al., "Direct Language Model Alignment from Online AI Feedback", 2024).

Two backends give the answer probabilities:

- :class:`LocalLM`: a Hugging Face causal LM in this process (its chat template), batched, on
  the run's device and dtype;
- :class:`Endpoint`: any OpenAI-compatible server (vLLM, llama.cpp, a hosted API), through chat
  completions with ``top_logprobs``, with concurrent requests, a timeout and retries. A server
  that cannot be reached, or keeps failing, raises :class:`~inspo.online.judges.JudgeError`: the
  round fails naming the judge and the round, writes nothing, and ``ckpt_path=last`` resumes it.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from inspo.online.judges import Group, Judge, JudgeError, copeland

log = logging.getLogger(__name__)

DEFAULT_PROMPT = """\
Which of the two responses below answers the request better? Judge helpfulness, honesty and \
harmlessness; ignore the order in which they are shown and their length.

[Request]
{prompt}

[Response A]
{a}

[Response B]
{b}

Reply with a single letter: A or B."""

Conversation = list[dict[str, str]]


class AnswerBackend(Protocol):
    """Gives, per conversation, log P(answer) for each answer as the first token of the
    assistant's reply (summed over the tokens that read as it; −inf where none can be read)."""

    def answer_logprobs(
        self, conversations: Sequence[Conversation], answers: Sequence[str]
    ) -> list[list[float]]: ...


def reads_as(token_text: str, answer: str) -> bool:
    """Whether a token's text is the answer, spaces and newlines aside ("A", " A", "A\\n")."""
    return token_text.strip() == answer


def verdict(first: Sequence[float], second: Sequence[float]) -> int:
    """+1 when response i beats response j in both orders, −1 when j beats i in both, 0 (a tie)
    when the orders disagree or either cannot be read. ``first`` = (log P(A), log P(B)) with i
    shown as A; ``second`` the same with j shown as A."""
    prefers_i = (first[0] - first[1], second[1] - second[0])
    if any(math.isnan(d) for d in prefers_i):
        return 0
    if all(d > 0 for d in prefers_i):
        return 1
    if all(d < 0 for d in prefers_i):
        return -1
    return 0


@dataclass
class LLM(Judge):
    """Pairwise judging by a language model (see the module docstring).

    ``backend``: :class:`LocalLM` or :class:`Endpoint`. ``prompt``: the judging prompt, a
    format string over ``{prompt}``, ``{a}`` and ``{b}`` (None: :data:`DEFAULT_PROMPT`), sent as
    the user turn after the optional ``system`` turn. ``answers``: the two answer tokens, for
    "A is better" and "B is better", as the prompt asks for them.
    """

    backend: Any = None
    prompt: str | None = field(default=None, repr=False)
    system: str | None = field(default=None, repr=False)
    answers: Sequence[str] = ("A", "B")

    def __post_init__(self) -> None:
        if self.backend is None:
            raise ValueError("judge=llm needs a backend: judge/backend=local or endpoint")
        self.answers = tuple(self.answers)
        if len(self.answers) != 2 or len(set(self.answers)) != 2:
            raise ValueError(f"judge.answers must be two different answers, got {self.answers}")
        template = self.prompt or DEFAULT_PROMPT
        try:
            template.format(prompt="", a="", b="")
        except (KeyError, IndexError) as e:
            raise ValueError(
                f"judge.prompt may use only {{prompt}}, {{a}} and {{b}}: {e!r} in {template!r}"
            ) from e
        self.template = template

    def conversation(self, prompt: str, a: str, b: str) -> Conversation:
        """The messages that ask which of ``a`` and ``b`` answers ``prompt`` better."""
        turns = [{"role": "system", "content": self.system}] if self.system else []
        return [*turns, {"role": "user", "content": self.template.format(prompt=prompt, a=a, b=b)}]

    def raw(self, groups: Sequence[Group]) -> list[list[float]]:
        pairs = [
            (k, i, j)
            for k, g in enumerate(groups)
            for i, j in itertools.combinations(range(len(g.responses)), 2)
        ]
        asked = []
        for k, i, j in pairs:  # each pair in both orders, one batch for all
            p, r = groups[k].prompt, groups[k].responses
            asked += [self.conversation(p, r[i], r[j]), self.conversation(p, r[j], r[i])]
        logps = self.backend.answer_logprobs(asked, self.answers) if asked else []
        unread = sum(all(x == -math.inf for x in lp) for lp in logps)
        if unread:
            log.warning(
                "judge %r: %d of %d answers had neither %s nor %s among the first token's "
                "candidates (counted as ties)",
                self,
                unread,
                len(logps),
                *self.answers,
            )
        verdicts: dict[int, dict[tuple[int, int], int]] = {k: {} for k in range(len(groups))}
        for n, (k, i, j) in enumerate(pairs):
            verdicts[k][i, j] = verdict(logps[2 * n], logps[2 * n + 1])
        return [copeland(len(g.responses), verdicts[k]) for k, g in enumerate(groups)]


# --------------------------------------------------------------------------- local model
def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA (the process's current device) when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class LocalLM:
    """A Hugging Face causal LM with a chat template, loaded on first use. The judging prompts
    are rendered with its chat template (up to the assistant turn), left-padded into batches of
    ``batch_size`` and run once each: the answer log-probs are the log-softmax of the last
    position's logits, in float32 at least."""

    name_or_path: str = "???"
    dtype: str = "fp32"
    device: str = "auto"
    batch_size: int = 8
    trust_remote_code: bool = False
    _model: Any = field(default=None, init=False, repr=False)
    _tokenizer: Any = field(default=None, init=False, repr=False)
    _answer_ids: dict = field(default_factory=dict, init=False, repr=False)

    def load(self) -> None:
        from transformers import AutoModelForCausalLM

        from inspo.models.load import DTYPES, load_tokenizer

        tok = load_tokenizer(self.name_or_path, trust_remote_code=self.trust_remote_code)
        if not getattr(tok, "chat_template", None):
            raise JudgeError(
                f"judge model {self.name_or_path!r} has no chat template: the LLM judge needs an "
                "instruction-following (chat) model"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown judge dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")
        model = AutoModelForCausalLM.from_pretrained(
            self.name_or_path, dtype=DTYPES[self.dtype], trust_remote_code=self.trust_remote_code
        )
        self._model = model.to(resolve_device(self.device)).eval().requires_grad_(False)
        self._tokenizer = tok

    def answer_ids(self, answer: str) -> list[int]:
        """The token ids whose text reads as ``answer``."""
        if answer not in self._answer_ids:
            texts = self._tokenizer.batch_decode([[i] for i in range(len(self._tokenizer))])
            ids = [i for i, text in enumerate(texts) if reads_as(text, answer)]
            if not ids:
                raise JudgeError(f"no token of {self.name_or_path!r} reads as {answer!r}")
            self._answer_ids[answer] = ids
        return self._answer_ids[answer]

    def encode(self, conversations: Sequence[Conversation]) -> list[list[int]]:
        tok = self._tokenizer
        texts = [
            tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in conversations
        ]
        return tok(texts, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def answer_logprobs(
        self, conversations: Sequence[Conversation], answers: Sequence[str]
    ) -> list[list[float]]:
        from inspo.data.collate import pad_rows

        if self._model is None:
            self.load()
        device = next(self._model.parameters()).device
        ids = [torch.tensor(self.answer_ids(a), device=device) for a in answers]
        rows = self.encode(conversations)
        order = sorted(range(len(rows)), key=lambda n: len(rows[n]))  # similar lengths batched
        out: list[list[float]] = [[] for _ in rows]
        for start in range(0, len(order), self.batch_size):
            picked = order[start : start + self.batch_size]
            batch = pad_rows([rows[n] for n in picked], self._tokenizer.pad_token_id, "left")
            input_ids, mask = (t.to(device) for t in batch)
            logits = self._model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=False,
                logits_to_keep=1,
            ).logits[:, -1]
            logp = torch.log_softmax(logits.float(), dim=-1)
            answer = torch.stack([torch.logsumexp(logp[:, i], dim=-1) for i in ids], dim=-1)
            for n, row in zip(picked, answer.tolist(), strict=True):
                out[n] = row
        return out


# --------------------------------------------------------------------------- endpoint
class EndpointError(JudgeError):
    """The endpoint could not be reached or kept failing, or answered without log-probs."""


#: HTTP statuses worth retrying: rate limits and server-side failures.
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


@dataclass
class Endpoint:
    """An OpenAI-compatible chat-completions endpoint (vLLM's or llama.cpp's server, a hosted
    API): one request per question, ``max_tokens=1``, ``temperature=0``, ``logprobs`` with
    ``top_logprobs`` candidates; an answer absent from them is read as −inf (its probability is
    below every candidate's).

    ``concurrency`` requests in flight at once; each gets ``timeout`` seconds and is retried
    ``max_retries`` times after a connection error, a timeout or a retryable status (429, 5xx),
    waiting ``backoff × 2^attempt`` seconds in between; any other failure fails at once. The API
    key, if the server needs one, is read from the environment variable ``api_key_env`` at
    request time (never stored in the run's config).
    """

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "???"
    top_logprobs: int = 20
    concurrency: int = 8
    timeout: float = 60.0
    max_retries: int = 3
    backoff: float = 1.0
    api_key_env: str | None = field(default="OPENAI_API_KEY", repr=False)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def answer_logprobs(
        self, conversations: Sequence[Conversation], answers: Sequence[str]
    ) -> list[list[float]]:
        if not conversations:
            return []
        workers = max(1, min(self.concurrency, len(conversations)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(self.ask, c) for c in conversations]
            try:
                candidates = [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return [[_answer_logprob(c, a) for a in answers] for c in candidates]

    def ask(self, conversation: Conversation) -> list[tuple[str, float]]:
        """The first reply token's candidates, (text, log-prob), for one conversation."""
        body = {
            "model": self.model,
            "messages": conversation,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }
        reply = self.post(body)
        try:
            first = reply["choices"][0]["logprobs"]["content"][0]
            return [(c["token"], float(c["logprob"])) for c in first["top_logprobs"]]
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise EndpointError(
                f"{self.url} answered without the first token's top_logprobs "
                f"({type(e).__name__}: {e}); does it support logprobs? reply: {str(reply)[:300]}"
            ) from e

    def post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode()
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace")
                reason = f"HTTP {e.code}: {detail}"
                if e.code not in RETRY_STATUSES:
                    raise EndpointError(f"{self.url} refused the request ({reason})") from e
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                reason = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except json.JSONDecodeError as e:
                raise EndpointError(f"{self.url} answered with invalid JSON ({e})") from e
            if attempt < self.max_retries:
                time.sleep(self.backoff * 2**attempt)
        raise EndpointError(f"{self.url} failed {self.max_retries + 1} times; last: {reason}")


def _answer_logprob(candidates: list[tuple[str, float]], answer: str) -> float:
    """log Σ P(token) over the candidates that read as ``answer`` (−inf if none does)."""
    matched = [lp for text, lp in candidates if reads_as(text, answer)]
    if not matched:
        return -math.inf
    return float(torch.logsumexp(torch.tensor(matched, dtype=torch.float64), dim=0))
