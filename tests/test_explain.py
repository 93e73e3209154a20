"""The explain stage against a deterministic OpenAI-compatible endpoint on 127.0.0.1: the
explainer answers 'contains "<first highlighted token>"'; the scorers answer 1 exactly for the
examples that contain that token, so a detection score can be computed independently."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import demo_config, typed

from loupe import explain
from loupe.errors import LoupeError


def answer(messages: list[dict]) -> str:
    last = messages[-1]["content"]
    if "[EXPLANATION]" in messages[0]["content"]:
        first = re.search(r"<<(.*?)>>", last)
        return f'Thinking.\n[EXPLANATION]: contains "{first.group(1) if first else ""}"'
    named = re.search(r'Latent explanation: contains "(.*)"', last)
    token = named.group(1) if named else "\x00"  # any other explanation: all 0
    texts = re.findall(r"^Example \d+: (.*)$", last, re.MULTILINE)
    return json.dumps([int(token in t.replace("<<", "").replace(">>", "")) for t in texts])


class Server:
    """ThreadingHTTPServer answering /v1/chat/completions; counts requests by status."""

    def __init__(
        self,
        status: int = 200,
        unparsed: str | None = None,
        delay: float = 0.0,
        explanation: str | None = None,
        tokenizer=None,
    ):
        self.status, self.unparsed, self.requests, self.keys = status, unparsed, 0, []
        self.delay, self.sent = delay, {}  # request key (loupe's) -> times sent
        self.explanation, self.tokenizer, self.prompt_tokens = explanation, tokenizer, 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests += 1
                outer.keys.append(self.headers.get("Authorization"))
                key = [body["model"], body["max_tokens"], body["messages"]]
                key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
                outer.sent[key] = outer.sent.get(key, 0) + 1
                time.sleep(outer.delay)
                if outer.status != 200:
                    self.send_response(outer.status)
                    self.end_headers()
                    return
                text = answer(body["messages"])
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
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def spec(url: str | None, **override):
    raw = demo_config()
    raw["explain"].update(
        {"base_url": url, "concurrency": 2, "retries": 1, "timeout": 5, **override}
    )
    return typed(raw)


def _example(tokens: list[str], acts: list[float]):
    return (tokens, acts)


def test_detection_score_equals_an_independent_count(server, tmp_path):
    config = spec(server.url, score_examples=50, examples_per_prompt=3)
    endpoint = explain.Endpoint(config.explain, tmp_path / "record.jsonl")
    shown = [_example(["a", " cat", " sat"], [0.0, 2.0, 0.1])]
    held = [
        _example(["the", " cat"], [0.0, 1.0]),
        _example(["a", " dog"], [0.0, 1.0]),  # active, yet without " cat": a miss
        _example([" cat", "s"], [1.0, 0.0]),
    ]
    inactive = [["no", " pets"], ["one", " cat"], ["x"], ["y", "z"]]  # " cat": a false alarm
    row = explain.explain_feature(endpoint, config.explain, 7, shown, held, inactive, True)
    assert row["status"] == "ok" and row["explanation"] == 'contains " cat"'
    labels = [True] * 3 + [False] * 4
    says = [" cat" in "".join(t) for t, _ in held] + [" cat" in "".join(t) for t in inactive]
    assert row["detection"] == pytest.approx(
        np.mean([s == label for s, label in zip(says, labels, strict=True)])
    )
    assert row["detection"] == pytest.approx(5 / 7)
    # Fuzzing: each held-out example marked right (1) and marked wrong (0); the endpoint says
    # 1 wherever the text holds " cat", whatever the marks: right on 3 of the 6.
    assert row["fuzzing"] == pytest.approx(3 / 6)
    # 1 explainer + ceil(7/3) detection + ceil(6/3) fuzzing requests, 100 prompt tokens each
    assert server.requests == 1 + 3 + 2
    assert row["prompt_tokens"] == 600 and row["completion_tokens"] == 42


def test_prompts_are_delphis():
    messages = explain.explainer_messages([(["a", " cat"], [0.0, 2.0])])
    assert messages[0]["role"] == "system" and "[EXPLANATION]:" in messages[0]["content"]
    assert len(messages) == 8  # system, three shots (user, assistant), the examples
    assert messages[-1]["content"] == '\na<< cat>>\nActivations: (" cat" : 10), \n'
    detection = explain.scorer_messages("detection", "cats", ["x", "y"])
    assert detection[-1]["content"].startswith("Latent explanation: cats")
    assert "Example 0: x\nExample 1: y" in detection[-1]["content"]
    assert explain.parse_predictions("Sure: [1, 0]", 2) == [True, False]
    assert explain.parse_predictions("[1]", 2) is None
    assert explain.parse_explanation("no tag") is None


def _layer_files(tmp_path: Path, features: int = 6):
    """Minimal examples, interval examples, stats and random windows for `features`."""
    rows = []
    for f in range(features):
        for rank in range(3):
            tokens = ["w", f" t{f}", f" r{rank}"]
            rows.append(
                {
                    "feature": f,
                    "activation": 3.0 - rank,
                    "context_tokens": json.dumps(tokens),
                    "token_activations": json.dumps([0.0, 3.0 - rank, 0.0]),
                }
            )
    pl.DataFrame(rows).write_parquet(tmp_path / "ex.parquet")
    spread = [{**r, "context_tokens": r["context_tokens"].replace(" r", " s")} for r in rows]
    pl.DataFrame(spread).write_parquet(tmp_path / "iv.parquet")
    pl.DataFrame(
        {"feature": range(features), "density": np.linspace(0.01, 0.1, features), "examples": 3}
    ).write_parquet(tmp_path / "st.parquet")
    width, k = 2, 1
    codes = pa.FixedSizeListArray.from_arrays(
        pa.FixedSizeListArray.from_arrays(pa.array([0, 1, 2, 3], pa.int32()), k), width
    )
    acts = pa.FixedSizeListArray.from_arrays(
        pa.FixedSizeListArray.from_arrays(pa.array([1.0, 1.0, 1.0, 0.0], pa.float32()), k), width
    )
    pq.write_table(
        pa.table(
            {
                "context_tokens": [json.dumps(["a", "b"]), json.dumps(["c", "d"])],
                "features": codes,
                "activations": acts,
            }
        ),
        tmp_path / "rw.parquet",
    )
    return [tmp_path / n for n in ("ex.parquet", "iv.parquet", "st.parquet", "rw.parquet")]


def test_inactive_windows_are_exact(tmp_path):
    *_, windows = _layer_files(tmp_path)
    inactive = explain._inactive_windows(windows, np.array([0, 2, 3, 5]))
    # feature 3 is coded in window 1 with activation 0 (an uncounted position): inactive
    assert inactive == {
        0: [["c", "d"]],
        2: [["a", "b"]],
        3: [["a", "b"], ["c", "d"]],
        5: [
            ["a", "b"],
            ["c", "d"],
        ],
    }


def test_a_rerun_sends_nothing_already_answered(server, tmp_path):
    files = _layer_files(tmp_path)
    config = spec(server.url, score_features=2)
    out, record = tmp_path / "explanations.parquet", tmp_path / "record.jsonl"
    counts = explain.explain_layer(config, 3, *files, record, out)
    first = server.requests
    assert counts == {"ok": 6, "unparsed": 0, "failed": 0} and first > 6
    df = pl.read_parquet(out)
    assert df["feature"].to_list() == list(range(6))
    assert df["explanation"].to_list() == [f'contains " t{f}"' for f in range(6)]
    assert df["detection"].is_not_null().sum() == 2 and df["fuzzing"].is_not_null().sum() == 2
    assert set(df["prompt_version"]) == {explain.PROMPT_VERSION} and set(df["layer"]) == {3}
    assert len(record.read_text().splitlines()) == first
    # A kill mid-write leaves a cut last line: that one request is sent again, nothing else.
    lines = record.read_text().splitlines()
    record.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    explain.explain_layer(config, 3, *files, record, out)
    assert server.requests == first + 1
    assert pl.read_parquet(out).equals(df)


def test_unparsed_answers_are_rows(tmp_path):
    s = Server(unparsed=" t2")
    try:
        counts = explain.explain_layer(
            spec(s.url, score_features=0),
            0,
            *_layer_files(tmp_path),
            tmp_path / "r",
            tmp_path / "o",
        )
    finally:
        s.close()
    assert counts == {"ok": 5, "unparsed": 1, "failed": 0}
    df = pl.read_parquet(tmp_path / "o")
    assert df.filter(pl.col("status") == "unparsed")["feature"].to_list() == [2]


@pytest.mark.parametrize("status", [401, 429, 500])
def test_http_errors_fail_in_one_line_and_keep_answers(tmp_path, status):
    s = Server(status=status)
    record = tmp_path / "record.jsonl"
    record.write_text(json.dumps({"key": "old", "text": "x"}) + "\n")
    try:
        with pytest.raises(LoupeError, match=f"no request to .* was answered \\(HTTP {status}"):
            explain.explain_layer(spec(s.url), 0, *_layer_files(tmp_path), record, tmp_path / "o")
    finally:
        s.close()
    assert record.read_text() == json.dumps({"key": "old", "text": "x"}) + "\n"
    assert not (tmp_path / "o").exists()
    assert s.requests == 6 * (1 + (status != 401))  # 429/5xx are retried once


def test_unreachable_and_unset_key_are_one_line(tmp_path, monkeypatch):
    files = _layer_files(tmp_path)
    with pytest.raises(LoupeError, match="unreachable"):
        explain.explain_layer(
            spec("http://127.0.0.1:9/v1"), 0, *files, tmp_path / "r", tmp_path / "o"
        )
    monkeypatch.delenv("LOUPE_TEST_KEY", raising=False)
    with pytest.raises(LoupeError, match="LOUPE_TEST_KEY, which is unset"):
        explain.explain_layer(
            spec("http://127.0.0.1:9/v1", api_key_env="LOUPE_TEST_KEY"),
            0,
            *files,
            tmp_path / "r",
            tmp_path / "o",
        )


def test_the_key_is_sent_but_written_nowhere(server, tmp_path, monkeypatch):
    secret = "sk-loupe-test-0123456789"
    monkeypatch.setenv("LOUPE_TEST_KEY", secret)
    config = spec(server.url, api_key_env="LOUPE_TEST_KEY", score_features=1)
    explain.explain_layer(config, 0, *_layer_files(tmp_path), tmp_path / "r", tmp_path / "o")
    assert set(server.keys) == {f"Bearer {secret}"}
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_a_timeout_is_a_failed_row(tmp_path):
    """A server that never answers: each request times out (retried), the job says so."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # accepts connections, never replies
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    try:
        with pytest.raises(LoupeError, match="timeout"):
            explain.explain_layer(
                spec(url, timeout=0.2, retries=0, features=2),
                0,
                *_layer_files(tmp_path),
                tmp_path / "r",
                tmp_path / "o",
            )
    finally:
        sock.close()


def test_the_command_line_says_one_line_and_exits_2(tmp_path, capsys):
    from loupe.cli import main

    ex, iv, st, rw = _layer_files(tmp_path)
    raw = demo_config()
    raw["explain"].update(base_url="http://127.0.0.1:9/v1", retries=0)
    code = main(
        ["explain", "--config", json.dumps(raw), "--layer", "0", "--examples", str(ex)]
        + ["--intervals", str(iv), "--stats", str(st), "--random-windows", str(rw)]
        + ["--record", str(tmp_path / "r"), "--explanations", str(tmp_path / "o")]
    )
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith("loupe explain: error: no request to http://127.0.0.1:9/v1/")


def test_kill_9_mid_run_resumes_without_resending_answers(tmp_path):
    """A real job (python -m loupe explain) killed with SIGKILL after some answers: the rerun
    sends each answered request never again (counted at the server) and finishes every row."""
    s = Server(delay=0.15)
    ex, iv, st, rw = _layer_files(tmp_path)
    raw = demo_config()
    raw["explain"].update(base_url=s.url, concurrency=2, retries=0, score_features=6)
    record, out = tmp_path / "record.jsonl", tmp_path / "o.parquet"
    args = [sys.executable, "-m", "loupe", "explain", "--config", json.dumps(raw)]
    args += ["--layer", "0", "--examples", str(ex), "--intervals", str(iv), "--stats", str(st)]
    args += ["--random-windows", str(rw), "--record", str(record), "--explanations", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(explain.__file__).parents[1])}
    try:
        job = subprocess.Popen(args, env=env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not (record.exists() and len(record.read_text().splitlines()) >= 5):
            assert job.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
        answered = {json.loads(x)["key"] for x in record.read_text().splitlines() if x.strip()}
        assert not out.exists() and len(answered) < sum(s.sent.values())  # cut mid-run
        assert subprocess.run(args, env=env, stderr=subprocess.DEVNULL).returncode == 0
    finally:
        s.close()
    assert all(s.sent[key] == 1 for key in answered)
    assert sum(s.sent.values()) <= len(s.sent) + 2  # at most the 2 in flight sent twice
    df = pl.read_parquet(out)
    assert df["status"].to_list() == ["ok"] * 6 and df["detection"].is_not_null().all()


def test_the_dry_run_counts_the_prompts_a_run_sends(tmp_path, tiny_model, capsys):
    """With the explainer answering the dry run's assumed explanation, a real run sends
    exactly the requests and prompt tokens the dry run printed."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    s = Server(explanation=explain.ASSUMED_EXPLANATION, tokenizer=tokenizer)
    files = _layer_files(tmp_path)
    raw = demo_config()
    raw["model"]["name"] = str(tiny_model)
    raw["explain"].update(base_url=s.url, score_features=3, features=5)
    config = typed(raw)
    try:
        dry = explain.explain_dry_run(config, [4], *[[f] for f in files])
        assert s.requests == 0  # the dry run sends nothing
        explain.explain_layer(config, 4, *files, tmp_path / "r", tmp_path / "o")
    finally:
        s.close()
    assert dry["tokenizer"] == str(tiny_model)  # the explainer's is not cached offline
    assert dry["total"]["requests"] == s.requests == 5 + 3 * (1 + 2)
    assert dry["total"]["prompt_tokens"] == s.prompt_tokens
    assert 0 < dry["total"]["uncached_prompt_tokens"] < s.prompt_tokens / 2
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].split()[:3] == ["total", "5", "3"] and printed[-2].split()[0] == "4"
