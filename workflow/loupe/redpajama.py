"""RedPajama v2 from its publisher's file server: the document files of chosen snapshots and
shards, in the publisher's layout, streamed through the `datasets` json builder and
interleaved across many files (seeded), so that every split loupe cuts mixes many shards.

Layout (the dataset's own loading script, RedPajama-Data-V2.py):
    {base_url}/documents/{snapshot}/{shard:04d}/{language}_{part}.json.gz
with 5000 shards per snapshot and language, and parts head, middle (and tail). Files known to
be missing are listed, as full URLs, in urls/missing-documents.txt of the Hub dataset repo.
"""

from __future__ import annotations

import logging
import random
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import LoupeError

if TYPE_CHECKING:
    from .config import RedPajamaConfig

log = logging.getLogger(__name__)

PARTITIONS = {"head_middle": ("head", "middle"), "head": ("head",), "middle": ("middle",)}
SHARDS_PER_SNAPSHOT = 5000
# The 84 CommonCrawl snapshots, oldest first (_CC_SNAPSHOT_IDS of the loading script).
SNAPSHOTS = (
    "2014-15", "2014-23", "2014-35", "2014-41", "2014-42", "2014-49", "2014-52",
    "2015-14", "2015-22", "2015-27", "2015-32", "2015-35", "2015-40", "2015-48",
    "2016-07", "2016-18", "2016-22", "2016-26", "2016-30", "2016-36", "2016-40", "2016-44",
    "2016-50", "2017-04", "2017-09", "2017-17", "2017-22", "2017-26", "2017-30", "2017-34",
    "2017-39", "2017-43", "2017-47", "2017-51", "2018-05", "2018-09", "2018-13", "2018-17",
    "2018-22", "2018-26", "2018-30", "2018-34", "2018-39", "2018-43", "2018-47", "2018-51",
    "2019-04", "2019-09", "2019-13", "2019-18", "2019-22", "2019-26", "2019-30", "2019-35",
    "2019-39", "2019-43", "2019-47", "2019-51", "2020-05", "2020-10", "2020-16", "2020-24",
    "2020-29", "2020-34", "2020-40", "2020-45", "2020-50", "2021-04", "2021-10", "2021-17",
    "2021-21", "2021-25", "2021-31", "2021-39", "2021-43", "2021-49", "2022-05", "2022-21",
    "2022-27", "2022-33", "2022-40", "2022-49", "2023-06", "2023-14",
)  # fmt: skip


def check_choice(snapshots: list[str], shard_start: int, shard_count: int) -> None:
    """What the config schema cannot say (it checks the rest: languages, partitions, ranges):
    the snapshots are the publisher's, and the shards end within a snapshot's 5000."""
    unknown = [s for s in snapshots if s not in SNAPSHOTS]
    if unknown:
        raise LoupeError(
            f"config error at dataset/redpajama/snapshots: unknown snapshot(s) {unknown}; the"
            f" publisher's are {SNAPSHOTS[0]} .. {SNAPSHOTS[-1]} (e.g."
            f" {', '.join(SNAPSHOTS[-3:])})"
        )
    end = shard_start + shard_count
    if end > SHARDS_PER_SNAPSHOT:
        raise LoupeError(
            f"config error at dataset/redpajama: shards {shard_start}..{end - 1} outside"
            f" 0..{SHARDS_PER_SNAPSHOT - 1} (shard_start + shard_count <= {SHARDS_PER_SNAPSHOT})"
        )


def _tag_of(line: str) -> str | None:
    # The list holds full publisher URLs; keying on the tag lets it apply to any mirror.
    _, sep, rest = line.strip().partition("/documents/")
    return rest.removesuffix(".json.gz") if sep and rest.endswith(".json.gz") else None


def _read_text(url: str, timeout: float = 60) -> str:
    if "://" not in url:
        with open(url, encoding="utf-8") as f:
            return f.read()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode("utf-8")


def missing_tags(source: RedPajamaConfig) -> set[str]:
    """Tags the publisher lists as missing; empty (with a warning) if the list is unreadable."""
    if source.missing_list_url is None:
        return set()
    try:
        text = _read_text(source.missing_list_url)
    except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
        # Not fatal: a missing file is skipped anyway, with a warning, when it fails to open.
        log.warning(
            "cannot read the RedPajama missing-file list %s (%s); its files will be skipped "
            "when they fail to open",
            source.missing_list_url,
            _one_line(e),
        )
        return set()
    return {tag for line in text.splitlines() if (tag := _tag_of(line))}


def document_urls(source: RedPajamaConfig) -> list[str]:
    """Document file URLs in the publisher's layout and order, minus its missing list."""
    missing = missing_tags(source)
    urls = []
    for tag in source.tags():
        if tag in missing:
            log.warning("RedPajama lists %s as missing; not reading it", source.url(tag))
        else:
            urls.append(source.url(tag))
    return urls


@dataclass
class StreamStats:
    """What a document stream has read so far; iter_documents updates it as it goes."""

    files_total: int = 0
    files_done: int = 0  # read to the end
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (url, reason)
    documents: int = 0
    open_files: list[str] = field(default_factory=list)
    current: str | None = None  # the file of the last document yielded
    read: dict[str, int] = field(default_factory=dict)  # url -> documents taken from it

    @property
    def files_unopened(self) -> int:
        return self.files_total - self.files_done - len(self.skipped) - len(self.open_files)

    def sources(self) -> dict:
        """What the documents came from, for the tokenize manifest and the model card: the
        snapshots and shards read, and documents per file (publisher's tags)."""
        tags = {_tag_of(url) or url: n for url, n in sorted(self.read.items())}
        shards: dict[str, list[int]] = {}
        for tag in tags:
            snapshot, shard, *_ = tag.split("/") + ["", ""]
            if shard.isdigit():
                shards.setdefault(snapshot, []).append(int(shard))
        return {
            "snapshots": sorted(shards),
            "shards": {k: sorted(set(v)) for k, v in sorted(shards.items())},
            "files": tags,
            "skipped": [url for url, _ in self.skipped],
        }

    def summary(self) -> str:
        """One line: documents and files read, skipped, open and not yet opened."""
        line = (
            f"{self.documents:,} documents from {self.files_done} of {self.files_total} files "
            f"read to the end, {len(self.open_files)} open, {self.files_unopened} not opened, "
            f"{len(self.skipped)} skipped"
        )
        if self.skipped:
            url, reason = self.skipped[0]
            line += f" (first: {url}: {reason})"
        return line


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _probe(url: str) -> str:
    """Why a file could not be found: the server's answer to a HEAD request."""
    if "://" not in url:
        return "no such file"
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return f"not readable, though a HEAD request answers HTTP {response.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code} {e.reason}"
    except urllib.error.URLError as e:  # refused, unknown host, timed out
        return str(e.reason)
    except (OSError, ValueError) as e:
        return _one_line(e)


def _open(url: str, text_column: str) -> Iterator[dict]:
    from datasets import load_dataset

    # block_size=0: one sequential GET per file, no range requests, so any static server works.
    ds = load_dataset(
        "json",
        data_files=url,
        split="train",
        streaming=True,
        storage_options={"block_size": 0},
    )
    if ds.column_names is not None and text_column not in ds.column_names:
        raise LoupeError(
            f"text column {text_column!r} not in RedPajama file {url} "
            f"(columns: {sorted(ds.column_names)})"
        )
    return iter(ds.select_columns([text_column]) if ds.column_names else ds)


def iter_documents(
    source: RedPajamaConfig,
    text_column: str,
    seed: int,
    stats: StreamStats | None = None,
) -> Iterator[str]:
    """Stream document texts from `source.open_files` files at a time, visited in a seeded
    order, each document drawn from one of the open files at random (seeded).

    A file that cannot be opened or read is skipped with one warning naming it and why."""
    open_files = source.open_files
    stats = stats if stats is not None else StreamStats()
    urls = document_urls(source)
    if not urls:
        raise LoupeError("redpajama: every chosen file is on the publisher's missing list")
    rng = random.Random(seed)
    pending = urls[:]
    rng.shuffle(pending)
    pending.reverse()  # pop() from the end takes them in shuffled order
    stats.files_total = len(urls)
    active: list[tuple[str, Iterator[dict]]] = []

    def skip(url: str, reason: str) -> None:
        log.warning("skipping RedPajama file %s: %s", url, reason)
        stats.skipped.append((url, reason))

    def refill() -> None:
        while len(active) < open_files and pending:
            url = pending.pop()
            try:
                active.append((url, _open(url, text_column)))
            except LoupeError:
                raise
            except FileNotFoundError:
                # datasets reports every failed HTTP lookup (404, 403, 5xx, refused) as
                # FileNotFoundError; ask the server itself for the reason.
                skip(url, _probe(url))
            except Exception as e:  # a broken gzip or json file: skip it, read the rest
                skip(url, _one_line(e))
            else:
                stats.open_files.append(url)

    refill()
    while active:
        i = rng.randrange(len(active))
        url, records = active[i]
        try:
            record = next(records)
        except StopIteration:
            stats.files_done += 1
            log.info("read %s (%d of %d files done)", url, stats.files_done, stats.files_total)
        except Exception as e:  # the connection or the gzip stream broke partway through
            skip(url, f"failed after some documents: {_one_line(e)}")
        else:
            text = record.get(text_column)
            if text is None:  # an empty record: nothing to tokenize
                continue
            if not isinstance(text, str):
                raise LoupeError(
                    f"text column {text_column!r} of {url} holds {type(text).__name__}, not text"
                )
            stats.documents += 1
            stats.current = url
            stats.read[url] = stats.read.get(url, 0) + 1
            yield text
            continue
        del active[i]
        stats.open_files.remove(url)
        refill()
    if stats.documents == 0:
        raise LoupeError(f"redpajama: no documents could be read; {stats.summary()}")
