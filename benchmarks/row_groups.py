#!/usr/bin/env python
"""Row-group size against what a reader of one feature fetches (issue 26, item 2).

A synthetic max_activations.parquet at gemma-loupe's width (49,152 features x config.yaml's
top_n = 20 examples, every slot filled: the file at capacity), written by the pipeline's own
`loupe.examples.write_examples` (schema, writer options, page index, pages of PAGE_ROWS rows)
once per `ROW_GROUP_FEATURES` in the ladder, on windows of real text (the demo corpus, tokenized
by the demo's BPE tokenizer) and random activations. For each layout: the write time, file
size, footer bytes and row groups; then the bytes and range requests to read one feature:

- by the file's metadata (a thrift reading of the footer and of the page index): a reader that
  ignores the page index fetches the footer and the feature's whole row group; one that uses it
  (hyparquet, as the browser calls it) the footer, the `feature` column's column index, every
  column's offset index, the pages that hold the feature and the dictionary pages;
- by polars, measured: `pl.scan_parquet(url).filter(pl.col("feature") == f).collect()`, a fresh
  scan each time, against a local HTTP server with range requests that counts what it sent.

Each for the first view (feature 0: nothing fetched before), the next feature (1: the same
pages), a feature on other pages of the same row group (31) and a far feature (40,000: another
row group); the metadata readers keep what they fetched (as the browser does), so every view
after the first counts only new bytes.

    python benchmarks/row_groups.py                      # ~2-5 min on 2 shared cores
    python benchmarks/row_groups.py --features 2048 --layouts 64,1024   # a quick check

Writes benchmarks/results/row-groups.{json,md}. Method and limits: benchmarks/README.md."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import struct
import sys
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))  # this tree's loupe, wherever this runs from

WIDTH = 49_152  # gemma-loupe's SAE: 32 x 1536 latents
LAYOUTS = (64, 256, 1024, 4096, 16384)  # features per row group
CTX_LEN = 1024  # config.yaml's tokens.ctx_len
SAMPLE_ROWS = 1024  # rows of demo text the windows are cut from
TOKENIZER_VOCAB = 2048  # the demo's BPE tokenizer
OTHER_PAGE = 31  # rows 620-639: row group 0 at every layout, the third page of 256 rows
FAR = 40_000
# The share of a window's positions where its feature is active besides the peak (the
# rehearsal's random SAE: 2.6%; a trained feature fires more often near its peaks).
FIRING = 0.05  # the far feature (in another row group at every layout of the ladder)


# --- the file -----------------------------------------------------------------------------------


def maxact_config():
    """config.yaml's maxact section, as the pipeline reads it."""
    import yaml

    from loupe.config import Config

    return Config.from_dict(yaml.safe_load((REPO / "config.yaml").read_text())).maxact


def text_fixtures(work: Path, corpus: Path | None = None):
    """A BPE tokenizer trained on `corpus` (default: the demo corpus, harvested into `work`)
    and up to SAMPLE_ROWS x CTX_LEN tokens of it, kept in `work`."""
    from transformers import PreTrainedTokenizerFast

    from loupe.atomic import atomic_dir, atomic_path
    from loupe.demo import harvest_documents, train_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    folder, split = work / "tokenizer", work / "sample.npy"
    corpus = corpus or work / "corpus.jsonl.gz"
    if not corpus.exists():
        with atomic_path(corpus) as tmp, gzip.open(tmp, "wt", encoding="utf-8") as f:
            for doc in harvest_documents():
                f.write(json.dumps(doc) + "\n")
    if not folder.exists():
        with atomic_dir(folder) as tmp:
            train_tokenizer(corpus, TOKENIZER_VOCAB).save_pretrained(tmp)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    if not split.exists():
        ids: list[int] = []
        with gzip.open(corpus, "rt", encoding="utf-8") as f:
            for line in f:
                ids += tokenizer(json.loads(line)["text"])["input_ids"]
                if len(ids) >= SAMPLE_ROWS * CTX_LEN:
                    break
        rows = len(ids) // CTX_LEN
        with atomic_path(split) as tmp, open(tmp, "wb") as f:
            np.save(f, np.asarray(ids[: rows * CTX_LEN], np.int32).reshape(rows, CTX_LEN))
    return tokenizer, np.load(split)


def synthetic_top(features: int, top_n: int, width: int, rows: int, seed: int) -> dict:
    """TopExamples' CPU layout, every slot filled: per feature top_n distinct sequences,
    activations descending, each window the feature's activation at every position (its peak
    at the centre, a FIRING share of the others, as a TopK code fires)."""
    rng = np.random.default_rng(seed)
    peak = rng.lognormal(1.0, 0.6, (features, 1)).astype(np.float32)
    values = -np.sort(-peak * rng.uniform(0.3, 1.0, (features, top_n)), axis=1)
    values[:, 0] = peak[:, 0]
    step = rng.integers(1, max(rows // top_n, 2), (features, 1))
    sequences = (rng.integers(0, rows, (features, 1)) + step * np.arange(top_n)) % rows
    windows = np.zeros((features, top_n, width), np.float32)
    for lo in range(0, features, 4096):  # in blocks: the random draws stay small
        v = values[lo : lo + 4096, :, None]
        fires = rng.random(v.shape[:2] + (width,)) < FIRING
        windows[lo : lo + 4096] = np.where(fires, v * rng.random(fires.shape), 0)
    return {
        "values": values.astype(np.float32),
        "sequences": sequences.astype(np.int64),
        "positions": rng.integers(0, CTX_LEN, (features, top_n)),
        "windows": windows,
    }


def write_layout(path: Path, group_features: int, top, tokens, tokenizer, config):
    """write_examples with ROW_GROUP_FEATURES set to `group_features`: (wall, CPU) seconds."""
    import loupe.examples as examples

    metadata = {  # as maxact.sample_layer writes it, at config.yaml's 10M-token sample
        "layer": 0,
        "hookpoint": "language_model.layers.0",
        "num_latents": top["values"].shape[0],
        "k": 100,
        "top_n": config.top_n,
        "window_before": config.window_before,
        "window_after": config.window_after,
        "intervals": config.intervals,
        "per_interval": config.per_interval,
        "sample_rows": 9766,
        "ctx_len": CTX_LEN,
        "tokens": 9_999_360,
        "special_token_ids": [0, 1, 2],
    }
    saved = examples.ROW_GROUP_FEATURES
    examples.ROW_GROUP_FEATURES = group_features
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        examples.write_examples(path, top, tokens, tokenizer, config, 0, metadata)
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        examples.ROW_GROUP_FEATURES = saved


# --- the metadata: a thrift compact-protocol reading of the footer and the page index ------------


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i


def _zigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _value(buf: bytes, i: int, kind: int):
    """One value of compact type `kind` at i: (value, next i). Structs as {field id: value}."""
    if kind in (1, 2):  # a bool element of a list (a struct's bools live in the field header)
        return buf[i] == 1, i + 1
    if kind == 3:
        return buf[i], i + 1
    if kind in (4, 5, 6):
        n, i = _varint(buf, i)
        return _zigzag(n), i
    if kind == 7:
        return struct.unpack_from("<d", buf, i)[0], i + 8
    if kind == 8:
        n, i = _varint(buf, i)
        return buf[i : i + n], i + n
    if kind in (9, 10):
        head = buf[i]
        i += 1
        n, elem = head >> 4, head & 0x0F
        if n == 15:
            n, i = _varint(buf, i)
        items = []
        for _ in range(n):
            item, i = _value(buf, i, elem)
            items.append(item)
        return items, i
    if kind == 11:
        n, i = _varint(buf, i)
        if not n:
            return {}, i
        kinds = buf[i]
        i += 1
        pairs = {}
        for _ in range(n):
            k, i = _value(buf, i, kinds >> 4)
            pairs[k], i = _value(buf, i, kinds & 0x0F)
        return pairs, i
    if kind == 12:
        fields, last = {}, 0
        while buf[i]:
            head = buf[i]
            i += 1
            if head >> 4:
                last += head >> 4
            else:
                n, i = _varint(buf, i)
                last = _zigzag(n)
            if head & 0x0F in (1, 2):
                fields[last] = head & 0x0F == 1
            else:
                fields[last], i = _value(buf, i, head & 0x0F)
        return fields, i + 1
    raise ValueError(f"thrift compact type {kind}")


def thrift_struct(buf: bytes) -> dict:
    return _value(buf, 0, 12)[0]


def footer(path: Path) -> tuple[int, dict]:
    """(footer bytes: the FileMetaData, its length and the magic; the FileMetaData)."""
    with open(path, "rb") as f:
        f.seek(-8, os.SEEK_END)
        length = struct.unpack("<i", f.read(4))[0]
        f.seek(-8 - length, os.SEEK_END)
        return length + 8, thrift_struct(f.read(length))


def _read(path: Path, start: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(length)


def column_chunks(path: Path) -> list[list[dict]]:
    """Per row group, per column: its byte span, dictionary page, page index locations and
    (read from the offset index) its pages, from FileMetaData's RowGroup and ColumnChunk."""
    _, meta = footer(path)
    groups = []
    for group in meta[4]:  # FileMetaData.row_groups
        chunks = []
        for chunk in group[1]:  # RowGroup.columns
            cmd = chunk[3]  # ColumnChunk.meta_data
            data, dictionary = cmd[9], cmd.get(11)
            start = dictionary if dictionary is not None else data
            locations = thrift_struct(_read(path, chunk[4], chunk[5]))[1]  # OffsetIndex
            chunks.append(
                {
                    "name": cmd[3][0].decode(),  # path_in_schema
                    "start": start,
                    "end": start + cmd[7],  # total_compressed_size
                    "dictionary": (start, data) if dictionary is not None else None,
                    "offset_index": (chunk[4], chunk[4] + chunk[5]),
                    "column_index": (chunk[6], chunk[6] + chunk[7]) if 6 in chunk else None,
                    # PageLocation: offset, compressed_page_size, first_row_index
                    "pages": [(p[1], p[1] + p[2], p[3]) for p in locations],
                    "rows": group[3],
                    # Statistics: max_value, min_value (the `feature` column's are int64)
                    "min_max": tuple(
                        struct.unpack("<q", cmd[12][k])[0]
                        if len(cmd[12].get(k, b"")) == 8
                        else None
                        for k in (6, 5)
                    )
                    if 12 in cmd
                    else (None, None),
                }
            )
        groups.append(chunks)
    return groups


def feature_pages(path: Path, chunk: dict, feature: int) -> list[int]:
    """Pages of the `feature` column chunk whose min/max (its column index) admit `feature`."""
    index = thrift_struct(_read(path, *_span(chunk["column_index"])))  # ColumnIndex
    lows = [struct.unpack("<q", v)[0] for v in index[2]]
    highs = [struct.unpack("<q", v)[0] for v in index[3]]
    return [p for p, (lo, hi) in enumerate(zip(lows, highs, strict=True)) if lo <= feature <= hi]


def _span(pair: tuple[int, int]) -> tuple[int, int]:
    return pair[0], pair[1] - pair[0]


def _rows_of(chunk: dict, page: int) -> tuple[int, int]:
    pages = chunk["pages"]
    end = pages[page + 1][2] if page + 1 < len(pages) else chunk["rows"]
    return pages[page][2], end


def reads_for(path: Path, groups, feature: int, page_index: bool) -> list[tuple[int, int, str]]:
    """Byte ranges (start, end, what) a reader fetches for `feature` after the footer: the whole
    row group (its min/max statistics admit the feature), or, with the page index, its indexes,
    the pages holding the feature and their dictionaries."""
    ranges = []
    for chunks in groups:
        first = next(c for c in chunks if c["name"] == "feature")
        lo, hi = first["min_max"]
        if not lo <= feature <= hi:
            continue
        if not page_index:
            ranges.append((min(c["start"] for c in chunks), max(c["end"] for c in chunks), "group"))
            continue
        ranges.append((*first["column_index"], "column index"))
        ranges += [(*c["offset_index"], "offset indexes") for c in chunks]
        rows = [_rows_of(first, p) for p in feature_pages(path, first, feature)]
        for c in chunks:
            if c["dictionary"]:
                ranges.append((*c["dictionary"], "dictionaries"))
            for p, (start, end, _) in enumerate(c["pages"]):
                r0, r1 = _rows_of(c, p)
                if any(r0 < b and a < r1 for a, b in rows):
                    ranges.append((start, end, "data pages"))
    return ranges


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ranges sorted and merged where they touch or overlap: the fewest requests."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def metadata_reads(path: Path, features: dict[str, int]) -> dict:
    """Per reader (no page index, page index) and view: new bytes and requests, the reader
    keeping what it fetched; the first view includes the footer."""
    size = path.stat().st_size
    footer_bytes, _ = footer(path)
    groups = column_chunks(path)
    out = {}
    for reader, page_index in (("row_group", False), ("page_index", True)):
        held: list[tuple[int, int]] = [(size - footer_bytes, size)]
        views = {}
        for view, feature in features.items():
            reads = reads_for(path, groups, feature, page_index)
            new = _minus(merged([r[:2] for r in reads]), merged(held))
            first = view == "first"
            views[view] = {
                "feature": feature,
                "bytes": sum(b - a for a, b in new) + footer_bytes * first,
                "requests": len(new) + first,
            }
            if first:  # the first view's bytes by what they hold (nothing overlaps)
                parts = {"footer": footer_bytes}
                for a, b, what in set(reads):
                    parts[what] = parts.get(what, 0) + b - a
                views[view]["parts"] = parts
            held += new
        out[reader] = views
    return out


def _minus(ranges, held) -> list[tuple[int, int]]:
    """`ranges` less the bytes in `held` (both merged)."""
    out = []
    for a, b in ranges:
        for h0, h1 in held:
            if h1 <= a or b <= h0:
                continue
            if a < h0:
                out.append((a, h0))
            a = max(a, h1)
            if a >= b:
                break
        if a < b:
            out.append((a, b))
    return out


# --- polars, over HTTP ----------------------------------------------------------------------------


@contextmanager
def counting_server(root: Path):
    """Serve `root` on 127.0.0.1 with range requests (loupe.browse's handler), recording every
    request: (method, Range header, bytes sent)."""
    from loupe.browse import RangeRequestHandler

    log: list[tuple[str, str | None, int]] = []

    class Counting(RangeRequestHandler):
        def send_head(self):
            f = super().send_head()
            if self.command == "HEAD":
                log.append(("HEAD", self.headers.get("Range"), 0))
            return f

        def copyfile(self, source, outputfile):
            start = source.tell()
            super().copyfile(source, outputfile)
            log.append((self.command, self.headers.get("Range"), source.tell() - start))

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Counting, directory=str(root)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()


def polars_reads(url: str, log: list, features: dict[str, int], top_n: int) -> dict:
    """Each view as a fresh polars scan: bytes the server sent, requests, rows and seconds."""
    import polars as pl

    out = {}
    for view, feature in features.items():
        log.clear()
        t0 = time.perf_counter()
        rows = pl.scan_parquet(url).filter(pl.col("feature") == feature).collect()
        seconds = time.perf_counter() - t0
        assert rows.height == top_n and set(rows["feature"]) == {feature}, (view, rows.shape)
        out[view] = {
            "feature": feature,
            "bytes": sum(n for *_, n in log),
            "requests": len(log),
            "ranges": [f"{method} {span}" for method, span, _ in log],
            "seconds": round(seconds, 3),
        }
    return out


# --- the run --------------------------------------------------------------------------------------


def measure(args) -> dict:
    import pyarrow.parquet as pq

    config = maxact_config()
    tokenizer, tokens = text_fixtures(args.work_dir, args.corpus)
    top = synthetic_top(args.features, config.top_n, config.width, len(tokens), args.seed)
    features = {"first": 0, "next": 1, "page": OTHER_PAGE, "far": min(FAR, args.features - 1)}
    out_dir = args.work_dir / "files"
    out_dir.mkdir(parents=True, exist_ok=True)
    layouts = []
    with counting_server(out_dir) as (base, log):
        for group_features in args.layouts:
            name = f"max_activations-{group_features}.parquet"
            path = out_dir / name
            wall, cpu = write_layout(path, group_features, top, tokens, tokenizer, config)
            meta = pq.read_metadata(path)
            footer_bytes, _ = footer(path)
            row = {
                "row_group_features": group_features,
                "write_s": round(wall, 2),
                "write_cpu_s": round(cpu, 2),
                "file_bytes": path.stat().st_size,
                "footer_bytes": footer_bytes,
                "row_groups": meta.num_row_groups,
                "rows": meta.num_rows,
                "metadata": metadata_reads(path, features),
                "polars": polars_reads(f"{base}/{name}", log, features, config.top_n),
            }
            layouts.append(row)
            print(json.dumps(row), flush=True)
            if not args.keep:
                path.unlink()
    return {"features": args.features, "top_n": config.top_n, "layouts": layouts}


VIEWS = {"first": "first view", "next": "next", "page": "other page", "far": "far feature"}
READERS = {
    "row_group": "no page index (metadata)",
    "page_index": "page index (metadata)",
    "polars": "polars (measured)",
}


def kb(n: int) -> str:
    return f"{n / 1e3:,.1f}"


def markdown(result: dict) -> str:
    from loupe.examples import ROW_GROUP_FEATURES

    r = result
    lines = [
        "# Row-group size against the bytes to read one feature",
        "",
        f"`{r['command']}`: {r['date']}, {r['machine']}, {r['seconds']:.0f} s in all. "
        f"A synthetic max_activations.parquet of {r['features']:,} features x {r['top_n']} "
        "examples (every slot filled: the file at capacity), written by "
        "`loupe.examples.write_examples` at each `ROW_GROUP_FEATURES` (pages of "
        "`PAGE_ROWS` rows, page index); windows of demo text, random activations. "
        f"The pipeline writes {ROW_GROUP_FEATURES:,} features per row group.",
        "",
        "| features per row group | row groups | file MB | footer KB | write s (CPU s) |",
        "|---|---|---|---|---|",
    ]
    for row in r["layouts"]:
        lines.append(
            f"| {row['row_group_features']:,} | {row['row_groups']:,} | "
            f"{row['file_bytes'] / 1e6:,.1f} | {kb(row['footer_bytes'])} | "
            f"{row['write_s']:.1f} ({row['write_cpu_s']:.1f}) |"
        )
    lines += [
        "",
        "KB and requests to read one feature, in this order: first view (feature 0, footer "
        "included), next (feature 1: the same pages), other page (feature "
        f"{OTHER_PAGE}: the same row group, other pages), far feature "
        f"({r['layouts'][0]['polars']['far']['feature']:,}: another row group). The metadata "
        "readers keep what they fetched (after the first view: new bytes only) and count the "
        "fewest requests (touching ranges merged); polars runs a fresh scan per feature, "
        "footer included every time.",
        "",
        "| features per row group | reader | " + " | ".join(VIEWS.values()) + " |",
        "|---|---|" + "---|" * len(VIEWS),
    ]
    for row in r["layouts"]:
        for key, label in READERS.items():
            views = row["polars"] if key == "polars" else row["metadata"][key]
            cells = [f"{kb(views[v]['bytes'])} KB / {views[v]['requests']}" for v in VIEWS]
            lines.append(f"| {row['row_group_features']:,} | {label} | {' | '.join(cells)} |")
    parts = ("footer", "column index", "offset indexes", "dictionaries", "data pages")
    lines += [
        "",
        "The page-index reader's first view, KB by what it holds:",
        "",
        "| features per row group | " + " | ".join(parts) + " |",
        "|---|" + "---|" * len(parts),
    ]
    for row in r["layouts"]:
        held = row["metadata"]["page_index"]["first"]["parts"]
        cells = " | ".join(kb(held.get(p, 0)) for p in parts)
        lines.append(f"| {row['row_group_features']:,} | {cells} |")
    lines += [
        "",
        "The staged browser (hyparquet, page index) at 1,024 features per row group: "
        "`rehearsal.md`, a first feature 456 KB in 60 requests over all the files its view reads "
        "(headless chromium, not rerun here).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--features", type=int, default=WIDTH)
    p.add_argument(
        "--layouts",
        type=lambda s: [int(x) for x in s.split(",")],
        default=list(LAYOUTS),
        help="features per row group, comma-separated",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="row-groups", help="of the result files")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / f"loupe-row-groups-{os.getuid()}",
        help="corpus, tokenizer and token split (kept and reused), and the files written",
    )
    p.add_argument("--corpus", type=Path, help="a .jsonl.gz of texts (default: the demo corpus)")
    p.add_argument("--keep", action="store_true", help="keep each layout's file in the work dir")
    args = p.parse_args(argv)
    started = time.time()
    result = measure(args)
    result |= {
        "command": " ".join(["python benchmarks/row_groups.py", *(argv or sys.argv[1:])]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "seconds": round(time.time() - started, 1),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (args.out_dir / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
