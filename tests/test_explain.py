"""The explain stage against a deterministic OpenAI-compatible endpoint on 127.0.0.1
(tests/explain_server.py): the explainer answers 'contains "<first highlighted token>"'; the
scorers answer 1 exactly for the examples that contain that token, so a detection score can be
computed independently."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from explain_server import LocalServer, Server, request_key, send_json
from helpers import announced_jobs, demo_config, described_columns, run_snakemake, typed

from loupe import explain
from loupe.errors import LoupeError


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def raw_config(**explain_settings) -> dict:
    """The demo's settings with the schema's explain defaults (not the demo's few features)
    and these."""
    raw = demo_config()
    raw["explain"] = explain_settings
    return raw


def config_at(url: str | None, **override):
    """The typed config with explain.base_url at `url` and these explain settings."""
    return typed(
        raw_config(**{"base_url": url, "concurrency": 2, "retries": 1, "timeout": 5, **override})
    )


def _example(tokens: list[str], acts: list[float]):
    return (tokens, acts)


def test_detection_score_equals_an_independent_count(server, tmp_path):
    config = config_at(server.url, score_examples=50, examples_per_prompt=3)
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


def test_the_vendored_prompts_are_the_installed_delphis():
    """assets/delphi holds eai-delphi's own prompt modules, byte for byte, of the version every
    row records (the test command installs that release; the stage itself does not need it)."""
    import importlib.metadata
    import importlib.util

    assert importlib.metadata.version("eai-delphi") == explain.DELPHI_VERSION
    installed = Path(next(iter(importlib.util.find_spec("delphi").submodule_search_locations)))
    copies = sorted(explain.DELPHI_PROMPTS.rglob("*.py"))
    assert len(copies) == 3
    for copy in copies:
        relative = copy.relative_to(explain.DELPHI_PROMPTS)
        assert copy.read_bytes() == (installed / relative).read_bytes(), relative


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


def test_the_sample_of_features_is_seeded_and_spans_the_densities():
    features = np.arange(100, 200)
    density = np.linspace(0.5, 0.001, 100)  # feature 100 the densest, 199 the rarest
    picked = explain.stratified(features, density, 10)
    assert picked.tolist() == sorted(picked.tolist())
    assert np.array_equal(picked, explain.stratified(features, density, 10))  # seeded
    # One in each tenth of the features sorted by density, none left out.
    assert sorted((199 - picked) // 10) == list(range(10))
    assert np.array_equal(explain.stratified(features, density, 500), features)


def test_held_out_examples_are_the_unshown_top_and_interval_examples(tmp_path):
    """What scoring sees: every activating example the explainer was not shown (top examples
    past explain_examples, interval examples), highest first, each window once; the n drawn
    for a scorer span the activations."""

    def ex(name: str, peak: float):
        return ([name, " x"], [peak, 0.0])

    top = [ex(f"top{i}", 10.0 - i) for i in range(5)]  # sorted, as maxact writes them
    spread = [ex("top3", 7.0), ex("mid", 6.5), ex("low", 0.5), ex("top0", 10.0)]
    plan = explain.Plan(np.array([4]), {4}, {4: top}, {4: spread}, {4: []})
    config = config_at("http://127.0.0.1:1/v1", explain_examples=2).explain
    assert [t[0] for t, _ in plan.shown(config, 4)] == ["top0", "top1"]
    held = plan.held_out(config, 4)
    assert [t[0] for t, _ in held] == ["top2", "top3", "mid", "top4", "low"]
    # 40 held-out examples, 4 drawn: one from each quarter of the activations.
    many = [ex(f"e{i}", 40.0 - i) for i in range(40)]
    rng = np.random.default_rng(0)
    samples = explain.scoring_samples("detection", many, [["no"]] * 10, 4, rng)
    drawn = sorted(int(text[1:].split(" ")[0]) for text, label in samples if label)
    assert [i // 10 for i in drawn] == [0, 1, 2, 3]
    assert sum(not label for _, label in samples) == 4


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
    config = config_at(server.url, score_features=2)
    out, record = tmp_path / "explanations.parquet", tmp_path / "record.jsonl"
    counts = explain.explain_layer(config, 3, *files, record, out)
    first = server.requests
    assert counts == {"ok": 6, "unparsed": 0, "failed": 0} and first > 6
    df = pl.read_parquet(out)
    assert df["feature"].to_list() == list(range(6))
    assert df["explanation"].to_list() == [f'contains " t{f}"' for f in range(6)]
    assert df["detection"].is_not_null().sum() == 2 and df["fuzzing"].is_not_null().sum() == 2
    assert set(df["prompt_version"]) == {explain.PROMPT_VERSION} and set(df["layer"]) == {3}
    assert set(df["delphi"]) == {explain.DELPHI_VERSION}
    described_columns(out, explain.explanations_schema())  # every column described in the file
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
            config_at(s.url, score_features=0),
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
            explain.explain_layer(
                config_at(s.url), 0, *_layer_files(tmp_path), record, tmp_path / "o"
            )
    finally:
        s.close()
    assert record.read_text() == json.dumps({"key": "old", "text": "x"}) + "\n"
    assert not (tmp_path / "o").exists()
    assert s.requests == 6 * (1 + (status != 401))  # 429/5xx are retried once


def test_unreachable_and_unset_key_are_one_line(tmp_path, monkeypatch):
    files = _layer_files(tmp_path)
    with pytest.raises(LoupeError, match="unreachable"):
        explain.explain_layer(
            config_at("http://127.0.0.1:9/v1"), 0, *files, tmp_path / "r", tmp_path / "o"
        )
    monkeypatch.delenv("LOUPE_TEST_KEY", raising=False)
    with pytest.raises(LoupeError, match="LOUPE_TEST_KEY, which is unset"):
        explain.explain_layer(
            config_at("http://127.0.0.1:9/v1", api_key_env="LOUPE_TEST_KEY"),
            0,
            *files,
            tmp_path / "r",
            tmp_path / "o",
        )


def test_the_key_is_sent_but_written_nowhere(server, tmp_path, monkeypatch):
    secret = "sk-loupe-test-0123456789"
    monkeypatch.setenv("LOUPE_TEST_KEY", secret)
    config = config_at(server.url, api_key_env="LOUPE_TEST_KEY", score_features=1)
    explain.explain_layer(config, 0, *_layer_files(tmp_path), tmp_path / "r", tmp_path / "o")
    assert set(server.keys) == {f"Bearer {secret}"}
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_a_timeout_is_a_failed_row(tmp_path):
    """A server that never answers: each request times out (retried), the job says so."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # accepts connections, never replies
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    try:
        with pytest.raises(LoupeError, match="timeout"):
            explain.explain_layer(
                config_at(url, timeout=0.2, retries=0, features=2),
                0,
                *_layer_files(tmp_path),
                tmp_path / "r",
                tmp_path / "o",
            )
    finally:
        sock.close()


@contextlib.contextmanager
def endpoint_failing(case: str):
    """(base_url, settings) of an endpoint that answers nothing, in one of six ways."""
    if case in ("401", "429", "500"):
        s = Server(status=int(case))
        try:
            yield s.url, {}
        finally:
            s.close()
    elif case == "timeout":
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)  # accepts connections, never replies
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", {"timeout": 0.2}
        finally:
            sock.close()
    elif case == "unset key":
        s = Server()
        try:
            yield s.url, {"api_key_env": "LOUPE_TEST_KEY_UNSET"}
        finally:
            s.close()
    else:
        yield "http://127.0.0.1:9/v1", {}  # nothing listens on port 9


@pytest.mark.parametrize(
    "case, says",
    [
        ("unreachable", r"no request to http://127.0.0.1:9/v1/\S* was answered \(unreachable"),
        ("401", r"was answered \(HTTP 401 x6\)"),
        ("429", r"was answered \(HTTP 429 x6\)"),
        ("500", r"was answered \(HTTP 500 x6\)"),
        ("timeout", r"was answered \(timeout x6\)"),
        ("unset key", r"LOUPE_TEST_KEY_UNSET, which is unset"),
    ],
)
def test_the_command_line_says_one_line_and_exits_2(case, says, tmp_path, capsys, monkeypatch):
    """Each way an endpoint can answer nothing: one line naming it, exit 2, no output file,
    and the answers already bought still in the record."""
    from loupe.cli import main

    monkeypatch.delenv("LOUPE_TEST_KEY_UNSET", raising=False)
    ex, iv, st, rw = _layer_files(tmp_path)
    record = tmp_path / "r"
    bought = json.dumps({"key": "old", "text": "x"}) + "\n"
    record.write_text(bought)
    with endpoint_failing(case) as (url, settings):
        raw = raw_config(base_url=url, retries=0, **settings)
        code = main(
            ["explain", "--config", json.dumps(raw), "--layer", "0", "--examples", str(ex)]
            + ["--intervals", str(iv), "--stats", str(st), "--random-windows", str(rw)]
            + ["--record", str(record), "--explanations", str(tmp_path / "o")]
            + ["--server-log", str(tmp_path / "s.log")]
        )
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error" in ln]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("loupe explain: error: ")
    assert re.search(says, errors[0]), errors[0]
    assert record.read_text() == bought
    assert not (tmp_path / "o").exists()


def test_a_partial_outage_is_failed_rows_and_a_rerun_sends_only_those(tmp_path):
    """Requests about one feature fail (HTTP 500), the rest answer: the job ends normally with
    that row failed and counted; once the endpoint is back, a forced rerun sends only what
    was never answered. A 429 that clears on its retry costs nothing."""
    files = _layer_files(tmp_path)
    record, out = tmp_path / "record.jsonl", tmp_path / "o"
    s = Server(fail_on=" t2")
    try:
        counts = explain.explain_layer(config_at(s.url, score_features=0), 0, *files, record, out)
    finally:
        s.close()
    assert counts == {"ok": 5, "unparsed": 0, "failed": 1}
    df = pl.read_parquet(out)
    assert df.filter(pl.col("status") == "failed")["feature"].to_list() == [2]
    assert df.filter(pl.col("feature") == 2)["explanation"].to_list() == [None]
    s = Server(flaky=True)
    try:
        counts = explain.explain_layer(config_at(s.url, score_features=0), 0, *files, record, out)
    finally:
        s.close()
    assert counts == {"ok": 6, "unparsed": 0, "failed": 0}
    assert list(s.sent.values()) == [2]  # feature 2's request alone, its 429 then its answer


def test_kill_9_mid_run_resumes_without_resending_answers(tmp_path):
    """A real job (python -m loupe explain) killed with SIGKILL after some answers: the rerun
    sends each answered request never again (counted at the server) and finishes every row."""
    s = Server(delay=0.15)
    ex, iv, st, rw = _layer_files(tmp_path)
    raw = raw_config(base_url=s.url, concurrency=2, retries=0, score_features=6)
    record, out = tmp_path / "record.jsonl", tmp_path / "o.parquet"
    args = [sys.executable, "-m", "loupe", "explain", "--config", json.dumps(raw)]
    args += ["--layer", "0", "--examples", str(ex), "--intervals", str(iv), "--stats", str(st)]
    args += ["--random-windows", str(rw), "--record", str(record), "--explanations", str(out)]
    args += ["--server-log", str(tmp_path / "s.log")]
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
    raw = raw_config(base_url=s.url, score_features=3, features=5)
    raw["model"]["name"] = str(tiny_model)
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


# --- The embedded explainer: a real `transformers serve` of a tiny chat model ----------------


@pytest.fixture(scope="module")
def tiny_explainer(tmp_path_factory, small_corpus) -> Path:
    """The demo's explainer (a tiny random chat model), built as the demo builds it."""
    from loupe.demo import build_tiny_explainer

    out = tmp_path_factory.mktemp("explainer") / "tiny-chat"
    build_tiny_explainer(out, small_corpus)
    return out


class CountingProxy(LocalServer):
    """A reverse proxy on 127.0.0.1 in front of a real server: forwards each request as it is
    and counts /chat/completions requests by loupe's request key."""

    def __init__(self, upstream: str):
        import urllib.request

        self.sent: dict[str, int] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                data = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.loads(data)
                key = request_key(body)
                outer.sent[key] = outer.sent.get(key, 0) + 1
                forward = urllib.request.Request(
                    upstream + self.path.removeprefix("/v1"),
                    data,
                    {"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(forward, timeout=60) as reply:
                    status, answer = reply.status, reply.read()
                send_json(self, status, answer)

        self.serve(Handler)


def test_the_embedded_server_explains_and_dies_with_a_killed_job(tmp_path, tiny_explainer):
    """explain.base_url null: the job serves the demo's wired chat model with `transformers
    serve` on 127.0.0.1 (requests over HTTP). kill -9 of the job mid-run leaves no server
    behind. The rerun, through a counting proxy in front of a real transformers serve, sends
    no request already answered and writes every row; answers cut by max_tokens are counted
    unparsed in the job's last line; whole answers are explanations, and scored."""
    import psutil

    from loupe.demo import EXPLAINER_ANSWER
    from loupe.explain_server import embedded_server

    ex, iv, st, rw = _layer_files(tmp_path, features=12)
    # 3 tokens: the answer's predictions without its explanation, so every row is unparsed
    raw = raw_config(
        base_url=None, model=str(tiny_explainer), concurrency=2, max_tokens=3, retries=0
    )
    raw["device"] = "cpu"
    record, out, log = tmp_path / "record.jsonl", tmp_path / "o.parquet", tmp_path / "job.log"
    args = [sys.executable, "-m", "loupe", "--log", str(log), "explain", "--layer", "0"]
    args += ["--examples", str(ex), "--intervals", str(iv), "--stats", str(st)]
    args += ["--random-windows", str(rw), "--record", str(record)]
    args += ["--server-log", str(tmp_path / "server.log")]
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(explain.__file__).parents[1]),
        "HF_HUB_OFFLINE": "1",
    }

    def job(out: Path):
        return args + ["--explanations", str(out), "--config", json.dumps(raw)]

    killed = subprocess.Popen(job(out), env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (record.exists() and len(record.read_text().splitlines()) >= 3):
        assert killed.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    server = psutil.Process(killed.pid).children(recursive=True)
    assert any("serve" in " ".join(p.cmdline()) for p in server)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    gone, alive = psutil.wait_procs(server, timeout=30)
    assert not alive  # the server and its model process died with the job
    assert not out.exists()
    answered = {json.loads(x)["key"] for x in record.read_text().splitlines() if x.strip()}
    assert 3 <= len(answered) < 12

    whole = tmp_path / "whole.parquet"
    with embedded_server(str(tiny_explainer), "cpu", tmp_path / "server2.log") as url:
        proxy = CountingProxy(url)
        try:
            raw["explain"]["base_url"] = proxy.url
            rerun = subprocess.run(job(out), env=env)
            resent = dict(proxy.sent)
            raw["explain"]["max_tokens"] = 8
            assert subprocess.run(job(whole), env=env).returncode == 0
        finally:
            proxy.close()
    assert rerun.returncode == 0
    assert resent and not set(resent) & answered  # nothing answered is sent again
    assert all(n == 1 for n in proxy.sent.values())
    df = pl.read_parquet(out)
    assert df["feature"].to_list() == list(range(12)) and set(df["status"]) == {"unparsed"}
    assert (df["prompt_tokens"] > 500).all()  # the server's own usage counts: delphi's prompt
    assert (df["completion_tokens"] == 3).all()
    last = log.read_text().strip().splitlines()
    assert any(ln.endswith("layer 0: 12 features: 0 ok, 12 unparsed, 0 failed") for ln in last)
    # Whole answers: the wired explanation, and scores from its five predictions (fuzzing's
    # first batch holds 5 of each feature's 6 samples; detection has 5 samples, 3 held out
    # and 2 inactive windows, only for feature 3 and those not coded in the pool, 4-11).
    df = pl.read_parquet(whole)
    assert set(df["status"]) == {"ok"} and set(df["explanation"]) == {EXPLAINER_ANSWER[-1]}
    assert df["fuzzing"].is_not_null().all() and df["fuzzing"].is_between(0, 1).all()
    scored = df.filter(pl.col("detection").is_not_null())["feature"].to_list()
    assert scored == [3, *range(4, 12)]
    assert last[-1].endswith("layer 0: 12 features: 12 ok, 0 unparsed, 0 failed")


def test_a_server_that_cannot_start_is_one_line(tmp_path):
    """explain.model that transformers serve cannot load (offline, no such folder or id): the
    job says so in one line naming the server's log, and leaves no server behind."""
    from loupe.explain_server import embedded_server

    log = tmp_path / "server.log"
    with pytest.raises(
        LoupeError, match=r"transformers serve .* exited \(code \d+\) while starting"
    ):
        with embedded_server(str(tmp_path / "no-such-model"), "cpu", log):
            pass
    assert log.read_text()  # the server's own words are kept


def test_the_cost_projection_is_the_stated_arithmetic():
    """benchmarks/explain_cost.py: tokens per feature x features, at the stated rates."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from benchmarks import explain_cost as ec

    pf = {
        "explain": {"prompt_tokens": 1000, "uncached_prompt_tokens": 400, "completion_tokens": 40},
        "score": {"prompt_tokens": 6000, "uncached_prompt_tokens": 1200, "completion_tokens": 50},
    }
    p = ec.project(pf)
    explained, scored = 35 * 49_152, 35 * 1000
    uncached = 400 * explained + 1200 * scored
    completion = 40 * explained + 50 * scored
    assert p["uncached_prompt_tokens"] == uncached
    assert p["h100_hours_prefill"] == pytest.approx(uncached / 18_750 / 3600)
    assert p["h100_hours"] == pytest.approx(uncached / 18_750 / 3600 + completion / 5000 / 3600)
    prompt = 1000 * explained + 6000 * scored
    assert p["api_usd"] == pytest.approx((prompt * 0.05 + completion * 0.08) / 1e6)
    assert p["goal_met"] == (p["h100_hours"] <= 20) and p["stopping_term"] == "prefill"


@pytest.mark.e2e
def test_the_demo_explains_every_layer_through_its_embedded_server(demo_run, config):
    """The demo's default target: each layer's features explained by the wired explainer
    served by the job itself, a sample scored, the statuses counted in the job's last log
    line; staged, with the card's section and the scores' plot."""
    from loupe.demo import EXPLAINER_ANSWER

    results = demo_run / "results"
    explain_settings = config["explain"]
    for layer in config["model"]["layers"]:
        df = pl.read_parquet(results / f"layer_{layer}/explanations.parquet")
        assert df.height == explain_settings["features"] and set(df["status"]) == {"ok"}
        assert set(df["explanation"]) == {EXPLAINER_ANSWER[-1]}
        assert df["fuzzing"].is_not_null().sum() <= explain_settings["score_features"]
        assert df["detection"].is_not_null().sum() + df["fuzzing"].is_not_null().sum() > 0
        log = (results / f"layer_{layer}/explain.log").read_text().strip().splitlines()
        assert log[-1].endswith(
            f"layer {layer}: {df.height} features: {df.height} ok, 0 unparsed, 0 failed"
        )
        assert "ready after" in "\n".join(log)  # the job served the explainer itself
        prefix = config["hub"]["prefix"]
        staged = results / f"hub/{prefix}/explanations/layer_{layer}.parquet"
        assert staged.read_bytes() == (results / f"layer_{layer}/explanations.parquet").read_bytes()
    card = (results / "hub/README.md").read_text()
    assert "## Explanations" in card and "**These explanations are noise.**" in card
    assert (results / "summary/explanation_scores_by_layer.png").stat().st_size > 0


@pytest.mark.e2e
def test_through_snakemake_the_key_is_read_from_the_environment_and_written_nowhere(
    demo_run, server, tmp_path, monkeypatch
):
    """The finished demo's layer 0 explained again at an endpoint taking a key: Snakemake's
    job reads it from the variable explain.api_key_env names and sends it as a Bearer token;
    no file of the run holds it. With the variable unset the job fails in one line and leaves
    no explanations."""
    work = Path(shutil.copytree(demo_run, tmp_path / "run", symlinks=True))
    record = work / "results/checkpoints/layer_0/explain_requests.jsonl"
    record.unlink()  # the answers paid for: without them every request is sent again
    (work / "endpoint.yaml").write_text(
        f"explain:\n  base_url: {server.url}\n  api_key_env: LOUPE_TEST_KEY\n"
    )
    target = "results/layer_0/explanations.parquet"
    args = (target, "--force", "--profile", "profiles/demo", "--configfile")
    args += ("profiles/demo/demo-config.yaml", "endpoint.yaml")

    monkeypatch.delenv("LOUPE_TEST_KEY", raising=False)
    proc = run_snakemake(work, *args, check=False)
    assert proc.returncode == 1 and not (work / target).exists() and server.requests == 0
    assert [job.rule for job in announced_jobs(proc.stdout + proc.stderr)] == ["explain"]
    log = (work / "results/layer_0/explain.log").read_text().splitlines()
    unset = "explain.api_key_env names LOUPE_TEST_KEY, which is unset"
    assert log[-1] == f"loupe explain: error: {unset}"
    assert "Traceback" not in "\n".join(log)

    secret = "sk-loupe-e2e-5f3a9c1e77d04b28"
    monkeypatch.setenv("LOUPE_TEST_KEY", secret)
    proc = run_snakemake(work, *args)
    assert [job.rule for job in announced_jobs(proc.stdout + proc.stderr)] == ["explain"]
    explanations = pl.read_parquet(work / target)
    assert explanations.height == demo_config()["explain"]["features"]
    assert set(explanations["status"]) == {"ok"}
    # Every request was sent (once: each answer is recorded), each with the key.
    assert server.requests == len(record.read_text().splitlines()) > explanations.height
    assert set(server.sent.values()) == {1}
    assert set(server.keys) == {f"Bearer {secret}"}
    assert secret not in proc.stdout + proc.stderr
    for root, _, files in os.walk(work):  # .snakemake/ and the logs included
        for name in files:
            path = Path(root, name)
            if path.is_file():  # a broken link holds nothing
                assert secret.encode() not in path.read_bytes(), path
