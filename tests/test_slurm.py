"""profiles/slurm on a real SLURM controller (tests/slurm/cluster.sh: one machine that looks
like a GPU server). One run of the demo (layers 0, 1 and 3, every stage; layers 1 and 3 trained
as one group) through the profile, in which the group's training job is cancelled after its
first checkpoint: every non-local rule runs as a SLURM job, GPU rules get a GPU and memory
sized by the group, the retried group resumes both of its layers, and the outputs equal those
of a local run, byte for byte.

The cluster tests need root (apt, /etc/slurm, daemons); they skip only when SLURM cannot be
installed. The profile checks at the top need no cluster."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml
from helpers import (
    REPO,
    WORKFLOW_FILES,
    announced_jobs,
    copy_workflow,
    job_counts,
    run_snakemake,
    snakemake_env,
)

from loupe.jobs import train_mem_mb

SLURM_DIR = REPO / "tests/slurm"
CLUSTER = SLURM_DIR / "cluster.sh"
TEST_PROFILE = SLURM_DIR / "profile"  # status command squeue, short status intervals
COMPARE_CONFIG = SLURM_DIR / "compare-config.yaml"  # layers 0, 1, 3; groups [0] and [1, 3]
DEMO = ("--configfile", "profiles/demo/demo-config.yaml", str(COMPARE_CONFIG))
CANNOT_INSTALL = 77  # cluster.sh's exit status when slurm-wlm/munge cannot be installed
PROFILE = yaml.safe_load((REPO / "profiles/slurm/profile.yaml").read_text())
# The profile sends these rules to its GPU partition; a group's training rule (named by its
# layers) takes the site settings of rule train (workflow/rules/train.smk).
GPU_RULES = sorted(
    r for r, res in PROFILE["set-resources"].items() if res.get("slurm_partition") == "gpu"
)
LAYERS = (0, 1, 3)
GROUP = (1, 3)  # layers_per_job 2: layer 0 alone, then this group
GROUP_RULE = "train_layers_1_3"


def is_gpu_rule(rule: str) -> bool:
    return rule in GPU_RULES or rule == GROUP_RULE


# --- The profile itself (a dry run: no cluster needed) ---------------------------------------


def _planned_resources(workdir: Path, *args: str) -> dict[str, dict[str, str]]:
    """Rule -> its first job's resources, as a dry run of the demo prints them."""
    proc = run_snakemake(workdir, "-n", "--forceall", *args, *DEMO)
    out = proc.stdout + proc.stderr
    plans = {}
    for job in announced_jobs(out):
        plans.setdefault(job.rule, job.resources)
    assert plans, out[-3000:]
    return plans


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("slurm-checkout"))


def test_profile_sends_every_gpu_rule_to_a_gpu_partition(checkout):
    rules = _planned_resources(checkout)  # the rules' own resources
    with_profile = _planned_resources(checkout, "--profile", "profiles/slurm")
    # A rule that declares a GPU must be sent to the profile's GPU partition.
    assert sorted(r for r, res in rules.items() if res.get("gpu") == "1") == sorted(
        [*GPU_RULES, GROUP_RULE]
    )
    for rule in [*GPU_RULES, GROUP_RULE]:
        assert with_profile[rule]["slurm_partition"] == "gpu"
        assert with_profile[rule]["cpus_per_gpu"] == "8"
    # Training memory scales with the group: one SAE for layer 0, two for the group.
    assert rules["train"]["mem_mb"] == str(train_mem_mb([0]))
    assert rules[GROUP_RULE]["mem_mb"] == str(train_mem_mb(GROUP))
    # The profile's sizing is the rules' own, so a site profile that replaces set-resources
    # (layering replaces whole keys) never shrinks a job.
    for rule, res in with_profile.items():
        for key in ("mem_mb", "runtime", "gpu"):
            if key in rules[rule]:
                assert res[key] == rules[rule][key], (rule, key)


def test_site_profile_layers_over_the_cluster_profile(checkout):
    plans = _planned_resources(
        checkout, "--profile", "profiles/slurm", "--profile", "profiles/slurm-site-example"
    )
    for rule, layers in (("train", [0]), (GROUP_RULE, GROUP)):
        train = plans[rule]
        assert (train["slurm_partition"], train["gpu_model"], train["slurm_account"]) == (
            "gpu-a100",
            "a100",
            "my_project",
        ), rule
        # The demo trains 262,144 tokens: the shortest runtime the rule asks for, 1 h.
        assert (train["gpu"], train["cpus_per_gpu"], train["mem_mb"], train["runtime"]) == (
            "1",
            "8",
            str(train_mem_mb(layers)),
            "60",
        ), rule
    assert plans["tokenize"]["slurm_partition"] == "cpu"


# --- A real cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm_cluster():
    proc = subprocess.run(
        ["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=900
    )
    if proc.returncode == CANNOT_INSTALL:
        pytest.skip(f"SLURM cannot be installed here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, f"tests/slurm/cluster.sh start failed:\n{proc.stderr}"
    yield
    subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, text=True, timeout=120)


def submitted_jobs(output: str) -> list[str]:
    return re.findall(r"has been submitted with SLURM jobid (\d+)", output)


def slurm_job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (the test cluster keeps finished jobs for an hour)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"(\S+?)=(\S*)", out))


def job_rule(job: dict[str, str]) -> str:
    # The plugin comments each job with rule_<name>[_wildcards_<values>].
    return re.match(r"rule_(\w+?)(?:_wildcards_.*)?$", job["Comment"]).group(1)


def copy_checkout(src: Path, dest: Path) -> Path:
    """The workflow of `src` (not the repository's, which may change during a session)."""
    for name in WORKFLOW_FILES:
        (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, dest / name)
    return dest


def snakemake(workdir: Path, log: Path, *args: str) -> subprocess.Popen:
    """Snakemake in the background, its output in `log` (a pipe could fill up and block it)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "snakemake", *args],
            cwd=workdir,
            env=snakemake_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def cancel_after_first_checkpoint(workdir: Path, run: subprocess.Popen, log: Path):
    """scancel the group's training job once its first checkpoint is complete; its id."""
    # A checkpoint appears whole: loupe writes it aside and renames it into place. A group's
    # checkpoint folder is named after its shallowest layer.
    checkpoint = workdir / f"results/checkpoints/layer_{GROUP[0]}/state"
    deadline = time.monotonic() + 600
    while not (checkpoint / "state.pt").exists():
        assert run.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint within 600 s"
        time.sleep(0.1)
    running = subprocess.run(
        ["squeue", "-h", "-t", "RUNNING", "-o", "%i %k"], capture_output=True, text=True, check=True
    ).stdout
    jobs = [line.split(" ", 1) for line in running.splitlines()]
    job_id = next((i for i, comment in jobs if comment == f"rule_{GROUP_RULE}"), None)
    assert job_id, f"the group's training is not a running SLURM job: {running}"
    subprocess.run(["scancel", job_id], check=True)
    return job_id


@dataclass
class Runs:
    slurm: Path  # working directory of the run through profiles/slurm
    slurm_output: str
    cancelled_job: str  # SLURM id of the training job cancelled mid-run
    local: Path  # the same workflow, config and targets, run locally


@pytest.fixture(scope="module")
def runs(slurm_cluster, tmp_path_factory) -> Runs:
    """The demo (layers 0, 1 and 3, every stage) run from scratch through profiles/slurm,
    with the training of group [1, 3] cancelled after its first checkpoint (the profile's
    retries resubmit it), and at the same time locally (filling the SLURM run's idle status
    intervals). One torch thread per job in both (tests/slurm/profile)."""
    slurm_dir = copy_workflow(tmp_path_factory.mktemp("on-slurm"))
    local_dir = copy_checkout(slurm_dir, tmp_path_factory.mktemp("local"))
    logs = tmp_path_factory.mktemp("snakemake-output")
    one_thread = [f"{rule}=1" for rule in GPU_RULES]  # and the group's rule: train's setting
    # profiles/slurm unchanged; the test layer sets the status command, interval, threads.
    on_slurm = snakemake(
        slurm_dir,
        logs / "slurm.txt",
        "--profile",
        "profiles/slurm",
        "--profile",
        str(TEST_PROFILE),
        *DEMO,
    )
    local = snakemake(
        local_dir,
        logs / "local.txt",
        "--profile",
        "profiles/demo",
        *DEMO,
        "--set-threads",
        *one_thread,
    )
    try:
        cancelled = cancel_after_first_checkpoint(slurm_dir, on_slurm, logs / "slurm.txt")
        on_slurm.wait(timeout=900)
        local.wait(timeout=900)
    finally:
        for proc in (on_slurm, local):
            if proc.poll() is None:
                proc.kill()
    output = (logs / "slurm.txt").read_text()
    assert on_slurm.returncode == 0, output[-4000:]
    assert local.returncode == 0, (logs / "local.txt").read_text()[-4000:]
    return Runs(slurm_dir, output, cancelled, local_dir)


@pytest.mark.slurm
def test_every_non_local_rule_runs_as_a_slurm_job(runs):
    ran = job_counts(runs.slurm_output)
    local = {job.rule for job in announced_jobs(runs.slurm_output) if job.local}
    remote = Counter({rule: n for rule, n in ran.items() if rule not in local})
    assert {"demo_corpus", "tokenize", "train", GROUP_RULE} <= set(remote), ran
    jobs = [slurm_job(i) for i in submitted_jobs(runs.slurm_output)]
    done = [j for j in jobs if j["JobId"] != runs.cancelled_job]
    assert Counter(job_rule(j) for j in done) == remote
    for job in jobs:
        gpu = is_gpu_rule(job_rule(job))
        # What SLURM granted: one GPU and 8 CPUs per GPU on the gpu partition, else no GPU.
        assert job["Partition"] == ("gpu" if gpu else "debug"), job["Comment"]
        assert job.get("TresPerJob") == ("gres:gpu:1" if gpu else None), job["Comment"]
        if gpu:
            assert job["CpusPerTres"] == "gres:gpu:8" and job["NumCPUs"] == "8", job
    for job in done:
        assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), job["Comment"]
    # Memory by the number of SAEs a job trains; the demo's runtime is the rule's minimum.
    for rule, layers in (("train", [0]), (GROUP_RULE, GROUP)):
        train = [j for j in jobs if job_rule(j) == rule]
        assert {j["MinMemoryNode"] for j in train} == {f"{train_mem_mb(layers)}M"}, rule
        assert {j["TimeLimit"] for j in train} == {"01:00:00"}, rule


@pytest.mark.slurm
def test_cancelled_group_job_is_retried_and_resumes_every_member(runs, config):
    attempts = [
        (job["JobId"], job["JobState"])
        for job in map(slurm_job, submitted_jobs(runs.slurm_output))
        if job["Comment"] == f"rule_{GROUP_RULE}"
    ]
    assert attempts == [(runs.cancelled_job, "CANCELLED"), (attempts[-1][0], "COMPLETED")]
    every = config["train"]["log_every"]
    for layer in GROUP:
        # The group's log, in each member's train.log.
        log = (runs.slurm / f"results/layer_{layer}/train.log").read_text()
        resumed = re.search(r"resumed layers 1, 3 at batch (\d+)", log)
        assert resumed and "Resuming training at step" in log, log[-2000:]
        # Nothing lost or repeated: the metric rows of the local run, which was never cut,
        # except the averages of the one window the resume split (tokens_per_s is wall
        # time). The weights are compared in test_slurm_outputs_equal_a_local_run.
        step = int(resumed.group(1)) // config["train"]["grad_acc_steps"]
        rows = [
            [json.loads(x) for x in (d / f"results/layer_{layer}/train_metrics.jsonl").open()]
            for d in (runs.slurm, runs.local)
        ]
        assert 0 < step < rows[1][-1]["step"]  # cut mid-run
        counts = [[(r["step"], r["tokens"], r["trained_tokens"]) for r in rs] for rs in rows]
        assert counts[0] == counts[1]
        for cut, whole in zip(*rows, strict=True):
            if not cut["step"] - every < step < cut["step"]:
                cut.pop("tokens_per_s"), whole.pop("tokens_per_s")
                assert cut == whole, (layer, cut["step"])


def results_files(workdir: Path) -> set[str]:
    return {str(p.relative_to(workdir)) for p in (workdir / "results").rglob("*") if p.is_file()}


def same_bytes(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


@pytest.mark.slurm
def test_slurm_outputs_equal_a_local_run(runs):
    from safetensors.torch import load_file

    dirs = (runs.slurm, runs.local)
    assert results_files(runs.slurm) == results_files(runs.local)
    for name in ("demo/corpus.jsonl.gz", "demo/model/model.safetensors"):
        assert same_bytes(*(d / "results" / name for d in dirs)), name
    # One token folder each (named for the settings), the same one.
    (tokens,) = {p.name for d in dirs for p in (d / "results/tokens").iterdir()} - {".store"}
    for name in ("train.npy", "sample.npy", "eval.npy", "manifest.json"):
        assert same_bytes(*(d / "results/tokens" / tokens / name for d in dirs)), name
    for layer in LAYERS:
        folder = f"results/layer_{layer}"
        # Same seed, same batches, CPU: bit-identical weights, the group resumed or not.
        a, b = (load_file(d / folder / "sae.safetensors") for d in dirs)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (layer, name)
        assert same_bytes(*(d / folder / "cfg.json" for d in dirs)), layer
        for name in ("max_activations.parquet", "feature_stats.parquet"):
            if (runs.slurm / folder / name).exists():
                x, y = (pl.read_parquet(d / folder / name) for d in dirs)
                assert x.equals(y), (layer, name)
        if (runs.slurm / folder / "eval.json").exists():
            x, y = (json.loads((d / folder / "eval.json").read_text()) for d in dirs)
            x.pop("seconds"), y.pop("seconds")  # wall time, the one field that differs
            assert x == y, layer
