"""Tokenization: stream documents once, cut them into BOS-led rows of ctx_len tokens, and
deal whole documents into three disjoint splits (train, sample, eval) written as uint32 .npy.

Finished splits are never lost to a failed rerun. Snakemake deletes a job's outputs before it
runs, so the splits live in a store keyed by the settings that made them
(`{store}/{key}/`, by default `{out_dir}/.store/`) and the outputs are hard links into it: a
rerun that fails (bad data, no disk space) costs the links only, and tokenizing again with
settings tokenized before relinks the stored splits in seconds. The workflow keys the outputs'
folder too (`results/tokens/{key}/`), so returning to earlier settings finds their links still
there and plans nothing at all. Each job that opens a split checks it against the manifest
(shape, dtype, sha256, token ids within the vocabulary)."""

from __future__ import annotations

import codecs
import gzip
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from . import number_format
from .atomic import remove_stale_tmp, write_json
from .config import Config, DatasetConfig
from .errors import LoupeError
from .progress import progress

log = logging.getLogger(__name__)

SPLITS = ("train", "sample", "eval")
TOKENS_MANIFEST = "manifest.json"
STORE = ".store"
_EXTENSION_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".json.gz": "json",
    ".jsonl.gz": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".txt.gz": "text",
}


def _builder_for(path: str) -> str | None:
    name = path.lower()
    for ext in sorted(_EXTENSION_BUILDERS, key=len, reverse=True):
        if name.endswith(ext):
            return _EXTENSION_BUILDERS[ext]
    return None


_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def is_local(name: str) -> bool:
    """Whether a model, tokenizer or dataset name means a local file or folder rather than a
    Hugging Face Hub id ("owner/name", or a legacy "name"): the one test loupe uses for this.
    Local: a path prefix (/ . ~), more than one slash, a data file's extension, anything that
    exists here, a first part that is a folder here (`results/no_such_model`), or no valid hub
    id at all. Anything else is a hub id (`models/gemma` too, unless ./models exists)."""
    if name.startswith(("/", ".", "~")) or _builder_for(name) or os.path.exists(name):
        return True
    if not _HUB_ID.fullmatch(name):
        return True
    return "/" in name and os.path.isdir(name.split("/")[0])


def is_hub_id(name: str | None) -> bool:
    """A hub id with an owner (owner/name), not a local path: what links to a Hub page."""
    return bool(name and "/" in name and not is_local(name))


def check_name(key: str, name: str) -> None:
    """One line naming config `key` if `name` cannot be found: a local name that does not
    exist (else transformers and datasets try the hub and blame the network), or, with
    HF_HUB_OFFLINE set, a hub id that is not in the Hugging Face cache."""
    if is_local(name):
        if os.path.islink(name) and not os.path.exists(name):
            raise LoupeError(f"{key}: {name} is a broken symlink or a symlink loop")
        if not os.path.exists(os.path.expanduser(name)):
            raise LoupeError(f"{key}: not found: {name} (no such local file or folder)")
        return
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE and not any(
        (Path(constants.HF_HUB_CACHE) / f"{kind}--{name.replace('/', '--')}").is_dir()
        for kind in ("models", "datasets")
    ):
        raise LoupeError(
            f"{key}: not found: {name} is no local folder, and with HF_HUB_OFFLINE set the"
            f" hub id must be in the Hugging Face cache ({constants.HF_HUB_CACHE})"
        )


def resolve_source(dataset_config: DatasetConfig) -> tuple[str, dict]:
    """(builder or hub id, load_dataset kwargs) for the dataset config; checks local paths exist."""
    if dataset_config.data_files:
        for f in dataset_config.data_files:
            if "://" not in f and not any(ch in f for ch in "*?[") and not os.path.exists(f):
                raise LoupeError(f"dataset file not found: {f}")
        return dataset_config.path, {"data_files": list(dataset_config.data_files)}
    if is_local(dataset_config.path):
        check_name("dataset.path", dataset_config.path)
        path = Path(dataset_config.path).expanduser()
        files = _data_files(path) if path.is_dir() else [path]
        for f in files:
            if not f.is_file():
                raise LoupeError(
                    f"dataset path {dataset_config.path}: {f} is a broken symlink or a symlink loop"
                )
        builders = {_builder_for(p.name) for p in files}
        if not files or None in builders:
            raise LoupeError(
                f"dataset path {dataset_config.path}: no .json/.jsonl(.gz)/.parquet/.txt files found"
            )
        if len(builders) > 1:
            raise LoupeError(
                f"dataset path {dataset_config.path}: mixes file types {sorted(builders)}"
            )
        return builders.pop(), {"data_files": [str(p) for p in files]}
    return dataset_config.path, {"name": dataset_config.name}


def _names(config: Config, built: set[str]) -> list[tuple[str, str]]:
    """(config key, name) of the model, tokenizer and dataset the workflow does not build."""
    model_config, dataset_config = config.model, config.dataset
    named = [("model.name", model_config.name), ("model.tokenizer", model_config.tokenizer)]
    if not dataset_config.data_files:
        named.append(("dataset.path", dataset_config.path))
    return [(key, name) for key, name in named if name and name not in built]


def _data_files(folder: Path) -> list[Path]:
    """The data files under `folder`, following symlinked folders (a dataset assembled from
    links) but each real folder once: a symlink loop ends the descent instead of recursing."""
    seen, found = set(), []
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        found += [Path(root, f) for f in files if _builder_for(f)]
    return sorted(found)


def check_sources(config: Config, built: set[str] = frozenset()) -> None:
    """Cheap checks of the local inputs before any job runs (Snakemake deletes a job's old
    outputs before starting it): local model, tokenizer and dataset names exist (check_name),
    a local dataset is not empty and its first megabyte reads as text. Paths in `built` are
    made by the workflow."""
    for key, name in _names(config, built):
        if is_local(name):
            check_name(key, name)
    dataset_config = config.dataset
    path = dataset_config.path
    if path is None or path in built or not (dataset_config.data_files or is_local(path)):
        return
    _, kwargs = resolve_source(dataset_config)
    for f in kwargs.get("data_files", []):
        if "://" not in f and not any(ch in f for ch in "*?["):
            _check_readable(Path(f))


def check_hub_ids(config: Config, built: set[str] = frozenset()) -> None:
    """With HF_HUB_OFFLINE set, the hub ids in the config are in the Hugging Face cache
    (check_name). The workflow calls it when jobs are about to run; a dry run needs no cache."""
    for key, name in _names(config, built):
        if not is_local(name):
            check_name(key, name)


def _check_readable(path: Path, size: int = 1 << 20) -> None:
    if path.stat().st_size == 0:
        raise LoupeError(f"dataset file {path} is empty")
    if _builder_for(path.name) == "parquet":
        return  # binary: pyarrow checks its own footer when the job opens it
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(size)
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except (OSError, EOFError) as e:
        raise LoupeError(f"dataset file {path} cannot be read: {e}") from None
    except UnicodeDecodeError as e:
        raise LoupeError(
            f"dataset file {path} is not UTF-8 text (byte {e.start}: {head[e.start : e.start + 4]!r})"
        ) from None
    if not text.strip():
        raise LoupeError(f"dataset file {path} holds no text")


def iter_texts(
    dataset_config: DatasetConfig, seed: int, shuffle_buffer: int, stats=None
) -> Iterator[str]:
    """Stream document texts; never materialises the dataset. `stats`: a
    redpajama.StreamStats the RedPajama source fills (files read and skipped, current file)."""
    if dataset_config.redpajama is not None:
        from .redpajama import iter_documents

        yield from iter_documents(dataset_config.redpajama, dataset_config.text_column, seed, stats)
        return
    from datasets import load_dataset

    # datasets logs through its own handler on the terminal's stderr, bound at import: its
    # records go to the root logger (the rule's log) instead, the terminal gets one line.
    logging.getLogger("datasets").handlers.clear()
    source, kwargs = resolve_source(dataset_config)
    files = kwargs.get("data_files") or []
    where = f"dataset {dataset_config.path!r}" + (
        f" ({', '.join(map(str, files))})" if 0 < len(files) <= 3 else ""
    )
    try:
        ds = load_dataset(source, split=dataset_config.split, streaming=True, **kwargs)
        if shuffle_buffer > 0:
            ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)
        column = dataset_config.text_column
        for i, record in enumerate(ds):
            if column not in record:
                raise LoupeError(
                    f"text column {column!r} not in {where} (columns: {sorted(record)})"
                )
            if i == 0 and not isinstance(record[column], str):
                raise LoupeError(
                    f"text column {column!r} holds {type(record[column]).__name__}, not text"
                )
            yield record[column]
    except LoupeError:
        raise
    except Exception as e:  # network, missing hub repo, bad builder, a broken record or file
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise LoupeError(f"cannot read {where}: {type(e).__name__}: {first}") from e


class _SplitWriter:
    """Fills one split's .npy row by row through a memory map, hashing as it goes."""

    def __init__(self, path: Path, rows: int, ctx_len: int, bos: int):
        self.path, self.rows, self.ctx_len, self.bos = path, rows, ctx_len, bos
        self.tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        self.array = np.lib.format.open_memmap(
            self.tmp, mode="w+", dtype=np.uint32, shape=(rows, ctx_len)
        )
        # Reserve the whole file now: a memory map over a sparse file that cannot grow on a
        # full disk dies by SIGBUS mid-run; reserving fails at once with ENOSPC instead.
        if hasattr(os, "posix_fallocate"):
            with open(self.tmp, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(self.tmp))
        self.filled = 0
        self.pending = np.empty(0, dtype=np.uint32)
        self.hash = hashlib.sha256()
        self.max_id = 0

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
            self.max_id = max(self.max_id, int(block.max()))
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

    check_name("model.tokenizer", name)
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=revision)
    except Exception as e:
        raise LoupeError(f"cannot load tokenizer {name!r}: {type(e).__name__}: {e}") from e
    if tok.bos_token_id is None:
        raise LoupeError(f"tokenizer {name!r} has no BOS token; rows must start with one")
    if tok.eos_token_id is None:
        raise LoupeError(f"tokenizer {name!r} has no EOS token to separate documents")
    return tok


def store_key(config: Config) -> str:
    """The settings that make the splits (loupe.config.STAGE_READS['tokenize']), hashed."""
    blob = json.dumps(config.settings_for("tokenize"), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def link_into(store: Path, out_dir: Path) -> None:
    """Hard-link the stored splits and manifest into out_dir (the manifest last: it is what
    marks the set complete). Links keep the files' mtimes: nothing downstream looks changed."""
    for name in (*(f"{s}.npy" for s in SPLITS), TOKENS_MANIFEST):
        dst = out_dir / name
        tmp = dst.with_name(f".{name}.tmp{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            os.link(store / name, tmp)
        except OSError:  # a file system without hard links
            shutil.copy2(store / name, tmp)
        os.replace(tmp, dst)


def _reusable(store: Path) -> bool:
    """Whether `store` holds a complete, intact split set: its manifest, and every split
    matching it (open_split: shape, dtype, sha256, token ids). A damaged set (a bit flipped in
    place reaches the store too: the outputs are hard links to it) is moved aside to
    `{key}.damaged`, never relinked, so deleting the manifest really tokenizes again."""
    if not (store / TOKENS_MANIFEST).is_file():
        return False
    try:
        manifest = read_tokens_manifest(store / TOKENS_MANIFEST)
        for s in SPLITS:
            open_split(store / f"{s}.npy", manifest)
    except LoupeError as e:
        aside = store.with_name(f"{store.name}.damaged")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(store, aside)
        store.mkdir()
        log.warning(
            "stored token splits damaged (%s): moved them to %s, tokenizing again", e, aside
        )
        return False
    return True


def _check_disk(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise LoupeError(
            f"not enough disk space in {folder}: the token splits need"
            f" {number_format.size(needed)}, {number_format.size(free)} are free"
        )


def tokenize(config: Config, out_dir: Path, threads: int = 1, store: Path | None = None) -> dict:
    """Write {train,sample,eval}.npy ([rows, ctx_len] uint32) and manifest.json to out_dir, as
    hard links into `store/<key>/` (`store` defaults to `out_dir/.store`).

    Whole documents are dealt to splits at random (seeded), in proportion to the tokens each
    split still needs, so no document is shared between training and evaluation."""
    tokens_config, out_dir = config.tokens, Path(out_dir)
    rows = tokens_config.rows()
    out_dir.mkdir(parents=True, exist_ok=True)
    key = store_key(config)
    store = (Path(store) if store is not None else out_dir / STORE) / key
    store.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_tmp(store) + remove_stale_tmp(out_dir)
    if removed:
        log.info("removed %d temporary files of killed tokenize jobs", removed)
    if _reusable(store):
        link_into(store, out_dir)
        log.info("reused the token splits tokenized before with these settings (%s)", store)
        return read_tokens_manifest(out_dir / TOKENS_MANIFEST)
    _check_disk(store, sum(rows.values()) * tokens_config.ctx_len * 4)
    manifest = _tokenize_into(config, store, threads)
    write_json(store / TOKENS_MANIFEST, manifest)
    link_into(store, out_dir)
    return manifest


def _tokenize_into(config: Config, store: Path, threads: int) -> dict:
    dataset_config, tokens_config = config.dataset, config.tokens
    tokenizer_name, revision = config.model.tokenizer_name, config.model.revision
    # The fast tokenizer parallelises batched calls over this many threads.
    os.environ["RAYON_NUM_THREADS"] = str(max(1, threads))
    tok = load_tokenizer(tokenizer_name, revision)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    rows = tokens_config.rows()
    rng = np.random.default_rng(tokens_config.seed)
    total_rows = sum(rows.values())
    docs = tokens_seen = blank = 0
    start = time.perf_counter()
    stream_stats = None
    if dataset_config.redpajama is not None:
        from .redpajama import StreamStats

        stream_stats = StreamStats()
    try:
        writers = {
            s: _SplitWriter(store / f"{s}.npy", rows[s], tokens_config.ctx_len, bos) for s in SPLITS
        }
    except OSError as e:
        for f in store.glob(".*.tmp*"):
            f.unlink()
        raise LoupeError(f"cannot reserve the token splits in {store}: {e}") from None

    def filled() -> str:
        return ", ".join(
            f"{s} {number_format.tokens(writers[s].filled * tokens_config.ctx_len)}"
            f"/{number_format.tokens(rows[s] * tokens_config.ctx_len)}"
            for s in SPLITS
        )

    try:
        bar = progress(total=total_rows, desc="tokenize", unit="row")
        texts = iter_texts(
            dataset_config, tokens_config.seed, tokens_config.shuffle_buffer, stream_stats
        )
        while not all(w.full for w in writers.values()):
            batch = list(itertools.islice(texts, tokens_config.doc_batch_size))
            if not batch:
                found = sum(w.filled for w in writers.values()) * tokens_config.ctx_len
                more = (
                    f"; {stream_stats.summary()}; {_hint(dataset_config)}"
                    if stream_stats is not None
                    else "; add documents or lower tokens.*_tokens"
                )
                raise LoupeError(
                    f"corpus too small: collected {found:,} of {total_rows * tokens_config.ctx_len:,}"
                    f" tokens ({filled()}) from {docs:,} documents{more}"
                )
            # A document of only whitespace has no word to learn from: skipped, counted.
            kept = [text for text in batch if text.strip()]
            blank += len(batch) - len(kept)
            encoded = (
                tok(kept, add_special_tokens=False, return_attention_mask=False)["input_ids"]
                if kept
                else []
            )
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
            current = getattr(stream_stats, "current", None)
            bar.set_postfix_str(filled() + (f"; reading {current}" if current else ""), False)
        bar.close()
        hashes = {s: writers[s].commit() for s in SPLITS}
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    elapsed = time.perf_counter() - start
    if blank:
        log.info("skipped %s documents that are only whitespace", f"{blank:,}")
    log.info(
        "tokenized %s documents into %s rows (%s tokens) in %.1fs: %.0f tokens/s",
        f"{docs:,}",
        f"{total_rows:,}",
        f"{total_rows * tokens_config.ctx_len:,}",
        elapsed,
        tokens_seen / max(elapsed, 1e-9),
    )
    return {
        "ctx_len": tokens_config.ctx_len,
        "rows": rows,
        "tokens": {s: rows[s] * tokens_config.ctx_len for s in SPLITS},
        "sha256": hashes,
        "documents_read": docs,
        "tokenizer": tokenizer_name,
        "vocab_size": len(tok),
        "max_token_id": max(w.max_id for w in writers.values()),
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": tok.pad_token_id,
        # What made these tokens: the keys tokenize reads (loupe.config.STAGE_READS).
        "dataset": config.settings_for("tokenize")["dataset"],
        "sources": stream_stats.sources() if stream_stats is not None else None,
        "seed": tokens_config.seed,
        "shuffle_buffer": tokens_config.shuffle_buffer,
        "dtype": "uint32",
    }


def _hint(dataset: DatasetConfig) -> str:
    from .redpajama import SHARDS_PER_SNAPSHOT

    rp = dataset.redpajama
    room = SHARDS_PER_SNAPSHOT - rp.shard_start
    return (
        f"to read more, raise dataset.redpajama.shard_count (now {rp.shard_count} per snapshot,"
        f" at most {room}) or add snapshots"
    )


def read_tokens_manifest(path: str | Path) -> dict:
    """The token manifest (tokenize's manifest.json)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise LoupeError(f"cannot read token manifest {path}: {e}") from e


def special_ids(manifest: dict) -> list[int]:
    """BOS, EOS and PAD ids of the tokenized splits: never a peak, never counted or scored."""
    ids = {manifest.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return sorted(i for i in ids if i is not None)


def open_split(path: str | Path, manifest: dict | None = None) -> np.ndarray:
    """Memory-map a split ([rows, ctx_len] uint32); one clear error if it is missing, empty,
    truncated, or (with its `manifest`) not the split the manifest describes: shape, dtype,
    sha256 and token ids below the vocabulary size are checked (about 1 s per GB)."""
    path = Path(path)
    if not path.exists():
        raise LoupeError(f"token split not found: {path} (run the tokenize rule first)")
    rerun = (
        f"delete {path.parent / TOKENS_MANIFEST} and run again (tokenize checks its stored copy"
        " and tokenizes again if that is damaged too)"
    )
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise LoupeError(f"token split {path} is truncated or corrupt ({e}): {rerun}") from None
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise LoupeError(f"token split {path} is empty (shape {arr.shape})")
    if manifest is not None:
        _verify(arr, path, manifest, rerun)
    return arr


def _verify(arr: np.ndarray, path: Path, manifest: dict, rerun: str) -> None:
    split = path.stem
    try:
        shape = (manifest["rows"][split], manifest["ctx_len"])
        dtype, digest, vocab = manifest["dtype"], manifest["sha256"][split], manifest["vocab_size"]
    except (KeyError, TypeError) as e:
        raise LoupeError(f"token manifest of {path} lacks {e}: {rerun}") from None
    if arr.shape != shape or arr.dtype != np.dtype(dtype):
        raise LoupeError(
            f"token split {path} is {arr.dtype} {arr.shape}, its manifest says {dtype} {shape}:"
            f" {rerun}"
        )
    h, top = hashlib.sha256(), 0
    step = max(1, (64 << 20) // (arr.shape[1] * arr.itemsize))  # 64 MB at a time
    for start in range(0, len(arr), step):
        block = np.ascontiguousarray(arr[start : start + step])
        h.update(block.data)
        top = max(top, int(block.max()))
    if h.hexdigest() != digest:
        raise LoupeError(f"token split {path} does not match its manifest's sha256: {rerun}")
    if top > manifest.get("max_token_id", top):
        raise LoupeError(
            f"token split {path} holds token id {top}, above its manifest's max_token_id: {rerun}"
        )
    if top >= vocab:
        raise LoupeError(
            f"token split {path} holds token id {top}, beyond the vocabulary ({vocab}): {rerun}"
        )
