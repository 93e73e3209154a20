"""Tokenization: the `tokenize` rule's code on the demo corpus, and its floor, the fast
tokenizer alone on the same documents held in memory."""

from __future__ import annotations

import gzip
import itertools
import json
import os
from pathlib import Path

from loupe.tokens import DatasetSpec, TokenSpec, load_tokenizer, tokenize

from .timing import median, now, peak_rss_mb, time_runs


def run(spec: dict) -> dict:
    """`repeats` tokenizations of `tokens` training tokens (plus a row each of sample and
    eval), timed one by one; then, with floor_runs, the floor on the same documents."""
    token_spec = TokenSpec(
        ctx_len=spec["ctx_len"],
        train_tokens=spec["tokens"],
        sample_tokens=spec["ctx_len"],
        eval_tokens=spec["ctx_len"],
        shuffle_buffer=spec["shuffle_buffer"],
        doc_batch_size=spec["doc_batch_size"],
    )
    dataset = DatasetSpec(path=spec["corpus"], text_column="text")
    seconds = []
    for _ in range(spec["repeats"]):
        t0 = now()
        manifest = tokenize(
            dataset, token_spec, spec["tokenizer"], Path(spec["out_dir"]), threads=spec["threads"]
        )
        seconds.append(now() - t0)
    tokens = sum(manifest["tokens"].values())
    out = {"runs_s": seconds, "tokens": tokens, "peak_rss_mb": peak_rss_mb()}
    if spec.get("floor_runs"):
        out["floor"] = _floor(spec, manifest["documents_read"])
    return out


def _floor(spec: dict, documents: int) -> dict:
    """The tokenizer alone on the documents the run read, in its batch size."""
    os.environ["RAYON_NUM_THREADS"] = str(max(1, spec["threads"]))
    tok = load_tokenizer(spec["tokenizer"])
    with gzip.open(spec["corpus"], "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in itertools.islice(f, documents)]
    size = spec["doc_batch_size"]
    counted = []

    def encode_all():
        n = 0
        for i in range(0, len(texts), size):
            ids = tok(texts[i : i + size], add_special_tokens=False, return_attention_mask=False)
            n += sum(len(x) for x in ids["input_ids"])
        counted.append(n)

    times = time_runs(encode_all, runs=spec["floor_runs"])
    return {"seconds": median(times), "runs_s": times, "tokens": counted[-1]}
