"""RedPajama v2 source: the publisher's URL layout, its missing list, a seeded stream that
interleaves shards and reads every present document once, one warning per unreadable file."""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from redpajama_mirror import (
    CORRUPT,
    DOCS_PER_FILE,
    MISSING,
    NOT_FOUND,
    PARTS,
    SHARDS,
    SNAPSHOTS,
    TEXT,
    Mirror,
    build_tree,
    serve,
)

from loupe.config import Config
from loupe.errors import LoupeError
from loupe.redpajama import StreamStats, document_urls, iter_documents

LOGGER = "loupe.redpajama"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    root = tmp_path_factory.mktemp("redpajama")
    docs = build_tree(root)
    with serve(root) as base_url:
        yield Mirror(root, base_url, docs)


def warnings_naming(caplog, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno == logging.WARNING and text in r.getMessage()
    ]


def test_urls_follow_the_publisher_layout_minus_its_missing_list(mirror, caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    urls = document_urls(mirror.source())
    # The loading script's order: snapshot, shard, part; tags '{snapshot}/{n:04d}/{lang}_{part}'.
    layout = [
        f"{mirror.base_url}/documents/{snap}/{n:04d}/en_{part}.json.gz"
        for snap in SNAPSHOTS
        for n in range(SHARDS)
        for part in PARTS
    ]
    assert urls[0] == f"{mirror.base_url}/documents/2023-06/0000/en_head.json.gz"
    assert urls == [u for u in layout if u != mirror.url(MISSING)]
    assert len(warnings_naming(caplog, mirror.url(MISSING))) == 1

    head = document_urls(mirror.source(partition="head", shard_start=1, shard_count=2))
    assert head == [
        f"{mirror.base_url}/documents/{snap}/{n:04d}/en_head.json.gz"
        for snap in SNAPSHOTS
        for n in (1, 2)
    ]


def test_every_present_document_streams_exactly_once(mirror, caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    stats = StreamStats()
    texts = list(iter_documents(mirror.source(), TEXT, seed=0, stats=stats))

    expected = Counter(t for texts in mirror.docs.values() for t in texts)
    assert Counter(texts) == expected
    assert all(n == 1 for n in Counter(texts).values())
    assert len(mirror.docs) == 2 * SHARDS * len(PARTS) - 3  # 3 unreadable files

    # One warning for each file that could not be read, naming it (and why, for the 404).
    assert len(warnings_naming(caplog, mirror.url(MISSING))) == 1
    [not_found] = warnings_naming(caplog, mirror.url(NOT_FOUND))
    assert "404" in not_found
    assert len(warnings_naming(caplog, mirror.url(CORRUPT))) == 1
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 3

    assert stats.documents == len(texts) == DOCS_PER_FILE * len(mirror.docs)
    assert stats.files_total == 2 * SHARDS * len(PARTS) - 1  # less the listed one
    assert stats.files_done == len(mirror.docs)
    assert {url for url, _ in stats.skipped} == {mirror.url(NOT_FOUND), mirror.url(CORRUPT)}
    assert stats.open_files == [] and stats.files_unopened == 0
    assert f"{stats.documents:,} documents" in stats.summary()


def test_order_is_seeded(mirror):
    a = list(iter_documents(mirror.source(), TEXT, seed=0))
    b = list(iter_documents(mirror.source(), TEXT, seed=0))
    c = list(iter_documents(mirror.source(), TEXT, seed=1))
    assert a == b
    assert c != a and sorted(c) == sorted(a)


def test_documents_of_many_shards_are_interleaved(mirror):
    file_of = mirror.file_of()
    for seed in (0, 1, 2):
        first = [file_of[t] for t in list(iter_documents(mirror.source(), TEXT, seed=seed))[:20]]
        assert len(set(first)) >= 3, (seed, Counter(first))
        # Within each file, documents keep their order.
        stream = list(iter_documents(mirror.source(open_files=4), TEXT, seed=seed))
        for tag, texts in mirror.docs.items():
            assert [t for t in stream if file_of[t] == tag] == texts
    # One file open at a time reads files whole, one after another.
    serial = [file_of[t] for t in iter_documents(mirror.source(open_files=1), TEXT, seed=0)]
    assert len(set(serial[:DOCS_PER_FILE])) == 1


def test_a_local_folder_mirror_reads_the_same(mirror):
    local = mirror.source(base_url=str(mirror.root), missing_list_url=None)
    stats = StreamStats()
    texts = list(iter_documents(local, TEXT, seed=0, stats=stats))
    assert Counter(texts) == Counter(t for ts in mirror.docs.values() for t in ts)
    # Without the list, the missing file is skipped when it fails to open.
    assert {url for url, _ in stats.skipped} == {
        local.url(MISSING),
        local.url(NOT_FOUND),
        local.url(CORRUPT),
    }


def test_an_unreadable_missing_list_warns_once_and_the_file_fails_on_its_own(mirror, caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    source = mirror.source(missing_list_url=f"{mirror.base_url}/urls/nope.txt")
    assert mirror.url(MISSING) in document_urls(source)
    assert len(warnings_naming(caplog, "urls/nope.txt")) == 1


def test_bad_sources_are_one_clear_error(mirror):
    # What the schema checks, and what it cannot (the publisher's snapshots, the shard range's
    # end): each one line naming the key.
    where = "config error at dataset/redpajama"
    with pytest.raises(LoupeError, match=f"{where}/snapshots/0: '2023-6' does not match"):
        mirror.source(snapshots=["2023-6"])
    with pytest.raises(LoupeError, match=f"{where}/snapshots: unknown snapshot.*'2099-01'"):
        mirror.source(snapshots=["2023-14", "2099-01"])
    with pytest.raises(LoupeError, match=f"{where}/partition: 'all' is not one of"):
        mirror.source(partition="all")
    with pytest.raises(LoupeError, match=f"{where}/language: 'xx' is not one of"):
        mirror.source(language="xx")
    with pytest.raises(LoupeError, match=f"{where}: shards 4999..5000 outside 0..4999"):
        mirror.source(shard_start=4999, shard_count=2)
    with pytest.raises(LoupeError, match="'text' not in .*raw_content"):
        next(iter_documents(mirror.source(), "text", seed=0))
    with pytest.raises(LoupeError, match="no documents could be read"):
        list(iter_documents(mirror.source(base_url=f"{mirror.base_url}/nothing"), TEXT, seed=0))


def mirror_config(mirror, tokenizer: Path, **tokens) -> dict:
    """config.yaml reading RedPajama from the local mirror, with the tokenizer saved at
    `tokenizer`, rows of 64 tokens and 1,024-token sample and eval splits (`tokens` overrides)."""
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw["dataset"]["redpajama"].update(
        snapshots=list(SNAPSHOTS),
        shard_count=SHARDS,
        base_url=mirror.base_url,
        missing_list_url=mirror.missing_list_url,
    )
    raw["model"].update(name=str(tokenizer), tokenizer=None)
    raw["tokens"].update({"ctx_len": 64, "sample_tokens": 1024, "eval_tokens": 1024, **tokens})
    return raw


def test_real_tokenizer_splits_whole_documents_from_many_shards(mirror, tmp_path):
    """tokens.tokenize end to end through exactly the real config's path: the config.yaml's
    dataset.redpajama block, only base_url and missing_list_url pointed at the local mirror."""
    import loupe.tokens as tokens
    from loupe.demo import train_tokenizer

    corpus = tmp_path / "corpus.jsonl.gz"
    with gzip.open(corpus, "wt") as f:
        for texts in mirror.docs.values():
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
    tok = train_tokenizer(corpus, vocab_size=400)
    tok.save_pretrained(tmp_path / "tokenizer")

    raw = mirror_config(mirror, tmp_path / "tokenizer", train_tokens=4096, doc_batch_size=16)
    assert raw["dataset"]["redpajama"]["partition"] == "head_middle"  # config.yaml's own
    manifest = tokens.tokenize(Config.from_dict(raw), tmp_path / "out")

    file_of = {int(re.match(r"QQ(\d+)ZZ", t)[1]): tag for t, tag in mirror.file_of().items()}
    keys = {}
    for split in tokens.SPLITS:
        rows = np.load(tmp_path / "out" / f"{split}.npy")
        assert (rows[:, 0] == tok.bos_token_id).all()
        text = tok.decode(rows[:, 1:].ravel(), skip_special_tokens=True)
        keys[split] = {int(k) for k in re.findall(r"QQ(\d+)ZZ", text)}
        assert keys[split] <= file_of.keys(), split  # only documents of readable files
    assert not keys["train"] & keys["sample"]
    assert not keys["train"] & keys["eval"]
    assert not keys["sample"] & keys["eval"]
    assert len({file_of[k] for k in keys["train"]}) >= 3
    assert len({file_of[k] for k in keys["eval"]}) >= 2
    assert manifest["documents_read"] < DOCS_PER_FILE * len(mirror.docs)
    # The manifest names what was read (the card states it): only present files, by tag.
    sources = manifest["sources"]
    assert set(sources["snapshots"]) <= set(SNAPSHOTS)
    assert set(sources["files"]) <= {tag for tag in mirror.file_of().values()}
    # Files documents were taken from: up to one tokenizer batch more than were used.
    taken = sum(sources["files"].values())
    assert manifest["documents_read"] <= taken <= manifest["documents_read"] + 16


def test_running_out_says_collected_needed_files_and_what_to_add(mirror, tmp_path):
    import loupe.tokens as tokens
    from loupe.demo import train_tokenizer

    corpus = tmp_path / "corpus.jsonl.gz"
    with gzip.open(corpus, "wt") as f:
        f.write(json.dumps({"text": "a few words"}) + "\n")
    train_tokenizer(corpus, vocab_size=300).save_pretrained(tmp_path / "tokenizer")
    raw = mirror_config(mirror, tmp_path / "tokenizer", train_tokens=10**7)
    with pytest.raises(LoupeError) as e:
        tokens.tokenize(Config.from_dict(raw), tmp_path / "out")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("corpus too small: collected ")
    needed = sum(Config.from_dict(raw).tokens.rows().values()) * 64
    assert f"of {needed:,} tokens (train " in message
    assert "files read to the end" in message and "skipped" in message
    assert "raise dataset.redpajama.shard_count" in message
    assert not list((tmp_path / "out").glob("*.npy"))  # nothing half-written
