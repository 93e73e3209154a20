"""The ladder and splice tables hold every rung and prefix of the JSON they come from, and the
plots render as PNGs."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import demo_config, typed

from loupe.cli import main as cli_main
from loupe.metrics import LADDER_COLUMNS, TRANSFER_COLUMNS
from loupe.tradeoffs import (
    LADDER_CSV_COLUMNS,
    SPLICED_CSV_COLUMNS,
    TRANSFER_CSV_COLUMNS,
    ladder_rows,
)


def rung(k: int, layer: int) -> dict:
    return {"k": k, **{c.name: layer + 1.0 / k for c in LADDER_COLUMNS}, "l0": float(k)}


def test_tables_and_plots_from_evals_and_splice(tmp_path, monkeypatch):
    layers = [0, 1, 2]
    evals = []
    for layer in reversed(layers):  # any order in: by layer out
        path = tmp_path / f"eval_{layer}.json"
        ladder = [rung(k, layer) for k in (2, 8, 32)]
        moved = [{"model": "it", **{c.name: -1.0 * layer for c in TRANSFER_COLUMNS}}]
        record = {c.name: 0.1 * layer for c in TRANSFER_COLUMNS}
        record.update(layer=layer, ladder=ladder, transfer=moved)
        path.write_text(json.dumps(record))
        evals.append(path)
    prefixes = [
        {
            "spliced_layers": i + 1,
            "last_hookpoint": f"layers.{layer}",
            "last_layer": layer,
            "ce_loss_spliced": 3.0 + i,
            "delta_ce": float(i),
            "kl": 0.5 * i,
        }
        for i, layer in enumerate(layers)
    ]
    spliced = tmp_path / "spliced.json"
    spliced.write_text(json.dumps({"prefixes": prefixes, "suite": prefixes[-1]}))
    monkeypatch.setenv("LOUPE_CONFIG", json.dumps(demo_config()))
    out = {n: tmp_path / n for n in ("l.csv", "l.png", "s.csv", "s.png", "t.csv", "t.png")}
    argv = ["tradeoffs", "--evals", *map(str, evals), "--spliced", str(spliced)]
    argv += ["--ladder-csv", str(out["l.csv"]), "--ladder-plot", str(out["l.png"])]
    argv += ["--spliced-csv", str(out["s.csv"]), "--spliced-plot", str(out["s.png"])]
    argv += ["--transfer-csv", str(out["t.csv"]), "--transfer-plot", str(out["t.png"])]
    assert cli_main(argv) == 0
    with open(out["l.csv"]) as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == LADDER_CSV_COLUMNS
    assert [(int(r["layer"]), int(r["k"])) for r in rows] == [
        (layer, k) for layer in layers for k in (2, 8, 32)
    ]
    assert float(rows[4]["fvu"]) == pytest.approx(1 + 1 / 8)
    with open(out["s.csv"]) as f:
        srows = list(csv.DictReader(f))
    assert tuple(srows[0]) == SPLICED_CSV_COLUMNS
    assert [float(r["kl"]) for r in srows] == [0.0, 0.5, 1.0]
    with open(out["t.csv"]) as f:
        trows = list(csv.DictReader(f))
    assert tuple(trows[0]) == TRANSFER_CSV_COLUMNS
    name = demo_config()["model"]["name"]
    assert [(int(r["layer"]), r["model"]) for r in trows] == [
        (layer, m) for layer in layers for m in (name, "it")
    ]
    assert [float(r["fvu"]) for r in trows] == [0.0, -0.0, 0.1, -1.0, 0.2, -2.0]
    for png in ("l.png", "s.png", "t.png"):
        assert out[png].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ladder_rows_skip_evals_without_a_ladder():
    assert ladder_rows([{"layer": 1}, {"layer": 0, "ladder": [rung(4, 0)]}]) == [
        {"layer": 0, **rung(4, 0)}
    ]
    assert typed(demo_config()).evaluate.k_ladder  # the demo climbs a ladder
