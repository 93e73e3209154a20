"""Summary: metrics.csv holds one row per layer with the eval.json numbers, the plots are real
PNGs of a readable size, and on the demo the Snakemake report builds offline."""

from __future__ import annotations

import csv
import json
import math

import matplotlib.image
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import REPO, demo_config, run_snakemake

from loupe.cli import main as cli_main
from loupe.errors import LoupeError
from loupe.metrics import CSV_COLUMNS
from loupe.summary import SummaryOutputs, write_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("fvu", "delta_ce", "dead", "density", "curves")


def fake_eval(layer: int) -> dict:
    return {
        "layer": layer,
        "hookpoint": f"language_model.layers.{layer}",
        "tokens": 1000,
        "fvu": 0.1 + 0.01 * layer,
        "explained_variance": 0.9 - 0.01 * layer,
        "cosine": 0.95,
        "l0": 8.0,
        "k": 8,
        "num_latents": 512,
        "dead_fraction": 0.02 * layer,
        "dense_fraction": 0.0,
        "ce_loss_clean": 3.0,
        "ce_loss_spliced": 3.0 + 0.05 * layer,
        "delta_ce": 0.05 * layer,
        "ce_loss_zero_ablation": 6.0,
        "ce_loss_score": None if layer == 5 else 0.98,  # undefined scores stay empty
        "kl": 0.01 * (layer + 1),
        "kl_zero_ablation": 2.0,
        "config": {"model": {"name": "x"}},
    }


def fake_layer(root, layer: int, dead: int = 10) -> tuple:
    """eval.json, feature_stats.parquet and train_metrics.jsonl for one layer."""
    folder = root / f"layer_{layer}"
    folder.mkdir()
    (folder / "eval.json").write_text(json.dumps(fake_eval(layer)))
    rng = np.random.default_rng(layer)
    density = 10 ** rng.uniform(-5, -1, 512)
    density[:dead] = 0
    pq.write_table(
        pa.table({"feature": np.arange(512), "density": density, "fire_count": density > 0}),
        folder / "feature_stats.parquet",
    )
    lines = [
        {"step": s, "tokens": s * 512, "fvu": 1.0 / s, "multi_topk_fvu": 0.5 / s}
        for s in range(4, 41, 4)
    ]
    (folder / "train_metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder / "eval.json", folder / "feature_stats.parquet", folder / "train_metrics.jsonl"


def outputs_in(folder) -> SummaryOutputs:
    return SummaryOutputs(
        metrics=folder / "metrics.csv",
        fvu=folder / "fvu_by_layer.png",
        delta_ce=folder / "delta_ce_by_layer.png",
        dead=folder / "dead_fraction_by_layer.png",
        density=folder / "density_histograms.png",
        curves=folder / "training_curves.png",
    )


def check_png(path, min_size=(300, 200)) -> tuple[int, int]:
    """A real PNG, of at least min_size pixels (width, height), not one flat colour."""
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert width >= min_size[0] and height >= min_size[1], (path, width, height)
    assert image.std() > 0.01, f"{path} is blank"
    return width, height


@pytest.fixture
def suite(tmp_path):
    layers = [4, 0, 5, 2]  # any order: rows come out sorted by layer
    files = [fake_layer(tmp_path, layer, dead=512 if layer == 5 else 10) for layer in layers]
    evals, stats, curves = (list(x) for x in zip(*files, strict=True))
    return layers, evals, stats, curves


def test_metrics_csv_has_one_row_per_layer_with_the_eval_numbers(tmp_path, suite):
    out = outputs_in(tmp_path / "summary")
    write_summary("models/tiny", *suite, out)
    with open(out.metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["layer"]) for r in rows] == [0, 2, 4, 5]
    assert tuple(rows[0]) == CSV_COLUMNS
    for r in rows:
        expected = fake_eval(int(r["layer"]))
        for key in ("fvu", "delta_ce", "dead_fraction", "kl", "explained_variance"):
            assert float(r[key]) == pytest.approx(expected[key]), key
        assert int(r["tokens"]) == 1000
        assert float(r["train_fvu"]) == pytest.approx(1 / 40)  # the last training line
        assert int(r["train_tokens"]) == 40 * 512
    assert rows[-1]["ce_loss_score"] == ""  # undefined, not a made-up number
    assert math.isclose(float(rows[0]["ce_loss_score"]), 0.98)


def test_plots_are_readable_pngs(tmp_path, suite):
    out = outputs_in(tmp_path / "summary")
    write_summary("models/tiny", *suite, out)
    sizes = {name: check_png(getattr(out, name)) for name in PLOTS}
    # The grids have one panel per layer (4 here: one row of 4 panels).
    assert sizes["density"][0] > 2.5 * sizes["density"][1]
    assert sizes["curves"][0] > 2.5 * sizes["curves"][1]


def test_grids_grow_with_the_number_of_layers(tmp_path):
    files = [fake_layer(tmp_path, layer) for layer in range(13)]
    evals, stats, curves = (list(x) for x in zip(*files, strict=True))
    out = outputs_in(tmp_path / "summary")
    write_summary("models/tiny", list(range(13)), evals, stats, curves, out)
    width, height = check_png(out.density)
    assert height > 0.35 * width  # 13 panels: three rows of six (one row: 0.25)


def test_wrong_or_missing_inputs_fail_in_one_line(tmp_path, suite):
    layers, evals, stats, curves = suite
    out = outputs_in(tmp_path / "summary")
    with pytest.raises(LoupeError, match="holds layer 0, expected layer 4"):
        write_summary("m", layers, [evals[1], *evals[1:]], stats, curves, out)
    with pytest.raises(LoupeError, match="4 layers but 3 eval files"):
        write_summary("m", layers, evals[:3], stats, curves, out)
    stats[2].unlink()
    with pytest.raises(LoupeError, match="feature stats not found"):
        write_summary("m", layers, evals, stats, curves, out)
    assert not out.metrics.exists()


def test_cli_writes_every_output(tmp_path, suite):
    layers, evals, stats, curves = suite
    out = outputs_in(tmp_path / "summary")
    # The per-layer lists come in model.layers order; the config names the layers.
    config = demo_config()
    config["model"].update(name="google/gemma-4-E2B", layers=layers)
    argv = ["summary", "--config", json.dumps(config)]
    argv += ["--evals", *map(str, evals)]
    argv += ["--stats", *map(str, stats), "--train-metrics", *map(str, curves)]
    for name in ("metrics", *PLOTS):
        argv += [f"--{name.replace('_', '-')}", str(getattr(out, name))]
    assert cli_main(argv) == 0
    for name in ("metrics", *PLOTS):
        assert getattr(out, name).stat().st_size > 0


@pytest.mark.e2e
def test_demo_evaluates_every_layer_and_builds_the_report(demo_run, config, tmp_path):
    results = demo_run / "results"
    k = config["sae"]["k"]
    for layer in config["model"]["layers"]:
        result = json.loads((results / f"layer_{layer}/eval.json").read_text())
        for key in ("fvu", "explained_variance", "cosine", "l0", "ce_loss_clean", "kl"):
            assert math.isfinite(result[key]), (layer, key)
        assert result["l0"] == k
        assert 0 < result["fvu"] < 1
    with open(results / "summary/metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["layer"]) for r in rows] == config["model"]["layers"]
    for name in ("fvu_by_layer", "delta_ce_by_layer", "dead_fraction_by_layer"):
        check_png(results / f"summary/{name}.png")
    for name in ("density_histograms", "training_curves"):
        check_png(results / f"summary/{name}.png", min_size=(1000, 300))

    report = tmp_path / "report.html"
    run_snakemake(demo_run, "--profile", "profiles/demo", "--report", str(report))
    html = report.read_text()
    assert len(html) > 100_000  # self-contained: the plots are embedded
    # Every file the rules put in the report (this round's tables and plots among them).
    captions = sorted(p.stem for p in (REPO / "workflow/report").glob("*.rst"))
    shown = {c: c.replace("_csv", ".csv") if c.endswith("_csv") else f"{c}.png" for c in captions}
    shown |= {"metrics": "metrics.csv"}
    del shown["workflow"]
    for name in shown.values():
        assert name in html, name
    assert "Fraction of variance unexplained on the held-out eval split" in html
