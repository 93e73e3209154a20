"""Tokenization: row invariants, disjoint splits, determinism, and each bad input."""

from __future__ import annotations

import copy
import gzip
import json
import re

import numpy as np
import pytest
from helpers import typed

from loupe.config import Config
from loupe.errors import LoupeError
from loupe.tokens import SPLITS, open_split, read_tokens_manifest, special_ids, tokenize


def test_rows_start_with_bos_and_hold_no_other(token_dir, settings):
    manifest = json.loads((token_dir / "manifest.json").read_text())
    ctx = settings["tokens"]["ctx_len"]
    for split in SPLITS:
        rows = np.load(token_dir / f"{split}.npy")
        assert rows.dtype == np.uint32
        assert rows.shape == (manifest["rows"][split], ctx)
        assert rows.shape[0] * ctx >= settings["tokens"][f"{split}_tokens"]
        assert (rows[:, 0] == manifest["bos_token_id"]).all()
        assert not (rows[:, 1:] == manifest["bos_token_id"]).any()
        assert rows.max() < manifest["vocab_size"]
        # Documents are separated by EOS: real text has many of them.
        assert (rows == manifest["eos_token_id"]).sum() > rows.shape[0] // 8


def test_manifest_records_how_the_tokens_were_made(token_dir, settings):
    import hashlib

    manifest = json.loads((token_dir / "manifest.json").read_text())
    assert manifest["seed"] == settings["tokens"]["seed"]
    assert manifest["tokenizer"] == settings["model"]["name"]
    assert manifest["dataset"]["path"] == settings["dataset"]["path"]
    for split in SPLITS:
        data = np.load(token_dir / f"{split}.npy")
        assert manifest["sha256"][split] == hashlib.sha256(data.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def tagged_corpus(tmp_path_factory, small_corpus):
    """Documents that each carry a unique tag, so a decoded row tells which document it
    came from."""
    path = tmp_path_factory.mktemp("tagged") / "tagged.jsonl.gz"
    with gzip.open(small_corpus, "rt") as src, gzip.open(path, "wt") as dst:
        for i, line in enumerate(src):
            text = json.loads(line)["text"][:400]
            dst.write(json.dumps({"body": f"QQ{i}ZZ {text} QQ{i}ZZ"}) + "\n")
    return path


def _config(settings, dataset: dict | None = None, tokens: dict | None = None, **model) -> Config:
    """The session's settings with a whole dataset or tokens section replaced (the schema fills
    the rest of a replaced section with its defaults) and model keys overridden."""
    s = copy.deepcopy(settings)
    if dataset is not None:
        s["dataset"] = dataset
    if tokens is not None:
        s["tokens"] = tokens
    s["model"].update(model)
    return typed(s)


def _tagged(settings, path, **tokens) -> Config:
    t = {**settings["tokens"], "train_tokens": 16384, "sample_tokens": 4096, "eval_tokens": 4096}
    return _config(settings, {"path": str(path), "text_column": "body"}, {**t, **tokens})


def test_splits_share_no_document_and_are_deterministic(tmp_path, settings, tagged_corpus):
    from transformers import AutoTokenizer

    config = _tagged(settings, tagged_corpus)
    a = tokenize(config, tmp_path / "a")
    b = tokenize(config, tmp_path / "b")
    assert a["sha256"] == b["sha256"]
    c = tokenize(_tagged(settings, tagged_corpus, seed=1), tmp_path / "c")
    assert c["sha256"] != a["sha256"]

    tok = AutoTokenizer.from_pretrained(settings["model"]["name"])
    docs = {}
    for split in SPLITS:
        text = tok.decode(np.load(tmp_path / "a" / f"{split}.npy").ravel())
        docs[split] = set(re.findall(r"QQ(\d+)ZZ", text))
        assert docs[split], split
    assert not docs["train"] & docs["sample"]
    assert not docs["train"] & docs["eval"]
    assert not docs["sample"] & docs["eval"]


def _no_outputs(out_dir):
    """Nothing written anywhere under out_dir (its split store included), no temporary left."""
    return not any(out_dir.rglob("*.npy")) and not any(out_dir.rglob(".*tmp*"))


def test_missing_dataset_path(tmp_path, settings):
    config = _config(settings, {"path": str(tmp_path / "nope.jsonl.gz")})
    with pytest.raises(LoupeError, match="dataset.path: not found"):
        tokenize(config, tmp_path / "out")
    assert _no_outputs(tmp_path / "out")


def test_missing_text_column(tmp_path, settings, small_corpus):
    config = _config(settings, {"path": str(small_corpus), "text_column": "raw_content"})
    with pytest.raises(LoupeError, match=r"text column 'raw_content' not in dataset.*'text'"):
        tokenize(config, tmp_path / "out")
    assert _no_outputs(tmp_path / "out")


def test_corpus_too_small_says_found_and_needed(tmp_path, settings, tagged_corpus):
    config = _tagged(settings, tagged_corpus, train_tokens=50_000_000)
    need = 50_000_000 + 4096 + 4096  # whole rows of 128 tokens: no rounding up here
    # Found and needed, after reading every one of the corpus's 3,000 documents.
    found = rf"collected [\d,]+ of {need:,} tokens \(.*\) from 3,000 documents"
    with pytest.raises(LoupeError, match=rf"corpus too small: {found}"):
        tokenize(config, tmp_path / "out")
    assert _no_outputs(tmp_path / "out")


def test_tokenizer_without_bos(tmp_path, settings, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.bos_token = None
    tok.save_pretrained(tmp_path / "nobos")
    with pytest.raises(LoupeError, match="has no BOS token"):
        tokenize(_config(settings, tokenizer=str(tmp_path / "nobos")), tmp_path / "out")
    assert _no_outputs(tmp_path / "out")


def test_local_formats_txt_and_parquet(tmp_path, settings, small_corpus):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with gzip.open(small_corpus, "rt") as f:
        texts = [json.loads(line)["text"] for line in f][:600]
    pq.write_table(pa.table({"text": texts}), tmp_path / "docs.parquet")
    (tmp_path / "docs.txt").write_text("\n".join(t.replace("\n", " ") for t in texts))
    tokens = {"ctx_len": 64, "train_tokens": 4096, "sample_tokens": 1024, "eval_tokens": 1024}
    for name in ("docs.parquet", "docs.txt"):
        m = tokenize(_config(settings, {"path": str(tmp_path / name)}, tokens), tmp_path / name[5:])
        assert m["rows"] == {"train": 64, "sample": 16, "eval": 16}


def test_open_split_errors(tmp_path):
    with pytest.raises(LoupeError, match="token split not found"):
        open_split(tmp_path / "sample.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 8), dtype=np.uint32))
    with pytest.raises(LoupeError, match="is empty"):
        open_split(tmp_path / "empty.npy")


def test_special_ids_from_the_manifest(token_dir, tmp_path):
    manifest = read_tokens_manifest(token_dir / "manifest.json")
    # The demo tokenizer: pad 0, eos 1, bos 2 (Gemma's ids).
    ids = (manifest["pad_token_id"], manifest["eos_token_id"], manifest["bos_token_id"])
    assert ids == (0, 1, 2)
    assert special_ids(manifest) == [0, 1, 2]
    assert special_ids({"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": None}) == [2]
    with pytest.raises(LoupeError, match="cannot read token manifest"):
        read_tokens_manifest(tmp_path / "missing.json")


def test_cli_prints_one_line_for_bad_input(tmp_path, settings):
    import subprocess
    import sys

    bad = json.loads(json.dumps(settings))
    bad["dataset"]["path"] = str(tmp_path / "missing.parquet")
    log = tmp_path / "tokenize.log"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loupe",
            "--log",
            str(log),
            "tokenize",
            "--config",
            json.dumps(bad),
            "--out-dir",
            str(tmp_path / "t"),
            "--store",
            str(tmp_path / ".store"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"loupe tokenize: error: dataset.path: not found: {tmp_path / 'missing.parquet'}"
        " (no such local file or folder)"
    ]
    assert "Traceback" not in log.read_text()
    assert not (tmp_path / "t" / "train.npy").exists()


def test_redpajama_code_path_on_local_json_gz(tmp_path, settings, small_corpus):
    """The real config reads RedPajama v2 through the json builder over data_files globs,
    text in `raw_content`: the same path on local files."""
    for part in ("head", "middle"):
        folder = tmp_path / "documents" / "2023-06" / f"000{part[0]}"
        folder.mkdir(parents=True)
        with (
            gzip.open(small_corpus, "rt") as src,
            gzip.open(folder / f"en_{part}.json.gz", "wt") as dst,
        ):
            for i, line in enumerate(src):
                if i % 2 == (part == "middle"):
                    dst.write(
                        json.dumps({"raw_content": json.loads(line)["text"], "doc_id": i}) + "\n"
                    )
    data_files = [str(tmp_path / f"documents/*/*/en_{p}.json.gz") for p in ("head", "middle")]
    config = _config(
        settings,
        {"path": "json", "data_files": data_files, "text_column": "raw_content"},
        {"ctx_len": 64, "train_tokens": 8192, "sample_tokens": 2048, "eval_tokens": 2048},
    )
    manifest = tokenize(config, tmp_path / "tokens")
    assert manifest["rows"] == {"train": 128, "sample": 32, "eval": 32}
    assert manifest["dataset"]["data_files"] == data_files


def test_whitespace_only_documents_are_skipped_and_counted(
    tmp_path, settings, tagged_corpus, caplog
):
    """Issue 27 #8: a document of only whitespace was tokenized (an EOS, no word) silently.
    With blank documents between the real ones, the splits are those of the corpus without
    them (no shuffle buffer: the stream order is the file's)."""
    with gzip.open(tagged_corpus, "rt") as f:
        lines = f.readlines()
    blanks = ["", " ", "\n\n", "\t \u3000"]
    with_blanks = tmp_path / "with_blanks.jsonl"
    with_blanks.write_text(
        "".join(line + json.dumps({"body": blanks[i % 4]}) + "\n" for i, line in enumerate(lines))
    )
    caplog.set_level("INFO", logger="loupe")
    got = tokenize(_tagged(settings, with_blanks, shuffle_buffer=0), tmp_path / "a")
    skipped = [r.getMessage() for r in caplog.records if "only whitespace" in r.getMessage()]
    want = tokenize(_tagged(settings, tagged_corpus, shuffle_buffer=0), tmp_path / "b")
    assert got["sha256"] == want["sha256"]
    assert got["documents_read"] == want["documents_read"]
    (n,) = [int(re.search(r"skipped ([\d,]+)", m)[1].replace(",", "")) for m in skipped]
    # One blank after each real document, read a batch at a time: the batches' blanks.
    ahead = settings["tokens"]["doc_batch_size"]
    assert want["documents_read"] - 1 <= n <= want["documents_read"] + ahead
