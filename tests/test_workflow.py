"""The DAG, tested by running Snakemake for real: config validation, planning, lint, and the
embedded demo end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import copy_workflow, demo_tokens, dry_run, job_counts, run_snakemake


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("checkout"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train:\n  bogus: 1\n", "config error: unknown key train/bogus"),
        (
            "tokens:\n  ctx_len: many\n",
            "config error at tokens/ctx_len: 'many' is not of type 'integer'",
        ),
        ("sae:\n  k: 0\n", "config error at sae/k: 0 is less than the minimum of 1"),
        ("device: tpu\n", "config error at device: 'tpu' does not match"),
        # The dry run is its own rule (upload_dry_run) now, not a switch.
        ("hub:\n  dry_run: true\n", "config error: unknown key hub/dry_run"),
    ],
)
def test_bad_config_stops_with_one_line_naming_the_key(checkout, tmp_path, override, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(override)
    proc = run_snakemake(checkout, "-n", "--configfile", str(bad), check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert sum(message in line for line in output.splitlines()) == 1, output[-2000:]
    assert "Traceback (most recent call last)" not in output


def test_unknown_layer_is_one_clear_error(checkout):
    proc = run_snakemake(checkout, "-n", "results/layer_99/sae.safetensors", check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "layer 99 is not configured (model.layers: 0..34, 35 layers)" in output
    assert "Traceback (most recent call last)" not in output


def test_real_config_plans_layer_17_alone_without_network(checkout):
    # HF_HUB_OFFLINE is set for the whole test session: planning must not need the Hub.
    proc = run_snakemake(checkout, "-n", "results/layer_17/sae.safetensors")
    output = proc.stdout + proc.stderr
    assert job_counts(output) == {"tokenize": 1, "train": 1}
    assert "results/layer_17/sae.safetensors" in output
    assert "layer_16" not in output


def test_lint_is_clean(checkout):
    proc = run_snakemake(checkout, "--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.e2e
def test_demo_produces_every_stage_output(demo_run, config):
    results = demo_run / "results"
    tokens = demo_run / demo_tokens()
    manifest = json.loads((tokens / "manifest.json").read_text())
    assert manifest["rows"]["train"] * manifest["ctx_len"] >= config["tokens"]["train_tokens"]
    for split in ("train", "sample", "eval"):
        rows = np.load(tokens / f"{split}.npy", mmap_mode="r")
        assert (rows[:, 0] == 2).all()
    for layer in config["model"]["layers"]:
        folder = results / f"layer_{layer}"
        for name in ("sae.safetensors", "cfg.json", "train_metrics.jsonl"):
            assert (folder / name).stat().st_size > 0, folder / name
        log = (folder / "train.log").read_text()
        assert f"trained layer {layer}:" in log and "Traceback" not in log
    # Nothing half-written is left behind.
    assert not list(results.rglob(".*.tmp*"))


@pytest.mark.e2e
def test_changed_setting_reruns_exactly_what_it_affects(demo_run, tmp_path):
    """A training setting reaches the train rule through params: changing it replans the
    training (and what depends on it) but not the tokenization."""
    override = tmp_path / "lr.yaml"
    override.write_text("train:\n  lr: 0.005\n")
    jobs = dry_run(
        demo_run, "--profile", "profiles/demo", "--configfile",
        "profiles/demo/demo-config.yaml", str(override),
    )  # fmt: skip
    assert jobs.get("train") == 6 and "tokenize" not in jobs, jobs
    assert dry_run(demo_run, "--profile", "profiles/demo") == {}
