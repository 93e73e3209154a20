"""Inputs every benchmark shares, built once into a work folder and reused by later runs:
the demo corpus, its tokenizer, one random model per shape, and token splits."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from loupe.io import atomic_dir

from .shapes import Shape, repo_config

log = logging.getLogger(__name__)

VOCAB = 2048  # the demo tokenizer's; every benchmark model shares it
# Short rows keep the real SAE width affordable on a CPU; the cost model counts FLOPs at the
# real ctx_len (1024), so only the measured overhead ratios come from these rows.
BENCH_CTX_LEN = 64


def corpus(work: Path) -> Path:
    from loupe.demo import write_corpus

    path = work / "corpus.jsonl.gz"
    if not path.exists():
        min_bytes = repo_config("demo")["demo"]["min_corpus_bytes"]
        write_corpus(path, min_bytes)
    return path


def tokenizer(work: Path) -> Path:
    from loupe.demo import train_tokenizer

    out = work / "tokenizer"
    if not out.exists():
        with atomic_dir(out) as tmp:
            train_tokenizer(corpus(work), VOCAB).save_pretrained(tmp)
    return out


def model(work: Path, shape: Shape) -> Path:
    """A random model of the shape, saved like a hub checkpoint beside the tokenizer."""
    import torch
    from transformers import AutoTokenizer, Gemma4ForConditionalGeneration

    from loupe.demo import tiny_gemma4_config

    spec = shape.model
    assert spec.vocab_size == VOCAB, "benchmark models share the demo tokenizer"
    key = json.dumps(asdict(spec), sort_keys=True)
    out = work / "models" / shape.name
    if (out / "spec.json").exists() and (out / "spec.json").read_text() == key:
        return out
    torch.manual_seed(spec.seed)
    net = Gemma4ForConditionalGeneration(tiny_gemma4_config(spec))
    with atomic_dir(out) as tmp:
        net.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(tokenizer(work)).save_pretrained(tmp)
        (tmp / "spec.json").write_text(key)
    return out


def token_splits(work: Path, train_tokens: int, sample_tokens: int) -> Path:
    """Token splits of the demo corpus at the benchmark's ctx_len."""
    from loupe.tokens import DatasetSpec, TokenSpec, tokenize

    out = work / f"tokens-{BENCH_CTX_LEN}-{train_tokens}-{sample_tokens}"
    if not (out / "manifest.json").exists():
        spec = TokenSpec(BENCH_CTX_LEN, train_tokens, sample_tokens, BENCH_CTX_LEN * 8)
        tokenize(
            DatasetSpec(path=str(corpus(work)), text_column="text"), spec, str(tokenizer(work)), out
        )
    return out


def head_rows(split: Path, rows: int, dest: Path) -> Path:
    """The first `rows` rows of a split as their own file (a trainer runs exactly
    rows // batch_size batches)."""
    from loupe.tokens import open_split

    arr = open_split(split)
    if len(arr) < rows:
        raise SystemExit(f"{split} has {len(arr)} rows; the benchmark needs {rows}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    np.save(dest, np.ascontiguousarray(arr[:rows]))
    return dest
