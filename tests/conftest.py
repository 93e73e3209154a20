"""Shared fixtures, built once per session: a small corpus, the tiny Gemma 4 model, token
splits, a trained SAE, and one full run of the demo workflow."""

from __future__ import annotations

import copy
import gzip
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ("Snakefile", "config.yaml", "workflow", "profiles", "envs")

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # no GPU in CI
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network


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


@pytest.fixture(scope="session")
def config() -> dict:
    return demo_config()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """The first 3000 documents of the demo corpus (enough for the token fixture)."""
    from loupe.demo import harvest_documents

    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for doc in itertools.islice(harvest_documents(), 3000):
            f.write(json.dumps(doc) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, small_corpus) -> Path:
    """The demo's tiny Gemma 4 model and tokenizer, saved like a hub checkpoint."""
    from loupe.demo import TinyModelSpec, build_tiny_model

    out = tmp_path_factory.mktemp("model") / "tiny-gemma4"
    build_tiny_model(out, small_corpus, TinyModelSpec())
    return out


@pytest.fixture(scope="session")
def settings(config, tiny_model, small_corpus) -> dict:
    """Demo settings pointing at the session's tiny model and corpus."""
    s = copy.deepcopy(config)
    s["model"]["name"] = str(tiny_model)
    s["dataset"]["path"] = str(small_corpus)
    s["tokens"].update(train_tokens=65536, sample_tokens=16384, eval_tokens=8192)
    s["train"].update(save_every=16, log_every=4)
    # The demo's second model is one the workflow builds; a test that wants it builds its own.
    s["evaluate"]["transfer_models"] = []
    return s


@pytest.fixture(scope="session")
def token_dir(tmp_path_factory, settings) -> Path:
    from loupe.tokens import tokenize

    out = tmp_path_factory.mktemp("tokens")
    tokenize(typed(settings), out)
    return out


@pytest.fixture(scope="session")
def trained_layer(tmp_path_factory, settings, token_dir) -> Path:
    """Layer 2's SAE trained on the token fixture: a folder with sae.safetensors, cfg.json."""
    from loupe.train import train_layer

    root = tmp_path_factory.mktemp("trained")
    out = root / "layer_2"
    train_layer(typed(settings), 2, token_dir / "train.npy", out, root / "checkpoints" / "layer_2")
    return out


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """One real run of the demo workflow's default target; returns its working directory."""
    workdir = copy_workflow(tmp_path_factory.mktemp("demo"))
    run_snakemake(workdir, "--profile", "profiles/demo")
    return workdir
