"""The Neuronpedia export: Neuronpedia's own export layout, every row with exactly the fields of
Neuronpedia's db models, its values loupe's parquet files' for sampled features; neighbours and
explanations mapped in when their files are given."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import polars as pl
import pytest
from helpers import run_snakemake, typed

from loupe.neuronpedia import (
    TOP_COS_SIM,
    explanation_rows,
    export,
    histogram_bars,
    read_neighbours,
)
from loupe.saelens import SuiteFacts

# The field lists of Neuronpedia's db models, read from hijohnnylin/neuronpedia at commit
# ebb8426fc550ad5d1f76d52c271a624af3c08a57 (2026-08-20; db_models last changed in 1180d11e),
# utils/neuronpedia-utils/neuronpedia_utils/db_models/{source_release,model,source_set,source,
# feature,activation,explanation}.py: name -> type. "?" marks Optional (None allowed);
# "datetime" is written as an ISO string (export-data.py's getFormattedJsonlRow).
NEURONPEDIA_SOURCE = "hijohnnylin/neuronpedia@ebb8426fc550ad5d1f76d52c271a624af3c08a57"
FIELDS = {
    "release": {
        "name": "str",
        "description": "str",
        "creatorName": "str",
        "creatorId": "str",
        "visibility": "str",
        "isNewUi": "bool",
        "featured": "bool",
        "descriptionShort": "str?",
        "urls": "list[str]",
        "creatorEmail": "str?",
        "creatorNameShort": "str?",
        "defaultSourceSetName": "str?",
        "defaultSourceId": "str?",
        "defaultUmapSourceIds": "list[str]",
        "createdAt": "datetime",
    },
    "model": {
        "id": "str",
        "instruct": "bool",
        "creatorId": "str",
        "displayNameShort": "str",
        "displayName": "str",
        "tlensId": "str?",
        "dimension": "int?",
        "visibility": "str",
        "defaultSourceSetName": "str?",
        "defaultSourceId": "str?",
        "inferenceEnabled": "bool",
        "layers": "int",
        "neuronsPerLayer": "int",
        "createdAt": "datetime",
        "owner": "str",
        "updatedAt": "datetime",
        "website": "str?",
    },
    "sourceset": {
        "modelId": "str",
        "name": "str",
        "creatorId": "str",
        "hasDashboards": "bool",
        "visibility": "str",
        "description": "str",
        "type": "str",
        "creatorName": "str",
        "urls": "list[str]",
        "creatorEmail": "str?",
        "releaseName": "str?",
        "defaultOfModelId": "str?",
        "defaultRange": "int",
        "defaultShowBreaks": "bool",
        "showDfa": "bool",
        "showCorrelated": "bool",
        "showHeadAttribution": "bool",
        "showUmap": "bool",
        "createdAt": "datetime",
    },
    "source": {
        "id": "str",
        "modelId": "str",
        "setName": "str",
        "creatorId": "str",
        "hasDashboards": "bool",
        "inferenceEnabled": "bool",
        "inferenceHosts": "list[str]",
        "saelensConfig": "str?",
        "saelensRelease": "str?",
        "saelensSaeId": "str?",
        "hfRepoId": "str?",
        "hfFolderId": "str?",
        "visibility": "str",
        "defaultOfModelId": "str?",
        "hasUmap": "bool",
        "hasUmapLogSparsity": "bool",
        "hasUmapClusters": "bool",
        "num_prompts": "int?",
        "num_tokens_in_prompt": "int?",
        "dataset": "str?",
        "notes": "str?",
        "createdAt": "datetime",
    },
    "features": {
        "modelId": "str",
        "layer": "str",
        "index": "str",
        "creatorId": "str?",
        "createdAt": "datetime",
        "maxActApprox": "float?",
        "hasVector": "bool",
        "vector": "list[float]",
        "vectorLabel": "str?",
        "vectorDefaultSteerStrength": "float?",
        "hookName": "str?",
        "topkCosSimIndices": "list[int]",
        "topkCosSimValues": "list[float]",
        "neuron_alignment_indices": "list[int]",
        "neuron_alignment_values": "list[float]",
        "neuron_alignment_l1": "list[float]",
        "correlated_neurons_indices": "list[int]",
        "correlated_neurons_pearson": "list[float]",
        "correlated_neurons_l1": "list[float]",
        "correlated_features_indices": "list[int]",
        "correlated_features_pearson": "list[float]",
        "correlated_features_l1": "list[float]",
        "neg_str": "list[str]",
        "neg_values": "list[float]",
        "pos_str": "list[str]",
        "pos_values": "list[float]",
        "frac_nonzero": "float",
        "freq_hist_data_bar_heights": "list[float]",
        "freq_hist_data_bar_values": "list[float]",
        "logits_hist_data_bar_heights": "list[float]",
        "logits_hist_data_bar_values": "list[float]",
        "decoder_weights_dist": "list[float]",
        "sourceSetName": "str?",
    },
    "activations": {
        "id": "str",
        "tokens": "list[str]",
        "index": "str",
        "layer": "str",
        "modelId": "str",
        "maxValue": "float",
        "maxValueTokenIndex": "int",
        "minValue": "float",
        "values": "list[float]",
        "creatorId": "str",
        "dataSource": "str?",
        "dataIndex": "str?",
        "dfaValues": "list[float]",
        "dfaTargetIndex": "int?",
        "dfaMaxValue": "float?",
        "createdAt": "datetime",
        "lossValues": "list[float]",
        "logitContributions": "str?",
        "binMin": "float?",
        "binMax": "float?",
        "binContains": "float?",
        "qualifyingTokenIndex": "int?",
        "zIndices": "list[list[int]]?",
        "zValues": "list[float]?",
    },
    "explanations": {
        "id": "str",
        "modelId": "str",
        "layer": "str",
        "index": "str",
        "description": "str",
        "authorId": "str",
        "embedding": "list[float]?",
        "triggeredById": "str?",
        "typeName": "str?",
        "explanationModelName": "str?",
        "notes": "str?",
        "createdAt": "datetime",
    },
}


def _is(value, kind: str) -> bool:
    if kind.endswith("?"):
        return value is None or _is(value, kind[:-1])
    if kind.startswith("list[") and kind.endswith("]"):
        return isinstance(value, list) and all(_is(v, kind[5:-1]) for v in value)
    if kind == "datetime":
        return isinstance(value, str) and re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d", value)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return type(value).__name__ == kind


def check_row(table: str, row: dict) -> None:
    """`row` has exactly the fields of Neuronpedia's db model for `table`, each of its type."""
    fields = FIELDS[table]
    assert set(row) == set(fields), (
        f"{table}: missing {sorted(set(fields) - set(row))}, unknown {sorted(set(row) - set(fields))}"
        f" (fields read from {NEURONPEDIA_SOURCE})"
    )
    for name, kind in fields.items():
        assert _is(row[name], kind), f"{table}.{name} = {row[name]!r} is not {kind}"


def read_jsonl(path: Path) -> list[dict]:
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return [json.loads(line) for line in text.splitlines()]


FACTS = SuiteFacts(
    model_name="org/model",
    context_size=16,
    dataset_path="org/data",
    exclude_tokens=(),
    neuronpedia_model="model",
    neuronpedia_set="suite-res-1k",
)


# --- the mapping, on small files ---------------------------------------------------------------


def test_histogram_bars_place_each_count_inside_its_bin():
    edges = [1e-2, 1e-1, 1.0, 10.0]
    values, heights = histogram_bars([0, 3, 0, 5, 0], edges)
    assert heights == [3.0, 0.0, 5.0]  # leading and trailing empty bins dropped
    assert values == pytest.approx([10**-1.5, 10**-0.5, 10**0.5])
    assert histogram_bars([7, 0, 0, 0, 1], edges) == (
        [1e-2, 10**-1.5, 10**-0.5, 10**0.5, 10.0],
        [7.0, 0.0, 0.0, 0.0, 1.0],
    )
    assert histogram_bars([0] * 5, edges) == ([], [])


def test_neighbours_map_the_same_layer_best_first(tmp_path):
    """topkCosSim takes the within-layer neighbours (relation "same") in rank order, never
    the adjacent layers', at most TOP_COS_SIM of them."""
    rows = [(0, "same", r, 3, 100 + r, 0.9 - r / 100) for r in range(TOP_COS_SIM + 5)]
    rows += [(0, "prev", 0, 2, 7, 0.99), (0, "next", 0, 4, 8, 0.98), (1, "same", 0, 3, 5, 0.5)]
    columns = ["feature", "relation", "rank", "other_layer", "other_feature", "cosine"]
    df = pl.DataFrame(rows, schema=columns, orient="row")
    path = tmp_path / "feature_neighbours.parquet"
    df.sample(fraction=1.0, shuffle=True, seed=0).write_parquet(path)  # order must not matter

    got = read_neighbours(path)
    indices, cosines = got[0]
    assert indices == [100 + r for r in range(TOP_COS_SIM)]
    assert cosines == pytest.approx([0.9 - r / 100 for r in range(TOP_COS_SIM)])
    assert 7 not in indices and 8 not in indices
    assert got[1] == ([5], [pytest.approx(0.5)])
    assert sorted(got) == [0, 1]


def test_explanations_map_finished_ones_with_their_scores(tmp_path):
    path = tmp_path / "explanations.parquet"
    pl.DataFrame(
        {
            "feature": [4, 1, 2],
            "explanation": ["closing brackets", "the word 'def'", None],
            "detection": [0.8, 0.7, None],
            "fuzzing": [0.75, None, None],
            "explainer": ["m/explainer"] * 3,
            "status": ["ok", "ok", "failed"],
        }
    ).write_parquet(path)
    rows = explanation_rows(path, FACTS, 3, "2026-01-01T00:00:00+00:00")
    for row in rows:
        check_row("explanations", row)
    assert [(r["index"], r["description"]) for r in rows] == [
        ("1", "the word 'def'"),
        ("4", "closing brackets"),
    ]
    assert all(r["layer"] == "3-suite-res-1k" and r["modelId"] == "model" for r in rows)
    assert json.loads(rows[1]["notes"]) == {"detection": 0.8, "fuzzing": 0.75}
    assert rows[0]["explanationModelName"] == "m/explainer"
    assert len({r["id"] for r in rows}) == 2


# --- the export of the demo ------------------------------------------------------------------


def _parquet(demo_run: Path, kind: str, layer: int) -> Path:
    names = {
        "examples": "max_activations",
        "intervals": "interval_examples",
        "stats": "feature_stats",
        "logits": "feature_logits",
        "neighbours": "feature_neighbours",
    }
    return demo_run / f"results/layer_{layer}/{names[kind]}.parquet"


@pytest.fixture(scope="module")
def exported(demo_run) -> Path:
    """`snakemake neuronpedia` on the demo (with the neighbours and explain stages' files)."""
    run_snakemake(demo_run, "--profile", "profiles/demo", "neuronpedia")
    return demo_run / "results/neuronpedia"


@pytest.mark.e2e
def test_export_has_neuronpedias_layout_and_fields(exported, demo_run, config):
    layers = config["model"]["layers"]
    (model_dir,) = [p for p in exported.iterdir() if p.is_dir()]  # beside Snakemake's marker
    sources = sorted(p.name for p in model_dir.iterdir())
    assert sources == sorted(f"{layer}-{sources[0].split('-', 1)[1]}" for layer in layers)
    for layer in layers:
        src = next(model_dir.glob(f"{layer}-*"))
        files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
        assert files == [
            "activations/batch-0.jsonl.gz",
            "explanations/batch-0.jsonl.gz",  # the demo explains 4 features per layer
            "features/batch-0.jsonl.gz",
            "model.jsonl",
            "release.jsonl",
            "source.jsonl",
            "sourceset.jsonl",
        ]
        explained = read_jsonl(src / "explanations/batch-0.jsonl.gz")
        assert len(explained) == config["explain"]["features"]
        for row in explained:
            check_row("explanations", row)
        for table in ("release", "model", "sourceset", "source"):
            (row,) = read_jsonl(src / f"{table}.jsonl")
            check_row(table, row)
        source = read_jsonl(src / "source.jsonl")[0]
        assert source["id"] == src.name and source["modelId"] == model_dir.name
        assert source["hfRepoId"] == config["hub"]["repo"]
        assert source["saelensSaeId"].endswith(f"saelens/language_model.layers.{layer}")
        for table in ("features", "activations"):
            for row in read_jsonl(src / table / "batch-0.jsonl.gz"):
                check_row(table, row)
                assert (row["modelId"], row["layer"]) == (model_dir.name, src.name)


@pytest.mark.e2e
def test_export_values_are_the_parquet_files(exported, demo_run, config):
    """For sampled features of every layer: the feature row carries feature_stats' max and
    density, feature_logits' tokens and feature_neighbours' same-layer rows; its activation records are its max-activating and
    interval examples, token for token."""
    from safetensors import safe_open

    (model_dir,) = [p for p in exported.iterdir() if p.is_dir()]  # beside Snakemake's marker
    for layer in config["model"]["layers"]:
        src = next(model_dir.glob(f"{layer}-*"))
        features = {int(r["index"]): r for r in read_jsonl(src / "features/batch-0.jsonl.gz")}
        with safe_open(demo_run / f"results/layer_{layer}/sae.safetensors", "pt") as f:
            assert len(features) == f.get_slice("encoder.bias").get_shape()[0]
        stats = pl.read_parquet(_parquet(demo_run, "stats", layer))
        logits = pl.read_parquet(_parquet(demo_run, "logits", layer))
        examples = pl.read_parquet(_parquet(demo_run, "examples", layer))
        intervals = pl.read_parquet(_parquet(demo_run, "intervals", layer))
        neighbours = pl.read_parquet(_parquet(demo_run, "neighbours", layer))
        records: dict[int, list[dict]] = {}
        for r in read_jsonl(src / "activations/batch-0.jsonl.gz"):
            records.setdefault(int(r["index"]), []).append(r)
        assert sum(map(len, records.values())) == examples.height + intervals.height

        live = stats.filter(pl.col("fire_count") > 0)["feature"].to_list()
        for feature in live[:: max(1, len(live) // 8)]:
            row = features[feature]
            s = stats.filter(pl.col("feature") == feature).row(0, named=True)
            assert row["maxActApprox"] == pytest.approx(s["max_activation"], rel=1e-6)
            assert row["frac_nonzero"] == pytest.approx(s["density"], rel=1e-6)
            assert sum(row["freq_hist_data_bar_heights"]) == sum(s["histogram"])
            for sign, tokens, values in (
                ("positive", "pos_str", "pos_values"),
                ("negative", "neg_str", "neg_values"),
            ):
                want = logits.filter((pl.col("feature") == feature) & (pl.col("sign") == sign))
                want = want.sort("rank")
                assert row[tokens] == want["token"].to_list()
                assert row[values] == pytest.approx(want["value"].to_list(), rel=1e-6)
            same = neighbours.filter(
                (pl.col("feature") == feature) & (pl.col("relation") == "same")
            ).sort("rank")
            assert same.height > 0
            assert row["topkCosSimIndices"] == same["other_feature"].to_list()
            assert row["topkCosSimValues"] == pytest.approx(same["cosine"].to_list(), rel=1e-6)

            mine = sorted(records[feature], key=lambda r: r["id"])
            top = examples.filter(pl.col("feature") == feature).sort("rank")
            got_top = [r for r in mine if r["binMin"] is None]
            assert len(got_top) == top.height
            for want, got in zip(
                top.iter_rows(named=True),
                sorted(got_top, key=lambda r: -r["maxValue"]),
                strict=True,
            ):
                assert got["tokens"] == json.loads(want["context_tokens"])
                assert got["values"] == pytest.approx(json.loads(want["token_activations"]))
                assert got["maxValueTokenIndex"] == want["peak_index"]
                assert got["values"][got["maxValueTokenIndex"]] == pytest.approx(
                    want["activation"], rel=1e-5
                )
                assert got["dataIndex"] == str(want["sequence"])
            got_bins = sorted((r["binMin"], r["binMax"]) for r in mine if r["binMin"] is not None)
            want_bins = sorted(
                intervals.filter(pl.col("feature") == feature)
                .select("interval_low", "interval_high")
                .iter_rows()
            )
            assert got_bins == want_bins


@pytest.mark.e2e
def test_export_maps_neighbours_and_explanations_files_in(demo_run, config, tmp_path):
    """Given a feature_neighbours.parquet and an explanations.parquet per layer (in the
    neighbours and explanations stages' column layouts), the export carries them."""
    cfg = typed(config)
    layers = cfg.model.layers
    neighbours, explanations = [], []
    for layer in layers:
        n = tmp_path / f"layer_{layer}" / "feature_neighbours.parquet"
        n.parent.mkdir()
        pl.DataFrame(
            {
                "feature": [0, 0, 0, 5],
                "relation": ["same", "same", "next", "same"],
                "rank": [1, 0, 0, 0],
                "other_layer": [layer, layer, layer + 1, layer],
                "other_feature": [9, 3, 4, 0],
                "cosine": [0.4, 0.6, 0.9, 0.3],
            }
        ).write_parquet(n)
        neighbours.append(n)
        e = n.with_name("explanations.parquet")
        pl.DataFrame(
            {
                "feature": [5],
                "explanation": [f"layer {layer}'s feature 5"],
                "detection": [0.9],
                "fuzzing": [0.8],
                "explainer": ["m/x"],
                "status": ["ok"],
            }
        ).write_parquet(e)
        explanations.append(e)

    files = {
        kind: [_parquet(demo_run, kind, layer) for layer in layers]
        for kind in ("examples", "intervals", "stats", "logits")
    }
    sae = [demo_run / f"results/layer_{layer}/sae.safetensors" for layer in layers]
    out = tmp_path / "neuronpedia"
    export(cfg, sae, **files, out_dir=out, neighbours=neighbours, explanations=explanations)

    for layer in layers:
        src = next(out.glob(f"*/{layer}-*"))
        features = {int(r["index"]): r for r in read_jsonl(src / "features/batch-0.jsonl.gz")}
        assert features[0]["topkCosSimIndices"] == [3, 9]
        assert features[0]["topkCosSimValues"] == pytest.approx([0.6, 0.4])
        assert features[5]["topkCosSimIndices"] == [0]
        assert features[1]["topkCosSimIndices"] == []
        (row,) = read_jsonl(src / "explanations/batch-0.jsonl.gz")
        check_row("explanations", row)
        assert (row["index"], row["description"]) == ("5", f"layer {layer}'s feature 5")

    with pytest.raises(Exception, match="neighbours: 1 files"):
        export(cfg, sae, **files, out_dir=tmp_path / "x", neighbours=neighbours[:1])
