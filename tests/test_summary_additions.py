"""metrics.csv gains the evaluations suites are compared by: each layer's sparsity ladder
(`<metric>@k<k>`), its transfer models (`<metric>@<model>`) and the all-layer splice's prefix
ending at the layer (`<metric>_prefix`), each cell equal to the eval.json / spliced.json value
it comes from."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import demo_config
from test_summary import fake_layer, outputs_in

from loupe.cli import main as cli_main
from loupe.errors import LoupeError
from loupe.metrics import (
    CSV_COLUMNS,
    LADDER_COLUMNS,
    PREFIX_COLUMNS,
    TRANSFER_COLUMNS,
    ladder_column,
    transfer_column,
)
from loupe.summary import write_summary

LAYERS = [0, 2, 4]
KS = [4, 8, 32]  # 8: the trained k
MODELS = ["google/gemma-4-E2B-it", "results/demo/model_tuned"]


def with_additions(path, layer: int) -> dict:
    """The fake eval.json at `path` with a ladder (layer 4's lacks k 32) and two transfer
    models, every value distinct."""
    ev = json.loads(path.read_text())
    ev["ladder"] = [
        {"k": k, **{c.name: layer + k / 100 + i / 1e4 for i, c in enumerate(LADDER_COLUMNS)}}
        for k in KS
        if not (layer == 4 and k == 32)
    ]
    ev["transfer"] = [
        {"model": m, **{c.name: -layer - j - i / 1e4 for i, c in enumerate(TRANSFER_COLUMNS)}}
        for j, m in enumerate(MODELS)
    ]
    path.write_text(json.dumps(ev))
    return ev


def spliced_json(path, layers: list[int]) -> dict:
    prefixes = [
        {
            "spliced_layers": i + 1,
            "last_hookpoint": f"language_model.layers.{layer}",
            "last_layer": layer,
            "ce_loss_spliced": 3.0 + 0.1 * i,
            "delta_ce": 0.1 * i + 0.01,
            "kl": 0.02 * (i + 1),
        }
        for i, layer in enumerate(layers)
    ]
    data = {"layers": layers, "ce_loss_clean": 3.0, "prefixes": prefixes, "suite": prefixes[-1]}
    path.write_text(json.dumps(data))
    return data


@pytest.fixture
def suite(tmp_path):
    files = [fake_layer(tmp_path, layer) for layer in LAYERS]
    evals, stats, curves = (list(x) for x in zip(*files, strict=True))
    recorded = {layer: with_additions(e, layer) for layer, e in zip(LAYERS, evals, strict=True)}
    spliced = tmp_path / "spliced.json"
    return evals, stats, curves, recorded, spliced, spliced_json(spliced, LAYERS)


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_metrics_csv_gains_the_ladder_transfer_and_prefix_columns(tmp_path, suite):
    evals, stats, curves, recorded, spliced, prefixes = suite
    out = outputs_in(tmp_path / "summary")
    write_summary("models/tiny", LAYERS, evals, stats, curves, out, spliced)
    rows = read_rows(out.metrics)
    header = tuple(rows[0])
    extra = (
        *(ladder_column(c.name, k) for k in KS for c in LADDER_COLUMNS),
        *(transfer_column(c.name, m) for m in MODELS for c in TRANSFER_COLUMNS),
        "ce_loss_spliced_prefix",
        "delta_ce_prefix",
        "kl_prefix",
    )
    assert header == CSV_COLUMNS + extra  # today's columns first, unchanged
    assert "fvu@k8" in header and "delta_ce@google/gemma-4-E2B-it" in header
    for row, layer, prefix in zip(rows, LAYERS, prefixes["prefixes"], strict=True):
        ev = recorded[layer]
        for rung in ev["ladder"]:
            for c in LADDER_COLUMNS:
                assert float(row[ladder_column(c.name, rung["k"])]) == rung[c.name]
        for t in ev["transfer"]:
            for c in TRANSFER_COLUMNS:
                assert float(row[transfer_column(c.name, t["model"])]) == t[c.name]
        for c in PREFIX_COLUMNS:
            assert float(row[c.name]) == prefix[c.name.removesuffix("_prefix")]
        assert float(row["fvu"]) == ev["fvu"]  # the trained k's own columns stay
    # A rung one layer lacks leaves its cells empty, not another layer's number.
    assert rows[2]["fvu@k32"] == "" and rows[1]["fvu@k32"] != ""


def test_without_additions_the_columns_are_todays(tmp_path):
    """No ladder, no transfer models and no spliced.json: exactly CSV_COLUMNS."""
    files = [fake_layer(tmp_path, layer) for layer in LAYERS]
    evals, stats, curves = (list(x) for x in zip(*files, strict=True))
    out = outputs_in(tmp_path / "summary")
    write_summary("models/tiny", LAYERS, evals, stats, curves, out)
    assert tuple(read_rows(out.metrics)[0]) == CSV_COLUMNS


def test_a_splice_missing_a_layer_fails_in_one_line(tmp_path, suite):
    evals, stats, curves, _, spliced, _ = suite
    spliced_json(spliced, LAYERS[:2])  # an older splice, without layer 4
    out = outputs_in(tmp_path / "summary")
    with pytest.raises(LoupeError, match=r"no prefix ending at layer\(s\) \[4\]"):
        write_summary("models/tiny", LAYERS, evals, stats, curves, out, spliced)
    assert not out.metrics.exists()


def test_cli_takes_the_splice(tmp_path, suite):
    evals, stats, curves, recorded, spliced, prefixes = suite
    out = outputs_in(tmp_path / "summary")
    config = demo_config()
    config["model"]["layers"] = LAYERS
    argv = ["summary", "--config", json.dumps(config), "--evals", *map(str, evals)]
    argv += ["--stats", *map(str, stats), "--train-metrics", *map(str, curves)]
    for name in ("metrics", "fvu", "delta_ce", "dead", "density", "curves"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(out, name))]
    assert cli_main([*argv, "--spliced", str(spliced)]) == 0
    rows = read_rows(out.metrics)
    assert [float(r["kl_prefix"]) for r in rows] == [p["kl"] for p in prefixes["prefixes"]]
