"""The static feature browser in a real browser (Debian's chromium, headless, driven by
Playwright): it shows what the parquet files hold, fetches only the shown feature's pages,
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
from math import inf
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from browser_repo import (
    MODEL,
    PREFIX,
    build_synthetic_repo,
    build_wide_repo,
    explanation_rows,
    write_explanations,
    write_groups,
)

from loupe.browse import ASSETS, install_browser, make_server, serve, space_folder, suite_manifest
from loupe.errors import LoupeError
from loupe.examples import PAGE_ROWS, column_descriptions
from loupe.layout import PER_LAYER

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LAYER, FEATURE = 3, 200  # 448 features in one row group of 8,960 rows, pages of 256 rows
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


def histogram_edges(path: Path) -> list[float]:
    return json.loads(pq.read_schema(path).metadata[b"loupe"])["histogram_edges"]


def check_histogram_axes(page, counts: list[int], edges: list[float]) -> None:
    """Issue 26 #5: the histogram's axes carry values: the activation at the edges of the
    columns drawn (the first's low edge, the last's high edge) and the counts 0 and the most."""
    n = len(counts)
    if len(edges) == n + 1:
        bounds = [(edges[i], edges[i + 1]) for i in range(n)]
    else:  # edges between columns: an underflow column from 0, an overflow one to infinity
        assert len(edges) == n - 1
        bounds = [(edges[i - 1] if i else 0.0, edges[i] if i < n - 1 else inf) for i in range(n)]
    nonzero = [i for i, c in enumerate(counts) if c]
    x = page.eval_on_selector_all(
        "#histogram .x-tick", "ts => ts.map(t => [Number(t.dataset.value), t.textContent])"
    )
    assert len(x) >= 2 and all(text for _, text in x)
    assert x[0][0] == pytest.approx(bounds[nonzero[0]][0])
    assert x[-1][0] == pytest.approx(bounds[nonzero[-1]][1])
    assert [v for v, _ in x] == sorted(v for v, _ in x)
    y = page.eval_on_selector_all(
        "#histogram .y-tick", "ts => ts.map(t => [Number(t.dataset.value), t.textContent])"
    )
    most = max(counts)
    assert y[0] == [0, "0"] and y[-1] == [most, f"{most:,}"]
    titles = page.eval_on_selector_all("#histogram .axis-title", "ts => ts.map(t => t.textContent)")
    assert titles == ["activation", "count (log)"]


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
    # Each summary label's tooltip is its column's description in the parquet file's schema.
    described = {
        kind: column_descriptions(pq.read_schema(repo / files[kind]))
        for kind in ("examples", "stats")
    }
    titles = page.eval_on_selector_all(
        "#summary dt", "ts => Object.fromEntries(ts.map(t => [t.textContent, t.title]))"
    )
    assert titles["top activation"] == described["examples"]["activation"] != ""
    assert titles["density"] == described["stats"]["density"] != ""
    assert titles["fires on"] == described["stats"]["fire_count"] != ""

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
    check_histogram_axes(page, stats["histogram"], histogram_edges(repo / files["stats"]))

    shown_bins = page.eval_on_selector_all(
        "#intervals details", "els => els.map(e => Number(e.dataset.interval))"
    )
    assert sorted(shown_bins) == sorted({r["interval"] for r in intervals})
    assert page.locator("#intervals .example").count() == len(intervals)

    # A repo without explanations: no explanation block, no search by explanation.
    assert page.is_hidden("#explanation")
    assert page.is_hidden("#search-by option[value='explanation']")

    shot = tmp_path / "browser.png"
    page.screenshot(path=str(shot), full_page=True)
    SCREENSHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT_COPY)


def wait_invalid(page) -> str:
    page.wait_for_function("window.loupeState?.status === 'invalid'", timeout=20_000)
    assert page.is_hidden("#feature-view") and page.evaluate("window.loupeState.feature") is None
    return page.inner_text("#notice")


def test_a_feature_id_out_of_range_or_not_a_number_names_the_valid_range(page, page_url, suite):
    """Issue 26 #5: an out-of-range feature id silently showed the last feature."""
    last = suite["num_latents"] - 1
    page.goto(f"{page_url}?layer={LAYER}&feature={last + 1}")
    assert wait_invalid(page) == f"no feature {last + 1}: layer {LAYER} has features 0 to {last}"
    page.goto(f"{page_url}?layer={LAYER}&feature=abc")
    assert (
        wait_invalid(page) == f'"abc" is not a feature id: layer {LAYER} has features 0 to {last}'
    )
    open_feature(page, page_url, LAYER, 7)
    for typed, message in [
        ("99999", f"no feature 99999: layer {LAYER} has features 0 to {last}"),
        ("-3", f'"-3" is not a feature id: layer {LAYER} has features 0 to {last}'),
        ("2.5", f'"2.5" is not a feature id: layer {LAYER} has features 0 to {last}'),
    ]:
        page.fill("#feature", typed)
        page.press("#feature", "Enter")
        assert wait_invalid(page) == message
        assert page.inner_text("#status") == message
    page.fill("#feature", str(last))
    page.press("#feature", "Enter")
    page.wait_for_function(
        f"window.loupeState.status === 'ready' && window.loupeState.feature === {last}"
    )
    assert page.is_hidden("#notice") and page.is_visible("#feature-view")
    page.click("#next")  # the last feature's ▶ stays there
    page.wait_for_function("window.loupeState.status === 'ready'")
    assert page.evaluate("window.loupeState.feature") == last
    assert page.errors == []


def listed(page, by: str, order: str) -> dict:
    """List the shown layer's features from the form; the page's listing state."""
    page.select_option("#list-by", by)
    page.select_option("#list-order", order)
    page.click("#list button[type=submit]")
    return wait_listed(page, by, 1)


def wait_listed(page, by: str, number: int) -> dict:
    page.wait_for_function(
        f"window.loupeState.list?.by === {json.dumps(by)} && window.loupeState.list.page === {number}"
        " && window.loupeState.status === 'ready'",
        timeout=20_000,
    )
    state = page.evaluate("window.loupeState.list")
    links = page.eval_on_selector_all(
        "#result-list a", "links => links.map(a => Number(a.dataset.feature))"
    )
    assert links == state["features"]
    return state


def sorted_features(rows: list[dict], key: str, descending: bool) -> list[int]:
    """Features by `key` (those without a value last), ties by feature id: the page's order."""
    sign = -1 if descending else 1

    def order(r):
        missing = r[key] is None
        return (missing, 0 if missing else sign * r[key], r["feature"])

    return [r["feature"] for r in sorted(rows, key=order)]


def test_a_layers_features_are_listed_sorted_and_paged_from_feature_stats(
    page, page_url, repo, suite
):
    """Issue 26 #5: a layer's features listed by density and by maximum activation, in pages,
    each a link; read from feature_stats alone, never the per-feature example files."""
    files = suite["files"][str(LAYER)]
    stats = pq.read_table(repo / files["stats"]).to_pylist()
    open_feature(page, page_url, LAYER, 0)
    before = page.evaluate("window.loupeRequests")

    by_density = sorted_features(stats, "density", descending=True)
    state = listed(page, "density", "desc")
    assert (state["pages"], state["features"]) == (5, by_density[:100])
    density = {r["feature"]: r["density"] for r in stats}
    assert state["values"] == [density[f] for f in state["features"]]
    page.click("#page-next")
    assert wait_listed(page, "density", 2)["features"] == by_density[100:200]

    by_max = sorted_features(stats, "max_activation", descending=False)
    state = listed(page, "max_activation", "asc")
    assert state["features"] == by_max[:100]
    assert state["features"][0] % 23 == 5  # dead features (max 0) first, lowest id first

    after = page.evaluate("window.loupeRequests")
    read = {url.rsplit("/", 2)[1] for url, n in after.items() if n != before.get(url, 0)}
    assert read <= {PER_LAYER["stats"]}, read  # (this small file came whole with its footer)

    # The listing is in the URL: a link to page 3 of a listing opens it.
    page.goto(f"{page_url}?layer={LAYER}&feature=1&list=max_activation&order=asc&page=3")
    assert wait_listed(page, "max_activation", 3)["features"] == by_max[200:300]
    page.click(f"#result-list a[data-feature='{by_max[201]}']")
    page.wait_for_function(
        f"window.loupeState.status === 'ready' && window.loupeState.feature === {by_max[201]}"
    )
    assert page.errors == []


def test_page_fetches_only_the_pages_of_the_feature(page, page_url, repo, suite):
    rel = suite["files"][str(LAYER)]["examples"]
    size = (repo / rel).stat().st_size
    meta = pq.ParquetFile(repo / rel).metadata
    pages = meta.num_rows / PAGE_ROWS
    assert pages >= 5  # else reading one page is no small fraction
    groups = meta.num_row_groups

    open_feature(page, page_url, LAYER, FEATURE)
    fetched = page.evaluate("window.loupeFetched")
    got = fetched[page_url.replace("browser/index.html", rel)]
    print(
        f"\nmax_activations: fetched {got} of {size} bytes ({got / size:.1%}), {groups} row groups, {pages:.0f} pages"
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


@pytest.fixture(scope="module")
def wide_repo(tmp_path_factory):
    """One layer at gemma-loupe's width (49,152 features; 768 row groups in the old layout)."""
    root = tmp_path_factory.mktemp("wide")
    suite = build_wide_repo(root)
    server, url = serve(root)
    yield root, suite, url
    server.shutdown()
    server.server_close()


def parquet_loads(page) -> dict:
    """The page's parquet requests as Chromium's Resource Timing records them (independent of
    the page's own counters): how many, their bytes, and the most that overlapped in time."""
    entries = page.evaluate(
        """performance.getEntriesByType('resource').filter(e => e.name.endsWith('.parquet'))
            .map(e => [e.startTime, e.responseEnd, e.encodedBodySize])"""
    )
    edges = sorted([(start, 1) for start, _, _ in entries] + [(end, -1) for _, end, _ in entries])
    now = most = 0
    for _, step in edges:  # an end at the same instant as a start counts first
        now += step
        most = max(most, now)
    return {"requests": len(entries), "bytes": sum(e[2] for e in entries), "max": most}


def features_with_token(repo: Path, files: dict, token: str) -> set[int]:
    """Every feature with `token` among its example peaks or its logits: what a search finds."""
    return {
        r["feature"]
        for kind in ("examples", "logits")
        for r in pq.read_table(repo / files[kind], columns=["feature", "token"]).to_pylist()
        if r["token"] == token
    }


def watch_requests(page) -> dict:
    """Count the page's parquet requests in flight as Chromium issues and finishes them."""
    seen = {"now": 0, "max": 0}

    def started(request):
        if request.url.endswith(".parquet"):
            seen["now"] += 1
            seen["max"] = max(seen["max"], seen["now"])

    def ended(request):
        if request.url.endswith(".parquet"):
            seen["now"] -= 1

    page.on("request", started)
    page.on("requestfinished", ended)
    page.on("requestfailed", ended)
    return seen


def test_first_view_of_a_wide_layer_reads_little(page, wide_repo):
    """Issue 26 #2: at 49,152 features the first feature of a layer cost 6.19 MB, 5.65 MB of
    it the footers of 768 row groups. Now under 1 MB, and the next feature ~nothing more."""
    repo, suite, url = wide_repo
    files = suite["files"]["3"]
    page.add_init_script("performance.setResourceTimingBufferSize(100000)")
    seen = watch_requests(page)
    feature = 30_001
    want = sorted(rows_of(repo, files["examples"], feature), key=lambda r: r["rank"])
    state = open_feature(page, url, 3, feature)
    first = dict(seen)
    assert state["examples"] == len(want) == 4
    assert state["topActivation"] == pytest.approx(max(r["activation"] for r in want), abs=1e-6)
    first = parquet_loads(page)
    assert (
        page.evaluate("Object.values(window.loupeFetched).reduce((a, b) => a + b)")
        == first["bytes"]
    )
    per_file = page.evaluate("window.loupeFetched")
    print(
        f"\nwide layer, first view: {first['bytes']} B in {first['requests']} requests",
        {u.rsplit("/", 2)[1]: b for u, b in per_file.items()},
    )
    assert 0 < first["bytes"] < 1_000_000
    assert first["max"] <= 6 and seen["max"] <= 6, (first, seen)

    page.click("#next")  # 30,002 shares its pages with 30,001 or sits in the next ones
    page.wait_for_function(
        "window.loupeState.status === 'ready' && window.loupeState.feature === 30002"
    )
    now = parquet_loads(page)
    more = now["bytes"] - first["bytes"]
    print(f"next feature: {more} B in {now['requests'] - first['requests']} requests")
    assert more < 60_000
    assert page.errors == []


def test_search_of_a_wide_layer_keeps_its_requests_bounded(page, wide_repo):
    """Issue 26 #1: a search fired ~3,000 range requests at once at 49,152 features and
    Chromium refused them. Now at most 6 are in flight, it reads only the token columns, and
    the status line says how far it got."""
    repo, suite, url = wide_repo
    files = suite["files"]["3"]
    page.add_init_script("performance.setResourceTimingBufferSize(100000)")
    open_feature(page, url, 3, 0)
    seen = watch_requests(page)
    before = parquet_loads(page)
    query = " Paris"
    want = features_with_token(repo, files, query)
    # What the token columns weigh: a search reads those and nothing else.
    columns = {"examples": {"feature", "token"}, "logits": {"feature", "sign", "token"}}
    budget = 0
    for kind, names in columns.items():
        meta = pq.ParquetFile(repo / files[kind]).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                chunk = meta.row_group(g).column(c)
                if chunk.path_in_schema in names:
                    budget += chunk.total_compressed_size
    statuses = []
    page.expose_function("noteStatus", lambda text: statuses.append(text))
    page.evaluate(
        "new MutationObserver(() => noteStatus(document.getElementById('status').textContent))"
        ".observe(document.getElementById('status'), {childList: true, characterData: true, subtree: true})"
    )
    page.fill("#query", query)
    page.press("#query", "Enter")
    page.wait_for_function(
        "window.loupeState.search && window.loupeState.status !== 'loading'", timeout=60_000
    )
    state = page.evaluate("window.loupeState")
    assert state["status"] == "ready", state.get("error")
    assert set(state["search"]["features"]) == want and len(want) > 100
    after = parquet_loads(page)
    spent = after["bytes"] - before["bytes"]
    print(
        f"\nwide layer search: {spent} B in {after['requests'] - before['requests']} requests,"
        f" at most {after['max']} in flight; token columns {budget} B"
    )
    assert after["max"] <= 6 and seen["max"] <= 6 and state["maxInFlight"] <= 6
    assert spent <= 1.1 * budget + 100_000
    progress = [t for t in statuses if re.search(r"read \d+ of 96 row groups", t)]
    assert progress, statuses[:5]
    assert page.errors == []


def test_search_and_feature_view_do_not_cancel_each_other(page, wide_repo):
    """Issue 25: a search and the feature view hold separate request tickets: showing other
    features while a search of a wide layer is still reading leaves the search to finish, and
    the search leaves the features shown."""
    repo, suite, url = wide_repo
    files = suite["files"]["3"]
    query = " London"
    want = features_with_token(repo, files, query)
    open_feature(page, url, 3, 0)
    page.fill("#query", query)
    page.press("#query", "Enter")
    page.wait_for_function("window.loupeState.searchProgress?.done >= 1")
    for f in (1, 2):
        page.click("#next")
        page.wait_for_function(
            f"document.getElementById('title').textContent === 'Layer 3 · feature {f}'"
        )
    assert page.evaluate("window.loupeState.search") is None  # still reading
    page.wait_for_function(
        "window.loupeState.search && window.loupeState.status !== 'loading'", timeout=60_000
    )
    state = page.evaluate("window.loupeState")
    assert set(state["search"]["features"]) == want and state["feature"] == 2
    assert page.inner_text("#title") == "Layer 3 · feature 2"
    assert page.errors == []


def test_listing_a_wide_layer_reads_feature_stats_only(page, wide_repo):
    """At 49,152 features the listing reads three columns of feature_stats and nothing else."""
    repo, suite, url = wide_repo
    stats = pq.read_table(repo / suite["files"]["3"]["stats"], columns=["feature", "density"])
    open_feature(page, url, 3, 0)
    before = page.evaluate("[window.loupeRequests, window.loupeFetched]")
    state = listed(page, "density", "desc")
    assert state["pages"] == 492
    assert state["features"] == sorted_features(stats.to_pylist(), "density", True)[:100]
    requests, fetched = page.evaluate("[window.loupeRequests, window.loupeFetched]")
    read = {u.rsplit("/", 2)[1] for u, n in requests.items() if n != before[0].get(u, 0)}
    assert read == {PER_LAYER["stats"]}, read
    spent = sum(fetched.values()) - sum(before[1].values())
    made = sum(requests.values()) - sum(before[0].values())
    print(f"\nwide layer listing by density: {spent} B in {made} requests")
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
    check_histogram_axes(page, stats["histogram"], histogram_edges(repo / files["stats"]))
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


CHAIN_LAYERS = (0, 1, 2, 3)  # adjacent layers: every feature has prev and next matches


EXPLAINED_LAYERS = (1, 2)  # an explanations file as issue 21 stages it, listed in suite.json


def explanation_of(layer: int, feature: int) -> str | None:
    """The synthetic explanation of a feature (every third one), markup included: shown as text."""
    return f"<b>layer {layer}</b> feature {feature} & co" if feature % 3 == 0 else None


@pytest.fixture(scope="module")
def chain_repo(tmp_path_factory):
    """A repo of four adjacent layers, two of them with explanations, and its page URL."""
    root = tmp_path_factory.mktemp("chain")
    suite = build_synthetic_repo(root, layers=CHAIN_LAYERS, num_latents=320, examples=4)
    for layer in EXPLAINED_LAYERS:
        rel = f"{PREFIX}/explanations/layer_{layer}.parquet"
        rows = [
            {"feature": f, "explanation": explanation_of(layer, f), "status": "ok"}
            for f in range(0, 320, 3)
        ]
        fields = [("feature", pa.int64()), ("explanation", pa.string()), ("status", pa.string())]
        write_groups(root / rel, fields, rows)
        suite["files"][str(layer)]["explanations"] = rel
    (root / "browser/suite.json").write_text(json.dumps(suite))
    server, url = serve(root)
    yield root, url
    server.shutdown()
    server.server_close()


def neighbour_rows(repo: Path, layer: int, feature: int) -> dict[str, list[dict]]:
    """{relation: rows best first} of a feature in its layer's staged neighbours file."""
    rel = f"{PREFIX}/{PER_LAYER['neighbours']}/layer_{layer}.parquet"
    out: dict[str, list[dict]] = {}
    for row in sorted(rows_of(repo, rel, feature), key=lambda r: r["rank"]):
        out.setdefault(row["relation"], []).append(row)
    return out


def test_feature_page_links_its_neighbours_and_next_layer_match(page, chain_repo):
    """The page lists the parquet's same-layer neighbours and prev/next-layer matches with
    their cosines; following the "next layer" link lands on the feature the parquet names."""
    repo, url = chain_repo
    layer, feature = 1, 137
    want = neighbour_rows(repo, layer, feature)
    assert set(want) == {"prev", "same", "next"}

    state = open_feature(page, url, layer, feature)
    for relation, rows in want.items():
        shown = [(r["other_layer"], r["other_feature"], r["cosine"]) for r in rows]
        assert [tuple(x[:2]) for x in state["neighbours"][relation]] == [s[:2] for s in shown]
        links = page.eval_on_selector_all(
            f"#neighbours-{relation} li",
            """items => items.map(li => [Number(li.querySelector('a').dataset.layer),
                Number(li.querySelector('a').dataset.feature), Number(li.querySelector('.val').textContent)])""",
        )
        assert [tuple(x[:2]) for x in links] == [s[:2] for s in shown]
        assert [x[2] for x in links] == pytest.approx([s[2] for s in shown], abs=5e-4)
        # Each link's explanation where its layer has them, as text (no markup made).
        texts = page.eval_on_selector_all(
            f"#neighbours-{relation} li",
            "items => items.map(li => li.querySelector('.explanation')?.textContent ?? null)",
        )
        want_texts = [
            explanation_of(r["other_layer"], r["other_feature"])
            if r["other_layer"] in EXPLAINED_LAYERS
            else None
            for r in rows
        ]
        assert texts == want_texts
    assert any(want_texts) and page.locator("#neighbours-same b").count() == 0

    best = want["next"][0]
    page.click("#neighbours-next li:first-child a")
    page.wait_for_function(
        f"window.loupeState.status === 'ready' && window.loupeState.layer === {layer + 1}"
        f" && window.loupeState.feature === {best['other_feature']}"
    )
    assert page.inner_text("#title") == f"Layer {layer + 1} · feature {best['other_feature']}"
    assert f"layer={layer + 1}&feature={best['other_feature']}" in page.url
    # The page now shows the landed feature's own matches, one of them back in `layer`.
    back = page.evaluate("window.loupeState.neighbours.prev")
    assert back == [
        [r["other_layer"], r["other_feature"], pytest.approx(r["cosine"], abs=1e-6)]
        for r in neighbour_rows(repo, layer + 1, best["other_feature"])["prev"]
    ]
    assert page.errors == []


def test_trace_follows_the_best_match_through_every_layer(page, chain_repo):
    """The trace view lists the chain of rank-0 matches the parquet gives, down to the first
    layer and up to the last, each step with its top tokens and top logits; it reads a few
    row groups per layer, not whole files."""
    repo, url = chain_repo
    layer, feature = 2, 45
    chain = [(layer, feature, None)]
    for relation, step in (("prev", -1), ("next", 1)):
        at = (layer, feature)
        while relation in (rows := neighbour_rows(repo, *at)):
            best = rows[relation][0]
            at = (best["other_layer"], best["other_feature"])
            assert at[0] == chain[-1 if step > 0 else 0][0] + step
            entry = (*at, best["cosine"])
            chain = chain + [entry] if step > 0 else [entry, *chain]
    assert [c[0] for c in chain] == list(CHAIN_LAYERS)

    open_feature(page, url, layer, feature)
    shown = page.evaluate("window.loupeRequests")  # the feature's own view
    page.click("#trace-button")
    page.wait_for_function("window.loupeState.trace && window.loupeState.status === 'ready'")
    steps = page.evaluate("window.loupeState.trace.steps")
    assert [(s["layer"], s["feature"]) for s in steps] == [c[:2] for c in chain]
    for s, (lay, f, cos) in zip(steps, chain, strict=True):
        assert s["cosine"] == (None if cos is None else pytest.approx(cos, abs=1e-6))
        files = {k: f"{PREFIX}/{v}/layer_{lay}.parquet" for k, v in PER_LAYER.items()}
        logits = sorted(rows_of(repo, files["logits"], f), key=lambda r: r["rank"])
        assert s["logits"] == [r["token"] for r in logits if r["sign"] == "positive"][:5]
        peaks = [r["token"] for r in rows_of(repo, files["examples"], f)]
        assert set(s["tokens"]) <= set(peaks) and (len(s["tokens"]) > 0) == (len(peaks) > 0)
        assert s["explanation"] == (explanation_of(lay, f) if lay in EXPLAINED_LAYERS else None)
    rows = page.eval_on_selector_all(
        "#trace tbody tr",
        "rows => rows.map(r => [Number(r.dataset.layer), Number(r.dataset.feature)])",
    )
    assert rows == [list(c[:2]) for c in chain]
    assert page.locator("#trace tr.here").get_attribute("data-feature") == str(feature)

    # Bounded: per file a footer, its page index and the pages of the few columns the trace
    # reads, whatever the stack's depth.
    requests = page.evaluate("window.loupeRequests")
    traced = {url: n - shown.get(url, 0) for url, n in requests.items()}
    assert requests and max(traced.values()) <= 5, traced
    # Following a link in the trace opens that step's feature.
    page.click("#trace tbody tr:first-child a")
    page.wait_for_function(
        f"window.loupeState.status === 'ready' && window.loupeState.layer === {chain[0][0]}"
        f" && window.loupeState.feature === {chain[0][1]}"
    )
    assert page.evaluate("window.loupeState.trace") is None
    assert page.errors == []


def test_a_repo_without_neighbours_says_so(page, tmp_path):
    root = tmp_path / "hub"
    build_synthetic_repo(root, layers=(0,), num_latents=64, examples=2)
    for path in (root / PREFIX / PER_LAYER["neighbours"]).glob("*.parquet"):
        path.unlink()
    install_browser(root, PREFIX, [0], 64, "m")  # suite.json without the neighbours kind
    server, url = serve(root)
    try:
        open_feature(page, url, 0, 3)
    finally:
        server.shutdown()
        server.server_close()
    assert page.inner_text("#neighbours-same") == "no feature_neighbours file for this layer"
    assert page.is_disabled("#trace-button")


EXPLAINED, UNEXPLAINED, EXPLAINED_LATENTS = 3, 2, 192


@pytest.fixture(scope="module")
def explained_repo(tmp_path_factory):
    """Layers 2 and 3, layer 3 with an explanations file as the explain stage writes it."""
    root = tmp_path_factory.mktemp("explained")
    layers = (UNEXPLAINED, EXPLAINED)
    build_synthetic_repo(root, layers=layers, num_latents=EXPLAINED_LATENTS, examples=4)
    path = write_explanations(root, EXPLAINED, explanation_rows(EXPLAINED, EXPLAINED_LATENTS))
    suite = install_browser(root, PREFIX, layers, EXPLAINED_LATENTS, MODEL)
    assert "explanations" in suite["files"][str(EXPLAINED)]
    assert "explanations" not in suite["files"][str(UNEXPLAINED)]
    server, url = serve(root)
    yield pq.read_table(path).to_pylist(), url
    server.shutdown()
    server.server_close()


def explanation_hits(rows: list[dict], query: str) -> list[int]:
    """The features whose explanation holds every word of the query, best mean score first."""

    def mean(r):
        scores = [r[k] for k in ("detection", "fuzzing") if r[k] is not None]
        return sum(scores) / len(scores) if scores else -1

    words = query.lower().split()
    hits = [
        r for r in rows if r["explanation"] and all(w in r["explanation"].lower() for w in words)
    ]
    return [r["feature"] for r in sorted(hits, key=lambda r: (-mean(r), r["feature"]))]


def search_page(page, by: str, query: str) -> dict:
    page.select_option("#search-by", by)
    page.fill("#query", query)
    page.press("#query", "Enter")
    page.wait_for_function(
        f"window.loupeState.search?.query === {json.dumps(query)}"
        " && window.loupeState.status !== 'loading'",
        timeout=20_000,
    )
    state = page.evaluate("window.loupeState")
    assert state["status"] == "ready", state.get("error")
    return state


def test_explanations_are_searched_and_shown_with_their_scores(page, explained_repo):
    """Issue 21: the feature page shows the explanation and its detection and fuzzing scores
    where the layer has explanations; the layer's features are searched by explanation text
    and listed as links."""
    rows, url = explained_repo
    by_feature = {r["feature"]: r for r in rows}
    open_feature(page, url, EXPLAINED, 1)  # odd features were not explained
    assert page.inner_text("#explanation").startswith("no explanation for this feature")
    assert page.evaluate("window.loupeState.explanation") is None

    for query in ("Rivers", "rivers cities"):
        want = explanation_hits(rows, query)
        assert len(want) > 2
        state = search_page(page, "explanation", query)
        assert state["search"]["features"] == want
        shown = page.eval_on_selector_all(
            "#result-list a", "links => links.map(a => Number(a.dataset.feature))"
        )
        assert shown == want
    scored = [f for f in want if by_feature[f]["detection"] is not None]
    unscored = [f for f in explanation_hits(rows, "") if by_feature[f]["detection"] is None]
    assert scored and unscored

    page.click(f"#result-list a[data-feature='{scored[-1]}']")
    for f in (scored[-1], unscored[0]):
        if f != scored[-1]:
            open_feature(page, url, EXPLAINED, f)
        page.wait_for_function(
            f"window.loupeState.status === 'ready' && window.loupeState.feature === {f}"
        )
        want = by_feature[f]
        assert page.evaluate("window.loupeState.explanation") == {
            "text": want["explanation"],
            "detection": want["detection"],
            "fuzzing": want["fuzzing"],
            "explainer": want["explainer"],
        }
        assert page.inner_text("#explanation-text") == want["explanation"]
        for score in ("detection", "fuzzing"):
            value = want[score]
            text = "not scored" if value is None else f"{value:.3f}"
            assert page.inner_text(f"#{score}-score") == text
    # The explained features listed by their scores.
    for score, order in (("detection", "desc"), ("fuzzing", "asc")):
        state = listed(page, score, order)
        explained = [r for r in rows if r["explanation"]]
        assert state["features"] == sorted_features(explained, score, order == "desc")
        assert state["values"] == [by_feature[f][score] for f in state["features"]]

    # The layer without explanations keeps its page as before.
    open_feature(page, url, UNEXPLAINED, 4)
    assert page.is_hidden("#explanation")
    assert page.errors == []


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
    kinds = {"examples", "intervals", "stats", "logits", "neighbours", "explanations"}
    assert set(files) == kinds
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
        same = sorted(
            (r for r in rows_of(hub, files["neighbours"], feature) if r["relation"] == "same"),
            key=lambda r: r["rank"],
        )
        shown = state["neighbours"]["same"]
        assert [s[:2] for s in shown] == [[r["other_layer"], r["other_feature"]] for r in same]
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
