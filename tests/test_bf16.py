"""The model in bfloat16, the only way it runs on a GPU, exercised on the CPU: train, sample and
evaluate one demo layer with model.dtype bfloat16 and compare with the float32 run."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import train_layer, typed

from loupe.evaluate import evaluate_layer
from loupe.maxact import sample_layer
from loupe.model import load_model, model_dtype

LAYER = 2


def run_layer(settings: dict, dtype: str, token_dir, root) -> dict:
    """Train, sample and evaluate LAYER with the model in `dtype`; returns eval.json."""
    s = copy.deepcopy(settings)
    s["model"]["dtype"] = dtype
    config = typed(s)
    out = root / dtype
    manifest = token_dir / "manifest.json"
    train_layer(config, LAYER, token_dir / "train.npy", out, out / "ckpt", manifest=manifest)
    files = {k: out / f"{k}.parquet" for k in ("examples", "intervals", "stats", "logits")}
    sample_layer(
        config, LAYER, out / "sae.safetensors", token_dir / "sample.npy", manifest, **files
    )
    evaluate_layer(
        config,
        LAYER,
        out / "sae.safetensors",
        token_dir / "eval.npy",
        manifest,
        files["stats"],
        out / "eval.json",
    )
    return json.loads((out / "eval.json").read_text()) | {"files": files, "out": out}


@pytest.fixture(scope="module")
def both(settings, token_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dtypes")
    return {d: run_layer(settings, d, token_dir, root) for d in ("float32", "bfloat16")}


def test_the_model_really_runs_in_bfloat16(settings):
    model = load_model(settings["model"]["name"], torch.device("cpu"), None, "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model_dtype(torch.device("cpu"), "auto") == torch.float32


@pytest.mark.slow  # over 30 s: outside the fast loop
def test_bfloat16_outputs_are_finite_and_consistent(both):
    run = both["bfloat16"]
    from safetensors.torch import load_file

    weights = load_file(run["out"] / "sae.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    for key in ("fvu", "explained_variance", "cosine", "ce_loss_clean", "ce_loss_spliced", "kl"):
        assert math.isfinite(run[key]), key
    examples = pq.read_table(run["files"]["examples"]).to_pandas()
    stats = pq.read_table(run["files"]["stats"]).to_pandas().set_index("feature")
    assert np.isfinite(examples["activation"]).all() and (examples["activation"] > 0).all()
    # Each feature's top example is its maximum activation, and it fired that often.
    top = examples.groupby("feature")["activation"].max()
    assert np.allclose(top, stats.loc[top.index, "max_activation"], rtol=1e-6)
    assert (stats.loc[top.index, "fire_count"] >= examples.groupby("feature").size()).all()


@pytest.mark.slow  # over 30 s: outside the fast loop
def test_bfloat16_metrics_are_close_to_float32(both):
    f32, bf16 = both["float32"], both["bfloat16"]
    # bf16 keeps 8 bits of mantissa: activations differ by ~0.4%, the SAEs train on them.
    assert bf16["fvu"] == pytest.approx(f32["fvu"], abs=0.05)
    assert bf16["cosine"] == pytest.approx(f32["cosine"], abs=0.02)
    assert bf16["ce_loss_clean"] == pytest.approx(f32["ce_loss_clean"], rel=0.02)
    assert bf16["delta_ce"] == pytest.approx(f32["delta_ce"], abs=0.1)
    assert bf16["l0"] == f32["l0"]
