"""Tokenization: row invariants, disjoint splits, determinism, and each bad input."""

from __future__ import annotations

import gzip
import json
import re

import numpy as np
import pytest

from loupe.errors import LoupeError
from loupe.settings import dataset_spec, token_spec, tokenizer_name
from loupe.tokens import SPLITS, DatasetSpec, TokenSpec, open_split, tokenize


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


def _spec(settings, path, **tokens) -> tuple[DatasetSpec, TokenSpec]:
    ds = DatasetSpec(path=str(path), text_column="body")
    t = {**settings["tokens"], "train_tokens": 16384, "sample_tokens": 4096, "eval_tokens": 4096}
    return ds, TokenSpec(**{**t, **tokens})


def test_splits_share_no_document_and_are_deterministic(tmp_path, settings, tagged_corpus):
    from transformers import AutoTokenizer

    ds, spec = _spec(settings, tagged_corpus)
    a = tokenize(ds, spec, tokenizer_name(settings), tmp_path / "a")
    b = tokenize(ds, spec, tokenizer_name(settings), tmp_path / "b")
    assert a["sha256"] == b["sha256"]
    c = tokenize(
        ds, TokenSpec(**{**vars(spec), "seed": 1}), tokenizer_name(settings), tmp_path / "c"
    )
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
    return (
        not out_dir.exists() or not any(out_dir.glob("*.npy")) and not any(out_dir.glob(".*tmp*"))
    )


def test_missing_dataset_path(tmp_path, settings):
    ds = DatasetSpec(path=str(tmp_path / "nope.jsonl.gz"))
    with pytest.raises(LoupeError, match="dataset path not found"):
        tokenize(ds, token_spec(settings), tokenizer_name(settings), tmp_path / "out")
    assert _no_outputs(tmp_path / "out")


def test_missing_text_column(tmp_path, settings, small_corpus):
    ds = DatasetSpec(path=str(small_corpus), text_column="raw_content")
    with pytest.raises(LoupeError, match=r"text column 'raw_content' not in dataset.*'text'"):
        tokenize(ds, token_spec(settings), tokenizer_name(settings), tmp_path / "out")
    assert _no_outputs(tmp_path / "out")


def test_corpus_too_small_says_found_and_needed(tmp_path, settings, tagged_corpus):
    ds, spec = _spec(settings, tagged_corpus, train_tokens=50_000_000)
    with pytest.raises(
        LoupeError, match=r"corpus too small: .* documents gave [\d,]+ tokens .*need [\d,]+"
    ):
        tokenize(ds, spec, tokenizer_name(settings), tmp_path / "out")
    assert _no_outputs(tmp_path / "out")


def test_tokenizer_without_bos(tmp_path, settings, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.bos_token = None
    tok.save_pretrained(tmp_path / "nobos")
    with pytest.raises(LoupeError, match="has no BOS token"):
        tokenize(
            dataset_spec(settings), token_spec(settings), str(tmp_path / "nobos"), tmp_path / "out"
        )
    assert _no_outputs(tmp_path / "out")


def test_local_formats_txt_and_parquet(tmp_path, settings, small_corpus):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with gzip.open(small_corpus, "rt") as f:
        texts = [json.loads(line)["text"] for line in f][:600]
    pq.write_table(pa.table({"text": texts}), tmp_path / "docs.parquet")
    (tmp_path / "docs.txt").write_text("\n".join(t.replace("\n", " ") for t in texts))
    spec = TokenSpec(ctx_len=64, train_tokens=4096, sample_tokens=1024, eval_tokens=1024)
    for name in ("docs.parquet", "docs.txt"):
        m = tokenize(
            DatasetSpec(path=str(tmp_path / name)),
            spec,
            tokenizer_name(settings),
            tmp_path / name[5:],
        )
        assert m["rows"] == {"train": 64, "sample": 16, "eval": 16}


def test_open_split_errors(tmp_path):
    with pytest.raises(LoupeError, match="token split not found"):
        open_split(tmp_path / "sample.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 8), dtype=np.uint32))
    with pytest.raises(LoupeError, match="is empty"):
        open_split(tmp_path / "empty.npy")


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
            "--settings",
            json.dumps(bad),
            "--out-dir",
            str(tmp_path / "t"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"loupe tokenize: error: dataset path not found: {tmp_path / 'missing.parquet'}"
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
    ds = DatasetSpec(
        path="json",
        data_files=[str(tmp_path / f"documents/*/*/en_{p}.json.gz") for p in ("head", "middle")],
        text_column="raw_content",
    )
    spec = TokenSpec(ctx_len=64, train_tokens=8192, sample_tokens=2048, eval_tokens=2048)
    manifest = tokenize(ds, spec, tokenizer_name(settings), tmp_path / "tokens")
    assert manifest["rows"] == {"train": 128, "sample": 32, "eval": 32}
    assert manifest["dataset"]["data_files"] == ds.data_files
