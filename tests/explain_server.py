"""A deterministic OpenAI-compatible chat-completions endpoint on 127.0.0.1 for the explain
stage's tests and benchmarks. By default the explainer answers 'contains "<first highlighted
token>"' and the scorers answer 1 exactly for the examples that contain that token, so a
detection score can be computed independently; a benchmark passes its own `answer`."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from loupe import explain


def answer(messages: list[dict]) -> str:
    """The default reply to loupe's delphi prompts."""
    last = messages[-1]["content"]
    if "[EXPLANATION]" in messages[0]["content"]:
        first = re.search(r"<<(.*?)>>", last)
        return f'Thinking.\n[EXPLANATION]: contains "{first.group(1) if first else ""}"'
    named = re.search(r'Latent explanation: contains "(.*)"', last)
    token = named.group(1) if named else "\x00"  # any other explanation: all 0
    texts = re.findall(r"^Example \d+: (.*)$", last, re.MULTILINE)
    return json.dumps([int(token in t.replace("<<", "").replace(">>", "")) for t in texts])


def request_key(body: dict) -> str:
    """loupe's key of a request (explain.Endpoint.request_key), from its JSON body."""
    key = [body["model"], body["max_tokens"], body["messages"]]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def send_json(handler: BaseHTTPRequestHandler, status: int, data: bytes) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class LocalServer:
    """An HTTP server on 127.0.0.1 at a free port, serving in a thread; `url` ends in /v1."""

    def serve(self, handler) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


class Server(LocalServer):
    """ThreadingHTTPServer answering /v1/chat/completions; counts requests by status."""

    def __init__(
        self,
        status: int = 200,
        unparsed: str | None = None,
        delay: float = 0.0,
        explanation: str | None = None,
        tokenizer=None,
        answer=answer,
        fail_on: str | None = None,
        flaky: bool = False,
    ):
        self.status, self.unparsed, self.requests, self.keys = status, unparsed, 0, []
        self.delay, self.sent = delay, {}  # request key (loupe's) -> times sent
        self.explanation, self.tokenizer, self.prompt_tokens = explanation, tokenizer, 0
        self.answer, self.lock = answer, threading.Lock()
        # HTTP 500 for requests whose last message holds `fail_on`; HTTP 429 for the first
        # sending of every request when `flaky`.
        self.fail_on, self.flaky = fail_on, flaky
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests += 1
                outer.keys.append(self.headers.get("Authorization"))
                key = request_key(body)
                outer.sent[key] = outer.sent.get(key, 0) + 1
                time.sleep(outer.delay)
                status = outer.status
                if outer.flaky and outer.sent[key] == 1:
                    status = 429
                if outer.fail_on and outer.fail_on in body["messages"][-1]["content"]:
                    status = 500
                if status != 200:
                    self.send_response(status)
                    self.end_headers()
                    return
                text = outer.answer(body["messages"])
                if outer.explanation and "[EXPLANATION]" in text:
                    text = f"[EXPLANATION]: {outer.explanation}"
                if outer.tokenizer is not None:
                    with outer.lock:  # a fast tokenizer is not to be shared across threads
                        n = explain.count_tokens(outer.tokenizer, body["messages"])
                        outer.prompt_tokens += n
                if outer.unparsed and outer.unparsed in body["messages"][-1]["content"]:
                    text = "I cannot tell."
                reply = {
                    "choices": [{"message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 7},
                }
                send_json(self, 200, json.dumps(reply).encode())

        self.serve(Handler)
