"""The static feature browser in a real browser (Debian's chromium, headless, driven by
Playwright): it shows what the parquet files hold, fetches only the shown feature's row groups,
finds features by token, and reads a Hub repo by name; plus the local server's Range support."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote

import pyarrow.parquet as pq
import pytest
from browser_repo import build_synthetic_repo

from loupe.browse import ASSETS, make_server, serve, space_folder, suite_manifest
from loupe.errors import LoupeError

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LAYER, FEATURE = 3, 200  # 448 features in 7 row groups: 200 sits in the fourth
HUB_REPO = "someone/tiny-saes"
HUB_BASE = f"https://huggingface.co/{HUB_REPO}/resolve/main/"
SCREENSHOT_COPY = Path("/tmp/loupe/browser.png")  # for a person to look at


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    build_synthetic_repo(root)
    return root


@pytest.fixture(scope="module")
def suite(repo) -> dict:
    return json.loads((repo / "browser/suite.json").read_text())


@pytest.fixture(scope="module")
def page_url(repo):
    server, url = serve(repo)
    yield url
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    exe = shutil.which("chromium")
    if exe is None:
        reason = "Debian's chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI installs it: a missing browser is a broken setup there
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # The system chromium, not a Playwright download (none can be fetched here).
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.errors = []  # what the page reported as going wrong; every test expects none

    def console(message):
        # Headless chromium asks for /favicon.ico whatever the page says; that 404 is no fault.
        if message.type == "error" and not message.location.get("url", "").endswith(".ico"):
            page.errors.append(message.text)

    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("console", console)
    yield page
    context.close()


def rows_of(repo: Path, rel: str, feature: int) -> list[dict]:
    return pq.read_table(repo / rel, filters=[("feature", "==", feature)]).to_pylist()


def open_feature(page, url: str, layer: int, feature: int) -> dict:
    page.goto(f"{url}{'&' if '?' in url else '?'}layer={layer}&feature={feature}")
    page.wait_for_function(
        f"window.loupeState?.status === 'error' || "
        f"(window.loupeState?.status === 'ready' && window.loupeState.feature === {feature})",
        timeout=20_000,
    )
    state = page.evaluate("window.loupeState")
    assert state["status"] == "ready", state.get("error")
    assert page.errors == []
    return state


def shown_histogram(page) -> list[int]:
    return page.eval_on_selector_all(
        "#histogram rect", "els => els.map(e => Number(e.textContent.split(': ').pop()))"
    )


def nonzero_span(counts: list[int]) -> list[int]:
    """The columns from the first nonzero count to the last: what the page draws."""
    nonzero = [i for i, c in enumerate(counts) if c]
    return counts[nonzero[0] : nonzero[-1] + 1]


def tokens_in(page, selector: str) -> list[str]:
    return page.eval_on_selector_all(selector, "els => els.map(e => e.dataset.token)")


def test_feature_page_shows_what_the_parquet_files_hold(page, page_url, repo, suite, tmp_path):
    files = suite["files"][str(LAYER)]
    examples = sorted(rows_of(repo, files["examples"], FEATURE), key=lambda r: -r["activation"])
    intervals = rows_of(repo, files["intervals"], FEATURE)
    logits = rows_of(repo, files["logits"], FEATURE)
    (stats,) = rows_of(repo, files["stats"], FEATURE)
    top = examples[0]

    state = open_feature(page, page_url, LAYER, FEATURE)

    assert abs(float(page.inner_text("#top-activation")) - top["activation"]) <= 5e-4
    assert page.get_attribute("#top-token .chip", "data-token") == top["token"]
    assert state["topToken"] == top["token"]
    for sign in ("positive", "negative"):
        want = [r["token"] for r in sorted(logits, key=lambda r: r["rank"]) if r["sign"] == sign]
        assert len(want) == 10
        assert tokens_in(page, f"#logits-{sign} .chip") == want
    density = float(page.inner_text("#density").rstrip("%")) / 100
    assert density == pytest.approx(stats["density"], rel=1e-2)

    # Every example row, each token shaded by its activation, exactly one peak per row.
    shown = page.eval_on_selector_all(
        "#examples .example",
        """rows => rows.map(r => ({
            act: Number(r.querySelector('.act').textContent),
            tokens: r.querySelectorAll('.tok').length,
            peaks: [...r.querySelectorAll('.tok.peak')].map(p => Number(p.dataset.act)),
            titled: [...r.querySelectorAll('.tok')].every(t => /activation -?[0-9.]+/.test(t.title)),
        }))""",
    )
    assert len(shown) == len(examples)
    for row, want in zip(shown, examples, strict=True):
        assert row["act"] == pytest.approx(want["activation"], abs=5e-4)
        assert row["tokens"] == len(json.loads(want["context_tokens"]))
        assert row["peaks"] == [pytest.approx(want["activation"], rel=1e-6)]
        assert row["titled"]

    # Whitespace and partial UTF-8 stay visible, one marker per character.
    context = [t for r in examples for t in json.loads(r["context_tokens"])]
    newlines = sum(t.count("\n") for t in context)
    partial = sum(t.count("\ufffd") for t in context)
    assert newlines and partial  # the synthetic vocabulary makes both
    marks = page.eval_on_selector_all("#examples .ws", "els => els.map(e => e.textContent)")
    assert marks.count("↵") == newlines
    assert page.locator("#examples .partial").count() == partial

    assert shown_histogram(page) == nonzero_span(stats["histogram"])

    shown_bins = page.eval_on_selector_all(
        "#intervals details", "els => els.map(e => Number(e.dataset.interval))"
    )
    assert sorted(shown_bins) == sorted({r["interval"] for r in intervals})
    assert page.locator("#intervals .example").count() == len(intervals)

    shot = tmp_path / "browser.png"
    page.screenshot(path=str(shot), full_page=True)
    SCREENSHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT_COPY)


def test_page_fetches_only_the_row_groups_of_the_feature(page, page_url, repo, suite):
    rel = suite["files"][str(LAYER)]["examples"]
    size = (repo / rel).stat().st_size
    groups = pq.ParquetFile(repo / rel).metadata.num_row_groups
    assert groups >= 5  # else reading one group is no small fraction

    open_feature(page, page_url, LAYER, FEATURE)
    fetched = page.evaluate("window.loupeFetched")
    got = fetched[page_url.replace("browser/index.html", rel)]
    print(
        f"\nmax_activations: fetched {got} of {size} bytes ({got / size:.1%}), {groups} row groups"
    )
    assert 0 < got < 0.25 * size


def test_token_search_finds_features_by_their_top_token(page, page_url, repo, suite):
    files = suite["files"][str(LAYER)]
    top = max(rows_of(repo, files["examples"], FEATURE), key=lambda r: r["activation"])
    query = top["token"].strip().lower()
    assert query, f"feature {FEATURE}'s top token {top['token']!r} is all whitespace"
    # Oracle: every feature with the token among its example peaks or its logits.
    want = {
        r["feature"]
        for kind in ("examples", "logits")
        for r in pq.read_table(repo / files[kind], columns=["feature", "token"]).to_pylist()
        if r["token"].strip().lower() == query
    }

    open_feature(page, page_url, LAYER, 0)
    page.fill("#query", top["token"])
    page.press("#query", "Enter")
    page.wait_for_function(
        "window.loupeState.search && window.loupeState.status !== 'loading'", timeout=20_000
    )
    state = page.evaluate("window.loupeState")
    assert state["status"] == "ready", state.get("error")
    assert FEATURE in state["search"]["features"]
    assert set(state["search"]["features"]) == want

    page.click(f"#result-list a[data-feature='{FEATURE}']")
    page.wait_for_function(
        f"window.loupeState.status === 'ready' && window.loupeState.feature === {FEATURE}"
    )
    assert page.get_attribute("#top-token .chip", "data-token") == top["token"]
    assert page.errors == []


def route_hub(page, repo: Path) -> list[str]:
    """Answer https://huggingface.co/{HUB_REPO}/resolve/main/... from the local repo, with the
    CORS and Range headers the Hub sends; returns the URLs asked for (filled as they come)."""
    asked = []
    cors = {
        "access-control-allow-origin": "*",
        "access-control-expose-headers": "Content-Range, Content-Length, Accept-Ranges",
    }

    def hub(route, request):
        asked.append(request.url)
        if request.method == "OPTIONS":
            headers = {**cors, "access-control-allow-headers": "range"}
            return route.fulfill(status=204, headers=headers)
        assert request.url.startswith(HUB_BASE), request.url
        data = (repo / unquote(request.url[len(HUB_BASE) :])).read_bytes()
        span = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("range", ""))
        if span is None:
            return route.fulfill(status=200, headers=cors, body=data)
        first = int(span[1])
        last = min(int(span[2]) if span[2] else len(data) - 1, len(data) - 1)
        headers = {**cors, "content-range": f"bytes {first}-{last}/{len(data)}"}
        route.fulfill(status=206, headers=headers, body=data[first : last + 1])

    page.route("https://huggingface.co/**", hub)
    return asked


def test_page_reads_a_hub_repo_named_in_the_url(page, page_url, repo, suite):
    """?repo=owner/name&revision=main reads https://huggingface.co/owner/name/resolve/main/."""
    asked = route_hub(page, repo)
    layer, feature = 0, 70  # layer 0's histogram has bins + 1 edges, layer 3's open ends
    files = suite["files"][str(layer)]
    top = max(rows_of(repo, files["examples"], feature), key=lambda r: r["activation"])
    (stats,) = rows_of(repo, files["stats"], feature)
    state = open_feature(page, f"{page_url}?repo={HUB_REPO}&revision=main", layer, feature)
    assert state["base"] == HUB_BASE
    assert state["topToken"] == top["token"]
    assert shown_histogram(page) == nonzero_span(stats["histogram"])
    assert f"{HUB_BASE}browser/suite.json" in asked
    fetched = page.evaluate("window.loupeFetched")
    assert fetched and all(url.startswith(HUB_BASE) for url in fetched)


def test_the_space_copy_reads_the_model_repo_it_names(page, repo, suite, tmp_path):
    """The static Space hub.space publishes: the page, no data, set to read the model repo. Its
    own site has no suite.json, so only the repo it names can make the feature appear."""
    space = space_folder(repo, tmp_path / "site" / "browser", HUB_REPO, "main")
    assert not (space / "suite.json").exists()
    front = (space / "README.md").read_text().split("---")[1]
    assert "sdk: static" in front and "app_file: index.html" in front and HUB_REPO in front
    asked = route_hub(page, repo)
    server, url = serve(tmp_path / "site")
    try:
        files = suite["files"][str(LAYER)]
        top = max(rows_of(repo, files["examples"], FEATURE), key=lambda r: r["activation"])
        state = open_feature(page, url, LAYER, FEATURE)  # no ?repo=: the page's own setting
    finally:
        server.shutdown()
        server.server_close()
    assert state["base"] == HUB_BASE and state["topToken"] == top["token"]
    assert f"{HUB_BASE}browser/suite.json" in asked


def _get(url: str, headers: dict | None = None, method: str = "GET"):
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req) as res:
            return res.status, dict(res.headers), res.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_server_answers_range_requests_like_a_static_host(repo, suite, page_url):
    rel = suite["files"][str(LAYER)]["examples"]
    data = (repo / rel).read_bytes()
    n = len(data)
    url = page_url.replace("browser/index.html", rel)

    status, headers, body = _get(url)
    assert (status, body, headers["Accept-Ranges"]) == (200, data, "bytes")
    for asked, first, last in [
        ("10-19", 10, 19),
        (f"{n - 5}-", n - 5, n - 1),
        ("-100", n - 100, n - 1),
        (f"7-{n + 50}", 7, n - 1),
    ]:
        status, headers, body = _get(url, {"Range": f"bytes={asked}"})
        assert status == 206, asked
        assert headers["Content-Range"] == f"bytes {first}-{last}/{n}"
        assert body == data[first : last + 1]
        assert int(headers["Content-Length"]) == last - first + 1
    status, headers, _ = _get(url, {"Range": f"bytes={n}-"})
    assert (status, headers["Content-Range"]) == (416, f"bytes */{n}")
    status, headers, body = _get(url, {"Range": "bytes=0-1"}, method="HEAD")
    assert (status, headers["Content-Length"], body) == (206, "2", b"")

    status, headers, _ = _get(page_url.replace("index.html", "vendor/fzstd/esm/index.mjs"))
    assert (status, headers["Content-Type"]) == (200, "text/javascript")


def test_server_and_suite_refuse_a_repo_without_the_browser(tmp_path):
    with pytest.raises(LoupeError, match="browser/index.html"):
        make_server(tmp_path)
    with pytest.raises(LoupeError, match="no max_activations"):
        suite_manifest(tmp_path, "sae-x", [0, 1], 16, "model")


def test_browse_command_serves_until_interrupted(repo):
    proc = subprocess.Popen(
        [sys.executable, "-m", "loupe", "browse", "--repo", str(repo), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://\S+/browser/index\.html", line)
        assert url, line + proc.stderr.read()
        status, _, body = _get(url[0])
        assert status == 200
        assert b'src="app.js"' in body
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.e2e
def test_the_staged_demo_repo_in_the_browser(page, demo_run, tmp_path):
    """What a user gets from `snakemake browse` on the demo: layer 3's strongest feature
    shows the parquet's top activation, top token and top logit tokens, and reading it
    costs a small fraction of the examples file."""
    hub = demo_run / "results/hub"
    suite = json.loads((hub / "browser/suite.json").read_text())
    files = suite["files"]["3"]
    assert set(files) == {"examples", "intervals", "stats", "logits", "neighbours"}
    stats = pq.read_table(hub / files["stats"]).to_pylist()
    feature = max(stats, key=lambda r: r["fire_count"] if r["examples"] > 1 else -1)["feature"]
    examples = rows_of(hub, files["examples"], feature)
    top = max(examples, key=lambda r: r["activation"])
    logits = rows_of(hub, files["logits"], feature)

    server, url = serve(hub)
    try:
        state = open_feature(page, url, 3, feature)
        assert abs(float(page.inner_text("#top-activation")) - top["activation"]) <= 5e-4
        assert state["topToken"] == top["token"]
        for sign in ("positive", "negative"):
            want = [
                r["token"] for r in sorted(logits, key=lambda r: r["rank"]) if r["sign"] == sign
            ]
            assert tokens_in(page, f"#logits-{sign} .chip") == want
        assert page.locator("#examples .example").count() == len(examples)
        got = page.evaluate("window.loupeFetched")[
            url.replace("browser/index.html", files["examples"])
        ]
        size = (hub / files["examples"]).stat().st_size
        print(f"\ndemo layer 3 feature {feature}: fetched {got} of {size} bytes ({got / size:.1%})")
        assert 0 < got < 0.3 * size
        shot = tmp_path / "demo-browser.png"
        page.screenshot(path=str(shot), full_page=True)
        SCREENSHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT_COPY.with_name("browser-demo.png"))
    finally:
        server.shutdown()
        server.server_close()


def test_server_stays_in_its_folder_and_answers_only_its_own_host(tmp_path):
    """Issue 27 #4: a symlink in the repo pointing outside was served, folders were listed
    (/etc through a symlink to /), and any Host header was answered (DNS rebinding)."""
    site = tmp_path / "site"
    (site / "browser").mkdir(parents=True)
    (site / "browser" / "index.html").write_text("<p>page</p>")
    (site / "data").mkdir()
    (site / "data" / "a.txt").write_text("inside")
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    (site / "leak.txt").symlink_to(secret)
    (site / "root").symlink_to("/")
    (site / "passwd").symlink_to("/etc/passwd")
    server, url = serve(site)
    base = url.removesuffix("browser/index.html")
    port = server.server_address[1]
    try:
        assert _get(base + "data/a.txt")[::2] == (200, b"inside")
        assert _get(base + "browser/")[::2] == (200, b"<p>page</p>")
        for path in ("leak.txt", "passwd", "root/etc/passwd", "root/", "root/etc/", "data/", ""):
            status, _, body = _get(base + path)
            assert status == 404 and b"outside" not in body and b"root:" not in body, path
            assert b"Directory listing" not in body, path
        for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}"):
            status, _, body = _get(base + "data/a.txt", {"Host": host})
            assert status == 403 and b"inside" not in body, host
        assert _get(base + "data/a.txt", {"Host": f"localhost:{port}"})[0] == 200
    finally:
        server.shutdown()
        server.server_close()
    assert secret.read_text() == "outside" and (site / "data" / "a.txt").read_text() == "inside"


def test_the_page_never_turns_data_into_markup():
    """README: data read through ?base= or ?repo= (any origin) is shown as text. The page's
    own scripts set no HTML from strings; markup in a token is rendered as text (the e2e
    browser tests show tokens through textContent)."""
    sinks = re.compile(
        r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function"
    )
    for script in sorted(ASSETS.glob("*.js")):
        assert not sinks.search(script.read_text()), script.name
