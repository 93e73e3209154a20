"""Shared fixtures, built once per session: a small corpus, the tiny Gemma 4 model, token
splits, a trained SAE, and one full run of the demo workflow."""

from __future__ import annotations

import copy
import gzip
import itertools
import json
import os
from pathlib import Path

import pytest
from helpers import copy_workflow, demo_config, run_snakemake, train_layer, typed

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # no GPU in CI
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network


def pytest_collection_modifyitems(items):
    # The fast loop (README, Development) must never build the demo: a test that needs the
    # demo run carries the e2e mark, or the session stops here naming it.
    unmarked = [
        i.nodeid for i in items if "demo_run" in i.fixturenames and not i.get_closest_marker("e2e")
    ]
    if unmarked:
        raise pytest.UsageError(f"tests use demo_run without @pytest.mark.e2e: {unmarked}")


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
