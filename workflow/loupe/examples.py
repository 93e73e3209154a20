"""The sampled examples as parquet: max_activations (the top N per feature), interval_examples
(examples spread over each feature's activation range) and feature_stats (one row per feature,
with its activation histogram). Rows come from CPU arrays in TopExamples' layout: values,
sequences (-1 for an empty slot), positions [F, S] and windows [F, S, W].

Token strings: each id's own decoding, except where a byte-level token holds part of a
multi-byte character, which decodes alone to U+FFFD: such tokens show their bytes as escapes
(`\\xe2\\x80`); `context` stays the exact decoded text of the window."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .config import MaxactConfig

# Features per parquet row group, and rows per data page. The footer grows with the row groups
# (at 49,152 features, 768 groups of 64 made 1.3 MB of footer per file, most of a browser's
# first view); 48 groups of 1,024 make ~70 KB. A reader after one feature finds its rows with
# the page index (column and offset indexes, written beside each column chunk), fetching pages
# of PAGE_ROWS rows; one that ignores the page index (polars) reads the feature's row group.
ROW_GROUP_FEATURES = 1024
PAGE_ROWS = 256
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback (Gemma)


# The field-metadata key of each published column's description: the one place a column is
# described. The card's column tables, the browser (through suite.json) and the tests read it
# from the files' schemas (column_descriptions).
DESCRIPTION = b"description"


def schema(columns: str):
    """A pyarrow schema from a table of its columns, one a line: name, type (a pyarrow type
    alias, or list<alias>), description; a line that starts with a space goes on with the
    description above. Each description is kept in its field's metadata under DESCRIPTION,
    which parquet stores (in the Arrow schema of the file's footer)."""
    import pyarrow as pa

    def arrow_type(alias: str):
        if alias.startswith("list<"):
            return pa.list_(arrow_type(alias[5:-1]))
        return pa.type_for_alias(alias)

    rows: list[list[str]] = []
    for line in textwrap.dedent(columns).strip("\n").splitlines():
        if line[:1].isspace():
            rows[-1][2] += " " + line.strip()
        else:
            rows.append(line.split(maxsplit=2))
    return pa.schema([pa.field(n, arrow_type(t), metadata={DESCRIPTION: d}) for n, t, d in rows])


def column_descriptions(schema) -> dict[str, str]:
    """Each column of a pyarrow schema (e.g. a parquet file's, pq.read_schema) with its
    description, in order; "" for a column written without one."""
    return {f.name: (f.metadata or {}).get(DESCRIPTION, b"").decode() for f in schema}


# The columns that repeat a few values within a row group, dictionary-encoded. The others are
# not: a reader of one page also fetches its column chunk's dictionary page, and the dictionary
# of a column of distinct values (a context, an activation) is up to 1 MB per row group.
DICTIONARY_COLUMNS = ("token", "sign", "relation")


def writer_options(schema) -> dict:
    """ParquetWriter options of every per-feature file: zstd, a page index, pages of PAGE_ROWS
    rows, dictionaries only for DICTIONARY_COLUMNS, and min/max statistics only on the
    non-string columns (a context string's min and max would double the footer and filter
    nothing)."""
    import pyarrow as pa

    return {
        "compression": "zstd",
        "write_page_index": True,
        "max_rows_per_page": PAGE_ROWS,
        "use_dictionary": [n for n in schema.names if n in DICTIONARY_COLUMNS],
        "write_statistics": [f.name for f in schema if not pa.types.is_string(f.type)],
    }


def feature_file_writer(path: Path, schema, metadata: dict | None = None, sorted_by: int = 3):
    """A ParquetWriter for a per-feature file sorted by its first `sorted_by` columns, with
    writer_options and the run's metadata as JSON under "loupe". Callers write one row group
    per ROW_GROUP_FEATURES features, into a temporary path (atomic.atomic_path)."""
    import pyarrow.parquet as pq

    if metadata is not None:
        schema = schema.with_metadata({"loupe": json.dumps(metadata, sort_keys=True)})
    return pq.ParquetWriter(
        path,
        schema,
        sorting_columns=[pq.SortingColumn(i) for i in range(sorted_by)],
        **writer_options(schema),
    )


def examples_schema():
    # The published columns first.
    return schema("""
        feature            int64    feature (latent) index
        activation         float32  the feature's peak activation in this example
        token              string   the token at the peak
        context            string   the text of the window around the peak
        context_tokens     string   JSON list of the window's token strings
        token_activations  string   JSON list of the feature's activation at each window
                                    position
        layer              int64    decoder layer
        rank               int64    rank of the example within its feature (0 is the strongest)
        peak_index         int64    index of the peak in `context_tokens`
        token_id           int64    token id at the peak
        sequence           int64    row of the sampled token split the example comes from
        position           int64    position of the peak within that row
    """)


def interval_examples_schema():
    """The examples' columns (rank: within the interval) and the interval's."""
    import pyarrow as pa

    rank = "rank of the example within its interval (0 is the strongest)"
    columns = [
        f.with_metadata({DESCRIPTION: rank}) if f.name == "rank" else f for f in examples_schema()
    ]
    interval = schema("""
        interval        int64    the activation interval the example was drawn from (0 holds
                                 the feature's maximum, the last everything lower)
        interval_low    float32  the interval's lower bound (included)
        interval_high   float32  the interval's upper bound (excluded)
        interval_count  int64    sequences whose peak fell in the interval
    """)
    return pa.schema([*columns, *interval])


def stats_schema():
    return schema("""
        feature          int64        feature (latent) index
        fire_count       int64        sampled tokens on which the feature was active (among the
                                      top k, above 0)
        density          float64      fire_count / tokens
        max_activation   float32      largest activation seen
        mean_activation  float32      mean activation over the tokens where it fired
        examples         int64        max-activating examples kept for the feature
        tokens           int64        tokens counted (special tokens excluded)
        histogram        list<int64>  activations per histogram bin (log-spaced; edges in the
                                      file's metadata)
    """)


def decode_many(tokenizer, sequences: list[list[int]]) -> list[str]:
    """tokenizer.decode(ids) of each sequence, special tokens kept. Straight to the Rust
    tokenizer's batched decode when that gives the same text: transformers' batch_decode
    checks every id in Python, the slowest part of writing a million examples."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return backend.decode_batch(sequences, skip_special_tokens=False)
    return tokenizer.batch_decode(sequences, skip_special_tokens=False)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character that stands for each byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTES = _byte_decoder()


def token_bytes(tokenizer, token_id: int) -> bytes | None:
    """The raw bytes a token stands for, where the tokenizer's vocabulary shows them (byte
    fallback pieces like <0xE2>, or GPT-2 style byte-level pieces); None otherwise."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if not isinstance(piece, str) or not piece:
        return None
    if m := _BYTE_TOKEN.fullmatch(piece):
        return bytes([int(m.group(1), 16)])
    if all(ch in _BYTES for ch in piece):
        return bytes(_BYTES[ch] for ch in piece)
    return None


class TokenStrings:
    """Each id's string (the tokenizer's decoding of that id alone, or its bytes escaped
    where that decoding is a partial character) and its JSON encoding, computed once per id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text: dict[int, str] = {}
        self.json: dict[int, str] = {}

    def _fill(self, ids: np.ndarray) -> list[int]:
        ids = [int(i) for i in ids]
        missing = [i for i in ids if i not in self.text]
        for i, text in zip(
            missing, decode_many(self.tokenizer, [[i] for i in missing]), strict=True
        ):
            if "\ufffd" in text and (raw := token_bytes(self.tokenizer, i)) is not None:
                # Part of a multi-byte character: show its bytes, not U+FFFD.
                text = raw.decode("utf-8", errors="backslashreplace")
            self.text[i], self.json[i] = text, json.dumps(text, ensure_ascii=False)
        return ids

    def __call__(self, ids: np.ndarray) -> list[str]:
        return [self.text[i] for i in self._fill(ids)]

    def as_json(self, ids: np.ndarray) -> list[str]:
        return [self.json[i] for i in self._fill(ids)]


def _json_lists(values, offsets: np.ndarray):
    """'[v0,v1,...]' per list, from flat JSON-ready strings and list offsets."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)
    return pc.binary_join_element_wise("[", pc.binary_join(lists, ","), "]", "")


def example_table(
    top: dict[str, np.ndarray],
    features: np.ndarray,
    ranks: np.ndarray,
    tokens: np.ndarray,
    strings: TokenStrings,
    tokenizer,
    maxact_config: MaxactConfig,
    layer: int,
):
    """The rows of the given (feature, rank) examples, from CPU copies of TopExamples."""
    import pyarrow as pa
    import pyarrow.compute as pc

    seq_len = tokens.shape[1]
    seqs = top["sequences"][features, ranks]
    pos = top["positions"][features, ranks]
    t = pos[:, None] + np.arange(-maxact_config.window_before, maxact_config.window_after + 1)
    inside = (t >= 0) & (t < seq_len)  # windows are clipped at row edges
    ids = np.asarray(tokens[seqs[:, None], t.clip(0, seq_len - 1)]).astype(np.int64)
    lengths = inside.sum(1)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat_ids = ids[inside]
    flat_acts = top["windows"][features, ranks][inside].astype(np.float32)

    uniq, inverse = np.unique(flat_ids, return_inverse=True)
    as_json = pa.array(strings.as_json(uniq))
    before = maxact_config.window_before
    token_ids = ids[:, before]  # the unclipped window is centred on the peak
    peak_index = np.minimum(pos, before)  # positions clipped off the row start
    windows = [w.tolist() for w in np.split(flat_ids, offsets[1:-1])]
    return pa.table(
        {
            "feature": pa.array(features.astype(np.int64)),
            "activation": pa.array(top["values"][features, ranks].astype(np.float32)),
            "token": pa.array(strings(token_ids)),
            "context": pa.array(decode_many(tokenizer, windows)),
            "context_tokens": _json_lists(as_json.take(pa.array(inverse)), offsets),
            "token_activations": _json_lists(pc.cast(pa.array(flat_acts), pa.string()), offsets),
            "layer": pa.array(np.full(len(features), layer, dtype=np.int64)),
            "rank": pa.array(ranks.astype(np.int64)),
            "peak_index": pa.array(peak_index.astype(np.int64)),
            "token_id": pa.array(token_ids.astype(np.int64)),
            "sequence": pa.array(seqs.astype(np.int64)),
            "position": pa.array(pos.astype(np.int64)),
        },
        schema=examples_schema(),
    )


def write_examples(
    path: Path,
    top: dict[str, np.ndarray],
    tokens: np.ndarray,
    tokenizer,
    maxact_config: MaxactConfig,
    layer: int,
    metadata: dict,
    by_interval: bool = False,
) -> int:
    """max_activations.parquet (or, `by_interval`, interval_examples.parquet from
    IntervalExamples.cpu()): sorted by feature, then (interval and) activation desc; zstd;
    one row group per ROW_GROUP_FEATURES features, built and written group by group.
    Returns rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    strings = TokenStrings(tokenizer)
    schema = interval_examples_schema() if by_interval else examples_schema()
    schema = schema.with_metadata({"loupe": json.dumps(metadata, sort_keys=True)})
    sort = [pq.SortingColumn(0)] + [pq.SortingColumn(12)] * by_interval
    sort.append(pq.SortingColumn(1, descending=True))
    num_latents = top["values"].shape[0]
    written = 0
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(
            tmp, schema, sorting_columns=sort, **writer_options(schema)
        ) as writer:
            for first in range(0, num_latents, ROW_GROUP_FEATURES):
                kept = top["sequences"][first : first + ROW_GROUP_FEATURES] >= 0
                features, slots = np.nonzero(kept)  # row-major: feature, then slot
                if not len(features):
                    continue
                features += first
                table = example_table(
                    top, features, slots, tokens, strings, tokenizer, maxact_config, layer
                )
                if by_interval:
                    per = top["values"].shape[1] // top["lower"].shape[1]
                    bucket = top["interval"][features, slots]
                    table = table.set_column(
                        table.schema.get_field_index("rank"),
                        "rank",
                        pa.array((slots % per).astype(np.int64)),
                    )
                    for name, values in (
                        ("interval", bucket),
                        ("interval_low", top["lower"][features, bucket].astype(np.float32)),
                        ("interval_high", top["upper"][features, bucket].astype(np.float32)),
                        ("interval_count", top["count"][features, bucket].astype(np.int64)),
                    ):
                        table = table.append_column(name, pa.array(values))
                writer.write_table(table.cast(schema), row_group_size=len(table))
                written += len(table)
    return written


def write_stats(
    path: Path,
    kept: np.ndarray,
    count: np.ndarray,
    total: np.ndarray,
    peak: np.ndarray,
    tokens: int,
    histogram: dict[str, np.ndarray],
    metadata: dict,
) -> dict:
    """feature_stats.parquet: one row per feature, dead ones included; `histogram` counts
    activations per bin (edges in the file's metadata, `histogram_edges`: bin 0 is below the
    first edge, the last at or above the last edge). One row group per ROW_GROUP_FEATURES."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    firing = count > 0
    mean = np.zeros(count.shape, dtype=np.float64)
    mean[firing] = total[firing] / count[firing]
    counts = histogram["counts"].astype(np.int64)
    lists = pa.ListArray.from_arrays(
        pa.array(np.arange(0, counts.size + 1, counts.shape[1], dtype=np.int32)),
        pa.array(counts.reshape(-1)),
    )
    meta = {**metadata, "histogram_edges": [float(e) for e in histogram["edges"]]}
    table = pa.table(
        {
            "feature": pa.array(np.arange(count.size, dtype=np.int64)),
            "fire_count": pa.array(count.astype(np.int64)),
            "density": pa.array(count / tokens if tokens else np.zeros(count.size)),
            "max_activation": pa.array(peak.astype(np.float32)),
            "mean_activation": pa.array(mean.astype(np.float32)),
            "examples": pa.array(kept.astype(np.int64)),
            "tokens": pa.array(np.full(count.size, tokens, dtype=np.int64)),
            "histogram": lists,
        },
        schema=stats_schema(),
    ).replace_schema_metadata({"loupe": json.dumps(meta, sort_keys=True)})
    with atomic_path(path) as tmp:
        pq.write_table(
            table, tmp, row_group_size=ROW_GROUP_FEATURES, **writer_options(table.schema)
        )
    return {"dead": int((~firing).sum()), "examples": int(kept.sum())}


def write_random_windows(
    path: Path, pool: dict[str, np.ndarray], tokens: np.ndarray, tokenizer, metadata: dict
) -> int:
    """random_windows.parquet from RandomWindows.cpu(): one row per window, in split order:
    window, sequence, start, token_ids, context, context_tokens (JSON, as in the examples),
    and per token its sparse code, `features` and `activations` ([width][k] lists; an
    activation of 0 marks an uncounted position). zstd. Returns rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, starts = pool["rows"], pool["starts"]
    size, width, k = pool["acts"].shape
    ids = np.asarray(tokens[rows[:, None], starts[:, None] + np.arange(width)]).astype(np.int64)
    strings = TokenStrings(tokenizer)
    offsets = np.arange(0, size * width + 1, width)

    def nested(flat: np.ndarray, typ) -> pa.Array:
        inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), typ), k)
        return pa.FixedSizeListArray.from_arrays(inner, width)

    table = pa.table(
        {
            "window": pa.array(np.arange(size, dtype=np.int64)),
            "sequence": pa.array(rows.astype(np.int64)),
            "start": pa.array(starts.astype(np.int64)),
            "token_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), width),
            "context": pa.array(decode_many(tokenizer, ids.tolist())),
            "context_tokens": _json_lists(pa.array(strings.as_json(ids.reshape(-1))), offsets),
            "features": nested(pool["indices"].astype(np.int32), pa.int32()),
            "activations": nested(pool["acts"].astype(np.float32), pa.float32()),
        }
    ).replace_schema_metadata({"loupe": json.dumps(metadata, sort_keys=True)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return size
