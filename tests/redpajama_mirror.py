"""A tiny RedPajama v2 mirror for tests: json.gz files in the publisher's layout, the
publisher's missing-file list, and a local HTTP server (127.0.0.1, random port) for them."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from helpers import demo_config

from loupe.config import Config, RedPajamaConfig

PUBLISHER = "https://data.together.xyz/redpajama-data-v2/v1.0.0"
SNAPSHOTS = ("2023-06", "2023-14")
SHARDS = 3
PARTS = ("head", "middle")
DOCS_PER_FILE = 30
MISSING = "2023-06/0001/en_middle"  # on the publisher's missing list, and not served
NOT_FOUND = "2023-14/0002/en_head"  # not listed, but the server answers 404
CORRUPT = "2023-14/0000/en_middle"  # served, but not gzip
TEXT = "raw_content"  # the documents files' text column (dataset.text_column)
WORDS = (
    "the of and to in is was for on that with as by at from his her an were are which this "
    "be or has had not but what all when there can more one been their about would into "
    "river market garden window letter summer winter morning evening village station bridge "
    "history science music painting engine harbour forest mountain valley island desert"
).split()


def document(key: int, rng: random.Random) -> str:
    """A document that names its key at both ends, so any piece of it tells where it is from."""
    body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 90)))
    return f"QQ{key}ZZ {body}. QQ{key}ZZ"


def record(text: str, tag: str, row: int) -> dict:
    """One line of a documents file, with CCNet's fields as the dataset card lists them."""
    url = f"https://example.org/{tag}/{row}"
    return {
        "url": url,
        "date_download": "2023-03-20T10:00:00Z",
        "digest": "sha1:" + hashlib.sha1(text.encode()).hexdigest(),
        "length": len(text),
        "nlines": 1,
        "source_domain": "example.org",
        "title": f"document {row}",
        TEXT: text,
        "cc_segment": f"crawl-data/CC-MAIN-{tag[:7]}/segments/0/wet/0.warc.wet.gz",
        "original_nlines": 1,
        "original_length": len(text),
        "line_ids": [0],
        "language": "en",
        "language_score": 0.9,
        "perplexity": 200.0,
    }


@dataclass
class Mirror:
    root: Path
    base_url: str
    docs: dict[str, list[str]]  # tag -> texts in file order, for the files served intact

    @property
    def missing_list_url(self) -> str:
        return f"{self.base_url}/urls/missing-documents.txt"

    def source(self, **overrides) -> RedPajamaConfig:
        """dataset.redpajama reading this mirror, checked and filled as the workflow does."""
        kw = dict(
            snapshots=list(SNAPSHOTS),
            shard_count=SHARDS,
            base_url=self.base_url,
            missing_list_url=self.missing_list_url,
        )
        raw = demo_config()
        raw["dataset"] = {"redpajama": {**kw, **overrides}}
        return Config.from_dict(raw).dataset.redpajama

    def url(self, tag: str) -> str:
        return f"{self.base_url}/documents/{tag}.json.gz"

    def file_of(self) -> dict[str, str]:
        """Document text -> the tag of its file."""
        return {text: tag for tag, texts in self.docs.items() for text in texts}


def build_tree(root: Path) -> dict[str, list[str]]:
    """Write the documents files and urls/missing-documents.txt under root."""
    rng = random.Random(0)
    docs: dict[str, list[str]] = {}
    key = 0
    for snapshot in SNAPSHOTS:
        for shard in range(SHARDS):
            for part in PARTS:
                tag = f"{snapshot}/{shard:04d}/en_{part}"
                texts = [document(key + i, rng) for i in range(DOCS_PER_FILE)]
                key += DOCS_PER_FILE
                if tag in (MISSING, NOT_FOUND):
                    continue
                path = root / "documents" / f"{tag}.json.gz"
                path.parent.mkdir(parents=True, exist_ok=True)
                if tag == CORRUPT:
                    path.write_bytes(b"this is not a gzip file\n" * 100)
                    continue
                with gzip.open(path, "wt", encoding="utf-8") as f:
                    for row, text in enumerate(texts):
                        f.write(json.dumps(record(text, tag, row)) + "\n")
                docs[tag] = texts
    # The publisher's list names full URLs on its own server, whatever mirror serves them.
    (root / "urls").mkdir(parents=True, exist_ok=True)
    (root / "urls" / "missing-documents.txt").write_text(
        f"{PUBLISHER}/documents/2014-52/2811/en_head.json.gz\n"
        f"{PUBLISHER}/documents/{MISSING}.json.gz\n"
    )
    return docs


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextmanager
def serve(root: Path) -> Iterator[str]:
    """Serve root over HTTP on 127.0.0.1 from a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
