"""Faults a user causes at the workflow level (issue 27): each gets one line naming the
problem, Snakemake stops with exit status 1 before any job, and finished files stay."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import announced_jobs, copy_workflow, job_counts, run_snakemake, snakemake_env

from loupe.config import check_yaml
from loupe.errors import LoupeError

TOKENS_TARGET = "tokenize"  # the rule: its outputs' folder is named for the settings
SAE_TARGET = "results/layer_3/sae.safetensors"
DEMO = ("--profile", "profiles/demo", "--configfile", "profiles/demo/demo-config.yaml")


@pytest.fixture()
def checkout(tmp_path):
    """A user's checkout with one finished result in it (which nothing may touch)."""
    work = copy_workflow(tmp_path / "work")
    done = work / "results/tokens/manifest.json"
    done.parent.mkdir(parents=True)
    done.write_text('{"done": true}\n')
    return work


def stops_before_any_job(work, *args) -> str:
    """Run Snakemake for real; assert it failed (1) with the finished file untouched; returns
    what it printed."""
    before = (work / "results/tokens/manifest.json").stat()
    proc = run_snakemake(work, *DEMO, *args, check=False)
    after = (work / "results/tokens/manifest.json").stat()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert "Traceback" not in proc.stderr and "rule " not in proc.stdout  # no job started
    return proc.stderr


def test_a_yaml_mistake_in_config_yaml_names_the_file_and_line(checkout):
    text = (checkout / "config.yaml").read_text()
    (checkout / "config.yaml").write_text(text + "extra:\n\tindented: with a tab\n")
    line = len(text.splitlines()) + 2
    err = stops_before_any_job(checkout)
    assert (
        f"config file config.yaml, line {line}, column 1 is not valid YAML: found character" in err
    )


def test_check_yaml_names_file_line_and_problem(tmp_path):
    bad = tmp_path / "over.yaml"
    bad.write_text("sae:\n  k: 4\n\tfoo: 1\n")
    with pytest.raises(LoupeError) as e:
        check_yaml(bad)
    assert str(e.value) == (
        f"config file {bad}, line 3, column 1 is not valid YAML:"
        " found character '\\t' that cannot start any token"
    )
    (tmp_path / "ok.yaml").write_text("sae:\n  k: 4\n")
    check_yaml(tmp_path / "ok.yaml")


def test_check_config_names_the_configfile_snakemake_would_not(checkout):
    """Issue 27 #6: for a `--configfile` file Snakemake's message names neither file nor line
    (it parses them before the workflow runs); check-config, given the same files, does."""
    (checkout / "over.yaml").write_text("sae:\n  k: 4\n\tfoo: 1\n")
    demo = "profiles/demo/demo-config.yaml"
    proc = run_snakemake(checkout, *DEMO, "over.yaml", "-n", check=False)
    assert proc.returncode == 1
    assert "Config file is not valid JSON or YAML" in proc.stdout + proc.stderr
    check = [sys.executable, "-m", "loupe", "check-config", "--configfile", demo]
    env = snakemake_env()

    def run_check(*files):
        p = subprocess.run([*check, *files], cwd=checkout, env=env, capture_output=True, text=True)
        return p.returncode, p.stdout.strip(), p.stderr.strip().splitlines()[-1]

    code, _, err = run_check("over.yaml")
    assert code == 2 and err == (
        "loupe check-config: error: config file over.yaml, line 3, column 1 is not valid YAML:"
        " found character '\\t' that cannot start any token"
    )
    (checkout / "over.yaml").write_text("sae:\n  kk: 4\n")
    code, _, err = run_check("over.yaml")
    assert code == 2 and err.startswith(
        "loupe check-config: error: config error: unknown key sae/kk"
    )
    (checkout / "over.yaml").write_text("sae:\n  k: 4\n")
    code, out, _ = run_check("over.yaml")
    assert code == 0 and out == f"config OK: config.yaml + {demo} + over.yaml"


@pytest.mark.parametrize("key", ["model.name", "model.tokenizer", "dataset.path"])
def test_a_missing_local_folder_is_not_found_at_workflow_start(checkout, key):
    """Issue 27 #3: `results/no_such_model` was taken for a hub id; the tokenize job then
    removed the token links and blamed the network."""
    section, name = key.split(".")
    (checkout / "override.yaml").write_text(f"{section}:\n  {name}: results/no_such_model\n")
    err = stops_before_any_job(checkout, "override.yaml")
    assert f"{key}: not found: results/no_such_model (no such local file or folder)" in err


@pytest.mark.parametrize("key", ["repo", "space"])
def test_an_invalid_hub_id_stops_the_workflow_at_start(checkout, key):
    """Not yet tried in issue 27: invalid hub.repo / hub.space ids passed the schema's
    owner/name pattern; the upload, after every other stage, could not create them."""
    (checkout / "override.yaml").write_text(f"hub:\n  {key}: me/gemma--loupe\n")
    err = stops_before_any_job(checkout, "override.yaml")
    assert f"config error at hub/{key}: Cannot have -- or .. in repo_id: 'me/gemma--loupe'" in err


def test_a_dataset_folder_with_a_symlink_loop_stops_the_workflow_at_start(checkout):
    """Not yet tried in issue 27, at the workflow level: a dataset folder holding a file link
    that loops (and a folder link back up, which is read once) is one line at workflow start
    (it was a traceback), before the tokenize job could delete the token links."""
    corpus = checkout / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.jsonl").write_text('{"text": "one"}\n')
    (corpus / "sub" / "up").symlink_to("..")  # corpus/sub/up/sub/up/... forever
    (corpus / "loop.jsonl").symlink_to("loop.jsonl")
    (checkout / "override.yaml").write_text("dataset:\n  path: corpus\n")
    err = stops_before_any_job(checkout, "override.yaml")
    line = "dataset path corpus: corpus/loop.jsonl is a broken symlink or a symlink loop"
    assert [text for text in err.splitlines() if "symlink" in text] == [line]


# --- after a finished demo (e2e) --------------------------------------------------------------


def demo_copy(demo_run, tmp_path):
    return Path(shutil.copytree(demo_run, tmp_path / "run", symlinks=True))


def digests(folder: Path, pattern: str) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.glob(pattern))
    }


def run(work, *args, check=True):
    proc = run_snakemake(work, "--profile", "profiles/demo", *args, check=check)
    return proc, proc.stdout + proc.stderr


def ran(text: str) -> set[str]:
    """The rules of the jobs a run started."""
    return {job.rule for job in announced_jobs(text)}


@pytest.mark.e2e
def test_going_back_to_earlier_token_settings_reruns_nothing(demo_run, tmp_path):
    """Issue 27 #1: the relinked splits were touched by Snakemake at the end of tokenize (and
    with them the store's copy): the run with the original settings reran train, maxact and
    evaluate of every layer, summary and stage (21 jobs); after a *failed* tokenize the links
    were gone, and all of those ran again too. The splits' folder is now named for their
    settings: going back finds it untouched."""
    work = demo_copy(demo_run, tmp_path)
    finished = digests(work, "results/layer_*/*")
    demo = ("--configfile", "profiles/demo/demo-config.yaml")
    # Other token settings, tokenized (only the splits asked for).
    (work / "seed.yaml").write_text("tokens:\n  seed: 7\n")
    _, text = run(work, TOKENS_TARGET, *demo, "seed.yaml")
    assert ran(text) == {"tokenize"}
    # A tokenize that fails: a corpus without the configured text column.
    (work / "bad.jsonl").write_text('{"body": "no text column here"}\n' * 50)
    (work / "bad.yaml").write_text("dataset:\n  path: bad.jsonl\n")
    proc, text = run(work, TOKENS_TARGET, *demo, "bad.yaml", check=False)
    assert proc.returncode == 1 and ran(text) == {"tokenize"}
    # Back to the demo's settings: their splits are where they were, nothing is planned.
    _, text = run(work, "-n")
    assert job_counts(text) == {}  # nothing to be done
    # The other settings' splits are kept too: going to them again plans nothing either.
    _, text = run(work, "-n", TOKENS_TARGET, *demo, "seed.yaml")
    assert job_counts(text) == {}  # nothing to be done
    assert digests(work, "results/layer_*/*") == finished


@pytest.mark.e2e
def test_a_republished_sae_reruns_nothing_downstream_at_real_sizes(demo_run, tmp_path):
    """Issue 27 #1: an SAE republished from its finished checkpoint has a new mtime, and
    Snakemake compares by checksum only files under --max-checksum-file-size (1 MB; the
    demo's SAEs are smaller, so the limit here is set below their size, as for real SAEs)."""
    work = demo_copy(demo_run, tmp_path)
    sae = work / "results/layer_3/sae.safetensors"
    before = sae.read_bytes()
    real_sizes = ("--max-checksum-file-size", str(sae.stat().st_size // 2))
    sae.unlink()
    _, text = run(work, "results/layer_3/sae.safetensors", *real_sizes)
    assert ran(text) == {"train"}
    assert "had finished training" in (work / "results/layer_3/train.log").read_text()
    assert sae.read_bytes() == before
    _, text = run(work, "-n", *real_sizes)
    assert job_counts(text) == {}  # nothing to be done


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except psutil.Error:  # ended meanwhile
        return []


@pytest.mark.e2e
def test_killing_only_snakemake_while_training_loses_nothing(demo_run, tmp_path):
    """Issue 27 #7: a killed Snakemake leaves its jobs' outputs marked incomplete; the orphaned
    train job finishes them, and the next run stopped with IncompleteFilesException. Every
    profile now makes them again (rerun-incomplete; the demo's lacked it): training republishes
    its finished checkpoint, the same bytes."""
    import psutil

    work = demo_copy(demo_run, tmp_path)
    for name in ("sae.safetensors", "cfg.json", "train_metrics.jsonl", "sae.sha256"):
        (work / "results/layer_3" / name).unlink()
    # The finished checkpoint stays: the job republishes it (seconds, not a training run).
    proc = subprocess.Popen(
        [sys.executable, "-m", "snakemake", "--profile", "profiles/demo", SAE_TARGET],
        cwd=work, env=snakemake_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline, orphans = time.time() + 300, []
        while not any({"loupe", "train"} <= set(_cmdline(p)) for p in orphans):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
            try:
                orphans = psutil.Process(proc.pid).children(recursive=True)
            except psutil.Error:
                orphans = []
        proc.send_signal(signal.SIGKILL)  # Snakemake only: its train job runs on
        proc.wait()
        assert any(p.is_running() for p in orphans)
        psutil.wait_procs(orphans, timeout=600)
    finally:
        proc.kill()
        proc.wait()
    sae = work / "results/layer_3/sae.safetensors"
    trained = sae.read_bytes()  # the orphan finished it
    # A killed Snakemake leaves its lock: its own message says to run --unlock (a SIGTERM
    # would have stopped the train job with it: no orphan).
    proc, text = run(work, SAE_TARGET, check=False)
    assert proc.returncode == 1 and "LockException" in text and "--unlock" in text
    run(work, "--unlock")
    proc, text = run(work, SAE_TARGET, check=False)
    assert proc.returncode == 0 and "IncompleteFilesException" not in text, text[-3000:]
    assert ran(text) == {"train"}
    assert "had finished training" in (work / "results/layer_3/train.log").read_text()
    assert sae.read_bytes() == trained
