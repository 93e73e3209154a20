"""The all-layer splice: identity SAEs leave the model's loss as it is at every prefix, one
spliced layer costs exactly its per-layer delta-CE, and the rule's job writes every prefix."""

from __future__ import annotations

import dataclasses
import json

import pytest
import test_evaluate
import torch
from helpers import demo_config, typed

import loupe.splice as sp
from loupe.evaluate import evaluate_sae
from loupe.metrics import SPLICED_COLUMNS
from loupe.model import load_sae
from loupe.splice import splice_job, splice_suite

# test_evaluate's module fixtures: the tiny model with its head, the eval split, special ids.
model, eval_rows, specials = test_evaluate.model, test_evaluate.eval_rows, test_evaluate.specials

HOOKS = [f"language_model.layers.{i}" for i in range(4)]


def test_identity_at_every_layer_gives_the_clean_loss(
    monkeypatch, model, trained_layer, eval_rows, specials
):
    sae = load_sae(trained_layer, torch.device("cpu"))
    monkeypatch.setattr(sp, "reconstruct", lambda sae, x: (x.clone(), None))
    got = splice_suite(model, [sae] * len(HOOKS), HOOKS, eval_rows, specials, 4 * 128, 2, 64)
    assert [p["spliced_layers"] for p in got["prefixes"]] == [1, 2, 3, 4]
    assert got["suite"] == got["prefixes"][-1]
    for prefix in got["prefixes"]:
        assert prefix["ce_loss_spliced"] == pytest.approx(got["ce_loss_clean"], abs=1e-6)
        assert prefix["kl"] == pytest.approx(0.0, abs=1e-6)
        assert list(prefix) == [c.name for c in SPLICED_COLUMNS]


def test_one_spliced_layer_equals_its_per_layer_delta_ce(model, trained_layer, eval_rows, specials):
    sae = load_sae(trained_layer, torch.device("cpu"))
    hook = "language_model.layers.2"
    spec = dataclasses.replace(
        typed(demo_config()).evaluate, batch_size=4, max_tokens=6 * 128, logit_chunk=64, k_ladder=[]
    )
    single = evaluate_sae(model, sae, hook, eval_rows, specials, spec)
    got = splice_suite(model, [sae], [hook], eval_rows, specials, 6 * 128, 4, 64)
    assert got["ce_tokens"] == single["ce_tokens"]
    assert got["ce_loss_clean"] == pytest.approx(single["ce_loss_clean"], rel=1e-6)
    assert got["suite"]["delta_ce"] == pytest.approx(single["delta_ce"], abs=1e-5)
    assert got["suite"]["kl"] == pytest.approx(single["kl"], abs=1e-6)
    assert single["delta_ce"] > 1e-4  # the SAE's splice costs something: the check has teeth


def test_splice_job_writes_every_prefix(tmp_path, settings, trained_layer, token_dir):
    # model.layers out of order: the prefixes still go by depth.
    s = dict(settings, model={**settings["model"], "layers": [2, 1]})
    s["evaluate"] = {**s.get("evaluate", {}), "spliced_max_tokens": 2 * 128}
    out = tmp_path / "spliced.json"
    sae = trained_layer / "sae.safetensors"
    splice_job(typed(s), [sae, sae], token_dir / "eval.npy", token_dir / "manifest.json", out)
    written = json.loads(out.read_text())
    assert written["layers"] == [1, 2]
    assert [p["last_layer"] for p in written["prefixes"]] == [1, 2]
    assert written["rows"] == 2
    # Each prefix is its own splice: both move the model, differently (the demo model is
    # random, so which costs more is not a property to test).
    one, two = written["prefixes"]
    assert one["kl"] > 0 and two["kl"] > 0 and one["kl"] != two["kl"]
    assert written["suite"] == two
