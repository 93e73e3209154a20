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
    check_hub_ids,
    check_sources,
    is_local,
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
        [
            "--log", str(log), "tokenize", "--config", json.dumps(settings),
            "--out-dir", str(out), "--store", str(out / STORE),
        ]
    )  # fmt: skip
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
        with pytest.raises(LoupeError, match=f"model.{key}: not found: .*no-such-model"):
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
    assert "is truncated or corrupt" in str(e.value) and "and run again" in str(e.value)


def test_one_test_tells_local_paths_from_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub = ["google/gemma-4-E2B", "gpt2", "models/gemma", "results/no_such_model"]
    local = ["/abs/model", "./model", "~/model", "a/b/c", "docs.jsonl.gz", "my model/x"]
    assert [is_local(n) for n in hub + local] == [False] * len(hub) + [True] * len(local)
    # A first part that is a folder here makes a two-part name local.
    (tmp_path / "models").mkdir()
    (tmp_path / "results").mkdir()
    assert is_local("models/gemma") and is_local("results/no_such_model")
    assert not is_local("google/gemma-4-E2B")


@pytest.mark.parametrize("key", ["model.name", "model.tokenizer", "dataset.path"])
def test_a_missing_local_name_is_not_found_not_a_network_error(
    tmp_path, monkeypatch, settings, key
):
    """`results/no_such_model` used to pass the start check as a hub id; the tokenize job then
    blamed the network ("couldn't connect to huggingface.co")."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    s = small(settings)
    section, name = key.split(".")
    s[section][name] = "results/no_such_model"
    with pytest.raises(LoupeError) as e:
        check_sources(typed(s))
    assert str(e.value) == f"{key}: not found: results/no_such_model (no such local file or folder)"


def test_offline_a_hub_id_missing_from_the_cache_is_not_found(tmp_path, monkeypatch, settings):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    s = small(settings)
    s["model"]["tokenizer"] = "someone/no-such-model"
    check_sources(typed(s))  # the start check needs no cache: dry runs plan offline
    with pytest.raises(LoupeError, match=r"^model.tokenizer: not found: someone/no-such-model is"):
        check_hub_ids(typed(s))
    (tmp_path / "hub" / "models--someone--no-such-model").mkdir(parents=True)
    check_hub_ids(typed(s))


def test_a_bit_flipped_split_leads_out_of_the_loop(tmp_path, settings, capfd):
    """Issue 27 #2: a split damaged in place (same size) made training advise deleting the
    manifest; tokenize then relinked the same damaged copy from its store, unchecked."""
    good = small(settings)
    out = tmp_path / "tokens"
    tokenize(typed(good), out)
    before = split_bytes(out)
    a = np.load(out / "train.npy", mmap_mode="r+")  # through the hard link: the store too
    a[5, 5] ^= 1
    a.flush()
    del a
    capfd.readouterr()
    code = cli.main(
        [
            "--log", str(tmp_path / "train.log"),
            "train", "--config", json.dumps(good), "--layers", "1",
            "--tokens", str(out / "train.npy"), "--manifest", str(out / TOKENS_MANIFEST),
            "--out-dir", str(tmp_path / "layer_1"), "--checkpoint-dir", str(tmp_path / "ckpt"),
        ]
    )  # fmt: skip
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        f"loupe train: error: token split {out / 'train.npy'} does not match its manifest's"
        f" sha256: delete {out / TOKENS_MANIFEST} and run again (tokenize checks its stored copy and"
        " tokenizes again if that is damaged too)"
    ]
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "layer_1").exists()
    # Following the advice: the damaged store is set aside, not relinked; the same splits again.
    (out / TOKENS_MANIFEST).unlink()
    tokenize(typed(good), out)
    assert split_bytes(out) == before
    store = out / STORE / store_key(typed(good))
    assert (store.parent / f"{store.name}.damaged" / "train.npy").is_file()
    open_split(out / "train.npy", read_tokens_manifest(out / TOKENS_MANIFEST))


def test_a_dataset_folder_with_symlink_loops(tmp_path, settings):
    """Not yet tried in issue 27: a folder linking to itself is read once; a file link that
    loops is one line at workflow start (it was a traceback)."""
    from loupe.tokens import resolve_source

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.jsonl").write_text('{"text": "one"}\n')
    (data / "sub" / "b.jsonl").write_text('{"text": "two"}\n')
    (data / "sub" / "up").symlink_to("..")  # data/sub/up/sub/up/... forever
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "c.jsonl").write_text('{"text": "three"}\n')
    (data / "linked").symlink_to(tmp_path / "more")  # a folder assembled from links
    s = small(settings, path=str(data))
    check_sources(typed(s))
    _, kwargs = resolve_source(typed(s).dataset)
    assert kwargs["data_files"] == [
        str(data / "a.jsonl"),
        str(data / "linked" / "c.jsonl"),
        str(data / "sub" / "b.jsonl"),
    ]
    (data / "loop.jsonl").symlink_to("loop.jsonl")
    with pytest.raises(LoupeError) as e:
        check_sources(typed(s))
    assert str(e.value) == (
        f"dataset path {data}: {data / 'loop.jsonl'} is a broken symlink or a symlink loop"
    )
    s = small(settings, path=str(data / "loop.jsonl"))
    with pytest.raises(LoupeError, match="^dataset.path: .*loop.jsonl is a broken symlink"):
        check_sources(typed(s))
