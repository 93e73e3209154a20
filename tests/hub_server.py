"""A stand-in for the Hub's file endpoint on 127.0.0.1, serving a staged repo under its repo id:
`/{repo_id}/resolve/{revision}/{path}` with HTTP range requests and the headers
huggingface_hub's downloads read (X-Repo-Commit, ETag). With HF_ENDPOINT pointed at it,
hf_hub_url and hf_hub_download, and polars' scans of those URLs, reach it as they reach the Hub,
and every byte each request took is recorded, so a test can say which parts of a file a reader
fetched."""

from __future__ import annotations

import hashlib
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from loupe.browse import RangeRequestHandler

COMMIT = "0" * 40  # the one revision served


@dataclass(frozen=True)
class Read:
    path: str  # the repo path
    start: int
    end: int  # exclusive
    ranged: bool  # asked with a Range header


@dataclass
class Hub:
    url: str
    repo_id: str
    reads: list[Read] = field(default_factory=list)

    def reads_of(self, path: str) -> list[Read]:
        return [r for r in self.reads if r.path == path]


class _Handler(RangeRequestHandler):
    def __init__(self, *args, hub: Hub, **kwargs):
        self.hub = hub
        super().__init__(*args, **kwargs)

    def _repo_path(self) -> str | None:
        m = re.fullmatch(
            rf"/{re.escape(self.hub.repo_id)}/resolve/[^/]+/(.+)", unquote(urlsplit(self.path).path)
        )
        return m[1] if m else None

    def translate_path(self, path):
        rel = self._repo_path()
        return super().translate_path("/" + rel) if rel else "/nonexistent"

    def end_headers(self):
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha1(self.path.encode()).hexdigest()}"')
        super().end_headers()

    def copyfile(self, source, outputfile):
        start = source.tell()
        super().copyfile(source, outputfile)
        ranged = self.headers.get("Range") is not None
        self.hub.reads.append(Read(self._repo_path(), start, source.tell(), ranged))


@contextmanager
def serve_hub(root: Path, repo_id: str, monkeypatch, home: Path):
    """Serve `root` as `repo_id`; huggingface_hub in this process and the processes it starts
    (a notebook's kernel) use it as the Hub, with their cache in `home`."""
    import huggingface_hub.constants as constants

    hub = Hub("", repo_id)
    handler = partial(_Handler, directory=str(Path(root).resolve()), hub=hub)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        hub.url + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name, value in (("HF_ENDPOINT", hub.url), ("HF_HUB_OFFLINE", "0"), ("HF_HOME", str(home))):
        monkeypatch.setenv(name, value)
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()


def row_group_spans(path: Path) -> list[tuple[int, int, int, int]]:
    """(first feature, last feature, first byte, end byte) of each row group of a per-feature
    parquet file, from its footer."""
    import pyarrow.parquet as pq

    meta = pq.read_metadata(path)
    spans = []
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        columns = [group.column(j) for j in range(group.num_columns)]
        starts = [c.dictionary_page_offset or c.data_page_offset for c in columns]
        ends = [s + c.total_compressed_size for s, c in zip(starts, columns, strict=True)]
        feature = columns[0].statistics
        spans.append((feature.min, feature.max, min(starts), max(ends)))
    return spans


def assert_one_row_group(hub: Hub, root: Path, rel: str, feature: int) -> None:
    """`rel` was read as a filtered scan reads it: range requests only, for its footer (the
    file's tail) and otherwise inside the row group that holds `feature`, at least once."""
    size = (Path(root) / rel).stat().st_size
    reads = hub.reads_of(rel)
    assert reads, f"{rel} was never read"
    assert all(r.ranged for r in reads), f"{rel}: a whole-file request {reads}"
    spans = row_group_spans(Path(root) / rel)
    assert len(spans) > 1, f"{rel}: one row group, nothing to skip"
    ((start, end),) = [(s, e) for lo, hi, s, e in spans if lo <= feature <= hi]
    data = [r for r in reads if r.end != size]  # the rest: the footer, read from the tail
    assert data, f"{rel}: no read of feature {feature}'s row group {reads}"
    outside = [r for r in data if not (start <= r.start and r.end <= end)]
    assert not outside, f"{rel}: reads outside feature {feature}'s row group: {outside}"
