"""A tiny OpenAI-compatible chat-completions server for the LLM judge's failure modes (the
agreement with a real model is shown against a real server in test_llm_judge.py).

It judges like ``fake_judges.distinct``: the response with more distinct characters is the
better one, wherever it is shown, so both orders agree and pairs form. ``mode`` makes it fail:
``status`` (answer HTTP ``status`` to the next ``failures`` requests, then judge again),
``hang`` (answer after ``delay`` seconds), ``no_logprobs`` (a reply without them).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PAIR = re.compile(r"\[Response A\]\n(.*)\n\n\[Response B\]\n(.*)\n\nReply", re.S)


class FakeOpenAI:
    def __init__(self) -> None:
        self.mode, self.status, self.failures, self.delay = "ok", 503, 0, 0.0
        self.requests, self.in_flight, self.max_in_flight = 0, 0, 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    server.answer(self, body)
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, handler: BaseHTTPRequestHandler, body: dict) -> None:
        if self.mode == "status" and self.failures > 0:
            self.failures -= 1
            return self.send(handler, self.status, {"error": {"message": "overloaded"}})
        if self.mode == "hang":
            time.sleep(self.delay)
        user = body["messages"][-1]["content"]
        a, b = PAIR.search(user).groups()
        za, zb = len(set(a)), len(set(b))
        norm = math.log(math.exp(za) + math.exp(zb) + 1.0)
        top = [
            {"token": "A", "logprob": za - norm},
            {"token": " B", "logprob": zb - norm},
            {"token": "The", "logprob": -norm},
        ]
        first = {"token": "A" if za >= zb else " B", "logprob": max(za, zb) - norm}
        logprobs = {"content": [{**first, "top_logprobs": top[: body["top_logprobs"]]}]}
        choice = {"index": 0, "message": {"role": "assistant", "content": first["token"]}}
        if self.mode != "no_logprobs":
            choice["logprobs"] = logprobs
        self.send(handler, 200, {"object": "chat.completion", "choices": [choice]})

    @staticmethod
    def send(handler: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
