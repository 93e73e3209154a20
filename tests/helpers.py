"""Helpers the tests import: building configs, copying the workflow, running Snakemake for
real and reading what it printed (job_counts, announced_jobs), training one layer. Fixtures live in
conftest.py."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ("Snakefile", "config.yaml", "workflow", "profiles", "envs")


def split_with_manifest(token_dir: Path, dest: Path, rows: int) -> Path:
    """The first `rows` rows of the training split in `dest`, with a manifest describing them
    (training checks a split against its manifest); the split's path."""
    import hashlib

    import numpy as np

    split = np.load(token_dir / "train.npy")[:rows]
    dest.mkdir(parents=True, exist_ok=True)
    np.save(dest / "train.npy", split)
    manifest = json.loads((token_dir / "manifest.json").read_text())
    manifest["rows"]["train"] = rows
    manifest["sha256"]["train"] = hashlib.sha256(np.ascontiguousarray(split).tobytes()).hexdigest()
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest / "train.npy"


def kill_after_first_checkpoint(cmd: list[str], state: Path, timeout: float = 180) -> None:
    """Run a training command and kill -9 it once `state` (its checkpoint) exists, a moment
    later: past the first checkpoint, maybe in the middle of a later one."""
    import signal
    import time

    proc = subprocess.Popen(cmd)
    try:
        deadline = time.time() + timeout
        while not state.exists():
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.time() < deadline
            time.sleep(0.01)
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()


def described_columns(path: Path, schema) -> dict[str, str]:
    """A parquet file's column descriptions as read from the file's own schema, checked: the
    columns and descriptions of `schema` (the writer's), every one non-empty."""
    import polars as pl
    import pyarrow.parquet as pq

    from loupe.examples import column_descriptions

    described = column_descriptions(pq.read_schema(path))
    assert described == column_descriptions(schema)
    assert all(described.values()), [c for c, d in described.items() if not d]
    assert pl.read_parquet(path).columns == list(described)  # and polars reads the file
    return described


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(Path(path).read_text())


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def demo_config() -> dict:
    """config.yaml with the demo overrides merged in, and the schema's defaults filled."""
    from loupe.config import validate

    return validate(
        deep_merge(
            load_yaml(REPO / "config.yaml"), load_yaml(REPO / "profiles/demo/demo-config.yaml")
        )
    )


def demo_tokens() -> str:
    """Where the demo's token splits are: a folder named for the settings that make them."""
    from loupe.tokens import store_key

    return f"results/tokens/{store_key(typed(demo_config()))}"


def typed(settings: dict):
    """The typed Config (what every stage function takes) of a raw settings dict."""
    from loupe.config import Config

    return Config.from_dict(settings)


def copy_workflow(dest: Path) -> Path:
    """A user's checkout of the workflow in `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / name)
    return dest


def snakemake_env() -> dict:
    env = dict(os.environ)
    # Rules call `python -m loupe`: make that this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 1500):
    """Run Snakemake for real in `workdir`; returns the CompletedProcess (text output)."""
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=workdir,
        env=snakemake_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def job_counts(output: str) -> dict[str, int]:
    """Rule -> jobs from Snakemake's 'Job stats' table (of a run or a dry run), without the
    total and the `all` aggregate; {} when there was nothing to be done (an output that says
    neither is not read as an empty plan)."""
    if "Job stats:" not in output:
        assert "Nothing to be done" in output, f"no job stats in:\n{output[-3000:]}"
        return {}
    table = output.split("Job stats:", 1)[1].split("\n\n")[0]
    rows = re.findall(r"^(\w+)\s+(\d+)\s*$", table, re.M)
    return {rule: int(n) for rule, n in rows if rule not in ("job", "total", "all")}


@dataclass(frozen=True)
class Job:
    """One job as Snakemake announces it in a run's or a dry run's output."""

    rule: str
    local: bool  # announced as `localrule` (run on the machine Snakemake runs on)
    wildcards: dict[str, str]
    resources: dict[str, str]
    shell: str | None  # its command where Snakemake prints one (-p)


JOB_BLOCK = re.compile(r"^(local)?rule (\w+):\n((?:    .*\n?)*)(?:Shell command: (.*))?", re.M)


def announced_jobs(output: str) -> list[Job]:
    """Every job Snakemake announces in `output` (a job started, or one a dry run plans; `all`
    included), in the order printed."""

    def pairs(text: str | None) -> dict[str, str]:  # "a=1, b=2"
        return dict(kv.split("=", 1) for kv in text.split(", ")) if text else {}

    found = []
    for local, rule, body, shell in JOB_BLOCK.findall(output):
        fields = dict(line.strip().split(": ", 1) for line in body.splitlines() if ": " in line)
        wildcards, resources = pairs(fields.get("wildcards")), pairs(fields.get("resources"))
        shell = None if shell in ("", "None") else shell  # None: a rule without one (`all`)
        found.append(Job(rule, bool(local), wildcards, resources, shell))
    return found


def dry_run(workdir: Path, *args: str, check: bool = True) -> dict[str, int]:
    """Jobs `snakemake -n *args` plans in `workdir`: {rule: count} (job_counts)."""
    proc = run_snakemake(workdir, "-n", *args, check=check)
    return job_counts(proc.stdout + proc.stderr)


def planned(workdir: Path, override: dict, tmp_path: Path) -> dict[str, int]:
    """Jobs a dry run plans for the demo's default target with `override` layered over the
    demo config: {rule: count}."""
    extra = tmp_path / "override.yaml"
    extra.write_text(yaml.safe_dump(override))
    return dry_run(
        workdir, "--profile", "profiles/demo", "--configfile",
        "profiles/demo/demo-config.yaml", str(extra),
    )  # fmt: skip


def train_layer(
    config,
    layer: int,
    tokens: Path,
    out_dir: Path,
    checkpoint_dir: Path,
    threads: int = 1,
    manifest: Path | None = None,
) -> dict:
    """Train layer `layer`'s SAE alone (a group of one) with loupe.train.train_group: writes
    sae.safetensors, cfg.json, train_metrics.jsonl into `out_dir`. `manifest` defaults to the
    one beside `tokens`. Its summary, with the one SAE's numbers at the top level."""
    from loupe.tokens import TOKENS_MANIFEST
    from loupe.train import train_group

    manifest = Path(tokens).with_name(TOKENS_MANIFEST) if manifest is None else manifest
    summary = train_group(config, [layer], tokens, manifest, [out_dir], checkpoint_dir, threads)
    (sae,) = summary.pop("saes")
    del summary["layers"]
    return summary | sae
