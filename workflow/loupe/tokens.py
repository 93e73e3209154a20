"""Tokenization: stream documents once, cut them into BOS-led rows of ctx_len tokens, and
deal whole documents into three disjoint splits (train, sample, eval) written as uint32 .npy."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import LoupeError
from .io import write_json
from .progress import progress

log = logging.getLogger(__name__)

SPLITS = ("train", "sample", "eval")
_EXTENSION_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".json.gz": "json",
    ".jsonl.gz": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".txt.gz": "text",
}


@dataclass(frozen=True)
class DatasetSpec:
    path: str
    data_files: list[str] | None = None
    name: str | None = None
    split: str = "train"
    text_column: str = "text"
    description: str = ""
    hub_id: str | None = None


@dataclass(frozen=True)
class TokenSpec:
    ctx_len: int
    train_tokens: int
    sample_tokens: int
    eval_tokens: int
    seed: int = 0
    shuffle_buffer: int = 10000
    doc_batch_size: int = 1000

    def rows(self) -> dict[str, int]:
        """Rows per split: whole rows, rounded up so each split has at least its tokens."""
        want = {"train": self.train_tokens, "sample": self.sample_tokens, "eval": self.eval_tokens}
        return {s: -(-n // self.ctx_len) for s, n in want.items()}


def _builder_for(path: str) -> str | None:
    name = path.lower()
    for ext in sorted(_EXTENSION_BUILDERS, key=len, reverse=True):
        if name.endswith(ext):
            return _EXTENSION_BUILDERS[ext]
    return None


def _looks_local(path: str) -> bool:
    # A hub id is "owner/name"; anything with a known extension, a leading ./ or /, or deeper
    # nesting is meant as a local path.
    return (
        path.startswith(("/", "./", "../", "~"))
        or _builder_for(path) is not None
        or path.count("/") > 1
        or os.path.exists(path)
    )


def resolve_source(spec: DatasetSpec) -> tuple[str, dict]:
    """(builder or hub id, load_dataset kwargs) for a dataset spec; checks local paths exist."""
    if spec.data_files:
        for f in spec.data_files:
            if "://" not in f and not any(ch in f for ch in "*?[") and not os.path.exists(f):
                raise LoupeError(f"dataset file not found: {f}")
        return spec.path, {"data_files": list(spec.data_files)}
    if _looks_local(spec.path):
        path = Path(spec.path).expanduser()
        if not path.exists():
            raise LoupeError(f"dataset path not found: {spec.path}")
        files = (
            sorted(p for p in path.rglob("*") if _builder_for(p.name)) if path.is_dir() else [path]
        )
        builders = {_builder_for(p.name) for p in files}
        if not files or None in builders:
            raise LoupeError(
                f"dataset path {spec.path}: no .json/.jsonl(.gz)/.parquet/.txt files found"
            )
        if len(builders) > 1:
            raise LoupeError(f"dataset path {spec.path}: mixes file types {sorted(builders)}")
        return builders.pop(), {"data_files": [str(p) for p in files]}
    return spec.path, {"name": spec.name}


def iter_texts(spec: DatasetSpec, seed: int, shuffle_buffer: int) -> Iterator[str]:
    """Stream document texts; never materialises the dataset."""
    from datasets import load_dataset

    source, kwargs = resolve_source(spec)
    try:
        ds = load_dataset(source, split=spec.split, streaming=True, **kwargs)
    except Exception as e:  # network, missing hub repo, bad builder: one line for the user
        raise LoupeError(f"cannot open dataset {spec.path!r}: {type(e).__name__}: {e}") from e
    if shuffle_buffer > 0:
        ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)
    column = spec.text_column
    for i, record in enumerate(ds):
        if column not in record:
            raise LoupeError(
                f"text column {column!r} not in dataset {spec.path!r} (columns: {sorted(record)})"
            )
        if i == 0 and not isinstance(record[column], str):
            raise LoupeError(
                f"text column {column!r} holds {type(record[column]).__name__}, not text"
            )
        yield record[column]


class _SplitWriter:
    """Fills one split's .npy row by row through a memory map, hashing as it goes."""

    def __init__(self, path: Path, rows: int, ctx_len: int, bos: int):
        self.path, self.rows, self.ctx_len, self.bos = path, rows, ctx_len, bos
        self.tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        self.array = np.lib.format.open_memmap(
            self.tmp, mode="w+", dtype=np.uint32, shape=(rows, ctx_len)
        )
        self.filled = 0
        self.pending = np.empty(0, dtype=np.uint32)
        self.hash = hashlib.sha256()

    @property
    def full(self) -> bool:
        return self.filled >= self.rows

    def add(self, tokens: np.ndarray) -> int:
        """Append document tokens; write every complete row. Returns rows written."""
        body = self.ctx_len - 1  # each row is BOS + body
        stream = np.concatenate([self.pending, tokens])
        n = min(len(stream) // body, self.rows - self.filled)
        if n:
            block = np.empty((n, self.ctx_len), dtype=np.uint32)
            block[:, 0] = self.bos
            block[:, 1:] = stream[: n * body].reshape(n, body)
            self.array[self.filled : self.filled + n] = block
            self.hash.update(block.tobytes())
            self.filled += n
        self.pending = stream[n * body :] if not self.full else np.empty(0, dtype=np.uint32)
        return n

    def commit(self) -> str:
        self.array.flush()
        del self.array
        os.replace(self.tmp, self.path)
        return self.hash.hexdigest()

    def discard(self) -> None:
        if self.tmp.exists():
            self.tmp.unlink()


def load_tokenizer(name: str, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, revision=revision)
    except Exception as e:
        raise LoupeError(f"cannot load tokenizer {name!r}: {type(e).__name__}: {e}") from e
    if tok.bos_token_id is None:
        raise LoupeError(f"tokenizer {name!r} has no BOS token; rows must start with one")
    if tok.eos_token_id is None:
        raise LoupeError(f"tokenizer {name!r} has no EOS token to separate documents")
    return tok


def tokenize(
    dataset: DatasetSpec,
    spec: TokenSpec,
    tokenizer_name: str,
    out_dir: Path,
    threads: int = 1,
    revision: str | None = None,
) -> dict:
    """Write {train,sample,eval}.npy ([rows, ctx_len] uint32) and manifest.json to out_dir.

    Whole documents are dealt to splits at random (seeded), in proportion to the tokens each
    split still needs, so no document is shared between training and evaluation."""
    # The fast tokenizer parallelises batched calls over this many threads.
    os.environ["RAYON_NUM_THREADS"] = str(max(1, threads))
    tok = load_tokenizer(tokenizer_name, revision)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    rows = spec.rows()
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {s: _SplitWriter(out_dir / f"{s}.npy", rows[s], spec.ctx_len, bos) for s in SPLITS}
    rng = np.random.default_rng(spec.seed)
    total_rows = sum(rows.values())
    docs = tokens_seen = 0
    start = time.perf_counter()
    try:
        bar = progress(total=total_rows, desc="tokenize", unit="row")
        texts = iter_texts(dataset, spec.seed, spec.shuffle_buffer)
        while not all(w.full for w in writers.values()):
            batch = list(itertools.islice(texts, spec.doc_batch_size))
            if not batch:
                found = sum(w.filled for w in writers.values()) * spec.ctx_len
                raise LoupeError(
                    f"corpus too small: {docs:,} documents gave {found:,} tokens in rows, "
                    f"need {total_rows * spec.ctx_len:,} ({', '.join(f'{s} {rows[s]:,} rows' for s in SPLITS)})"
                )
            encoded = tok(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"]
            for ids in encoded:
                docs += 1
                open_splits = [s for s in SPLITS if not writers[s].full]
                if not open_splits:
                    break
                need = np.array([rows[s] - writers[s].filled for s in open_splits], dtype=float)
                split = open_splits[int(rng.choice(len(open_splits), p=need / need.sum()))]
                arr = np.asarray(ids, dtype=np.uint32)
                arr = arr[arr != bos]  # BOS only ever starts a row
                tokens_seen += len(arr) + 1
                bar.update(writers[split].add(np.append(arr, np.uint32(eos))))
        bar.close()
        hashes = {s: writers[s].commit() for s in SPLITS}
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    elapsed = time.perf_counter() - start
    manifest = {
        "ctx_len": spec.ctx_len,
        "rows": rows,
        "tokens": {s: rows[s] * spec.ctx_len for s in SPLITS},
        "sha256": hashes,
        "documents_read": docs,
        "tokenizer": tokenizer_name,
        "vocab_size": len(tok),
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": tok.pad_token_id,
        "dataset": {k: v for k, v in vars(dataset).items()},
        "seed": spec.seed,
        "shuffle_buffer": spec.shuffle_buffer,
        "dtype": "uint32",
    }
    write_json(out_dir / "manifest.json", manifest)
    log.info(
        "tokenized %s documents into %s rows (%s tokens) in %.1fs: %.0f tokens/s",
        f"{docs:,}",
        f"{total_rows:,}",
        f"{total_rows * spec.ctx_len:,}",
        elapsed,
        tokens_seen / max(elapsed, 1e-9),
    )
    return manifest


def open_split(path: str | Path) -> np.ndarray:
    """Memory-map a split ([rows, ctx_len] uint32); one clear error if missing or empty."""
    path = Path(path)
    if not path.exists():
        raise LoupeError(f"token split not found: {path} (run the tokenize rule first)")
    arr = np.load(path, mmap_mode="r")
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise LoupeError(f"token split {path} is empty (shape {arr.shape})")
    return arr
