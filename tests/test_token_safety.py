"""Token splits are hours of work for gemma-loupe: a failed rerun never costs them, bad input
is reported in one line before any work, and every job checks a split against its manifest."""

from __future__ import annotations

import copy
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import typed

from loupe import cli
from loupe.errors import LoupeError
from loupe.tokens import (
    SPLITS,
    STORE,
    TOKENS_MANIFEST,
    check_sources,
    open_split,
    read_tokens_manifest,
    store_key,
    tokenize,
)


def small(settings: dict, **dataset) -> dict:
    s = copy.deepcopy(settings)
    s["tokens"].update(train_tokens=4096, sample_tokens=1024, eval_tokens=1024)
    s["dataset"].update(dataset)
    return s


def split_bytes(out: Path) -> dict[str, bytes]:
    return {
        name: (out / name).read_bytes() for name in (*(f"{s}.npy" for s in SPLITS), TOKENS_MANIFEST)
    }


def run_cli(settings: dict, out: Path, capfd) -> tuple[int, str]:
    """The tokenize command as a rule runs it (output to the log); returns the exit code and
    what reached the terminal."""
    capfd.readouterr()
    log = out.parent / "tokenize.log"
    code = cli.main(
        ["--log", str(log), "tokenize", "--config", json.dumps(settings), "--out-dir", str(out)]
    )
    return code, capfd.readouterr().err.strip()


def test_a_failed_rerun_keeps_the_splits_and_reverting_relinks_them(tmp_path, settings, capfd):
    good = small(settings)
    out = tmp_path / "tokens"
    tokenize(typed(good), out)
    before = split_bytes(out)
    mtimes = {n: (out / n).stat().st_mtime_ns for n in before}

    # What Snakemake does before rerunning the job: delete its outputs. Then the new
    # settings fail on bad data.
    bad_file = tmp_path / "broken.jsonl"
    bad_file.write_text('{"text": "fine"}\n{"text": broken\n')
    for name in before:
        (out / name).unlink()
    code, err = run_cli(small(settings, path=str(bad_file)), out, capfd)
    assert code == 2 and err.count("\n") == 0 and "cannot read dataset" in err
    assert str(bad_file) in err

    # Back to the old settings: the splits come back from the store, identical and with their
    # old mtimes (nothing downstream looks changed), without tokenizing again.
    for name in before:
        (out / name).unlink(missing_ok=True)
    tokenize(typed(good), out)
    assert split_bytes(out) == before
    assert {n: (out / n).stat().st_mtime_ns for n in before} == mtimes
    assert (out / STORE / store_key(typed(good)) / "train.npy").samefile(out / "train.npy")


def test_changing_only_an_execution_key_reuses_the_store(tmp_path, settings):
    out = tmp_path / "tokens"
    tokenize(typed(small(settings)), out)
    faster = small(settings)
    faster["tokens"]["doc_batch_size"] = 7
    assert store_key(typed(faster)) == store_key(typed(small(settings)))
    seeded = small(settings)
    seeded["tokens"]["seed"] = 1
    assert store_key(typed(seeded)) != store_key(typed(small(settings)))


def test_not_enough_disk_space_is_one_line_before_writing(tmp_path, settings, capfd):
    huge = small(settings)
    huge["tokens"]["train_tokens"] = 10**15  # 4 PB of uint32
    out = tmp_path / "tokens"
    code, err = run_cli(huge, out, capfd)
    assert code == 2 and "\n" not in err
    assert err.startswith("loupe tokenize: error: not enough disk space in")
    assert not list(out.rglob("*.npy*"))


def test_stale_temporary_files_of_killed_jobs_are_removed(tmp_path, settings):
    s = small(settings)
    out = tmp_path / "tokens"
    store = out / STORE / store_key(typed(s))
    store.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    stale = store / f".train.npy.tmp{dead}"
    stale.write_bytes(b"\0" * 1000)
    running = store / f".other.npy.tmp{os.getppid()}"  # a live process's: left alone
    running.write_bytes(b"\0")
    tokenize(typed(s), out)
    assert not stale.exists() and running.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"\xff\xfe caf\xe9 \x80\x81 not utf-8\n", "is not UTF-8 text"),
        (b"   \n\n", "holds no text"),
    ],
)
def test_bad_local_data_is_found_before_any_job(tmp_path, settings, content, message):
    data = tmp_path / "docs.txt"
    data.write_bytes(content)
    with pytest.raises(LoupeError) as e:
        check_sources(typed(small(settings, path=str(data))))
    assert message in str(e.value) and str(data) in str(e.value)


def test_bad_gzip_and_missing_folders_are_found_before_any_job(tmp_path, settings):
    data = tmp_path / "docs.jsonl.gz"
    data.write_bytes(b"not gzip at all")
    with pytest.raises(LoupeError, match="cannot be read"):
        check_sources(typed(small(settings, path=str(data))))
    ok = tmp_path / "ok.jsonl.gz"
    with gzip.open(ok, "wt") as f:
        f.write('{"text": "fine"}\n')
    check_sources(typed(small(settings, path=str(ok))))
    for key in ("name", "tokenizer"):
        s = small(settings, path=str(ok))
        s["model"][key] = str(tmp_path / "no-such-model")
        with pytest.raises(LoupeError, match=f"model.{key}: model folder not found"):
            check_sources(typed(s))
    # What the workflow builds itself (the demo model) is not expected to exist yet.
    s = small(settings, path=str(ok))
    s["model"]["name"] = "results/demo/model"
    check_sources(typed(s), built={"results/demo/model"})


@pytest.fixture()
def splits(tmp_path, settings) -> Path:
    out = tmp_path / "tokens"
    tokenize(typed(small(settings)), out)
    for name in os.listdir(out):  # private copies: the tests below damage them
        if name.endswith((".npy", ".json")):
            data = (out / name).read_bytes()
            (out / name).unlink()
            (out / name).write_bytes(data)
    return out


def test_a_split_is_checked_against_its_manifest(splits):
    manifest = read_tokens_manifest(splits / TOKENS_MANIFEST)
    assert open_split(splits / "train.npy", manifest).shape == (
        manifest["rows"]["train"],
        manifest["ctx_len"],
    )
    # One token changed: same shape, different content.
    arr = np.load(splits / "train.npy", mmap_mode="r+")
    arr[3, 5] ^= 1
    arr.flush()
    del arr
    with pytest.raises(LoupeError, match="does not match its manifest's sha256"):
        open_split(splits / "train.npy", manifest)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["rows"].update(eval=m["rows"]["eval"] + 1), "its manifest says"),
        (lambda m: m.update(ctx_len=m["ctx_len"] // 2), "its manifest says"),
        (lambda m: m.update(vocab_size=10), "beyond the vocabulary"),
        (lambda m: m.update(max_token_id=3), "above its manifest's max_token_id"),
    ],
)
def test_an_edited_manifest_is_caught(splits, edit, message):
    manifest = read_tokens_manifest(splits / TOKENS_MANIFEST)
    edit(manifest)
    with pytest.raises(LoupeError, match=message):
        open_split(splits / "eval.npy", manifest)


def test_a_truncated_split_is_one_line(splits):
    path = splits / "sample.npy"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LoupeError) as e:
        open_split(path)
    assert "is truncated or corrupt" in str(e.value) and "rerun tokenize" in str(e.value)
