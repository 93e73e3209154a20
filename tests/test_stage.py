"""Staging the hub repo: the published layout (every layer loads with sparsify), hard links not
symlinks, manifest hashes, atomic restaging, the model card (metadata, tables, a quick start
whose code runs against the staged folder) and the notebook, executed headless."""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import io
import json
import logging
import os
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from helpers import REPO, demo_config, described_columns, load_yaml, typed
from hub_server import assert_one_row_group, serve_hub
from polars.testing import assert_frame_equal

from loupe import cli
from loupe.atomic import write_csv
from loupe.browse import ASSETS as BROWSER_ASSETS
from loupe.card import CardFacts, render_card
from loupe.examples import examples_schema, interval_examples_schema, stats_schema, write_stats
from loupe.flow import FLOW_COLUMNS
from loupe.layout import BROWSER, NOTEBOOK, REPO_MANIFEST, Layout
from loupe.logits import feature_logits_schema
from loupe.model import import_sparsify
from loupe.neighbours import (
    decoder_neighbours,
    neighbours_schema,
    neighbours_table,
    read_decoder,
    write_neighbours,
)
from loupe.number_format import size
from loupe.stage import (
    LayerInputs,
    StageInputs,
    place,
    repo_files,
    set_notebook_parameters,
    stage,
    stage_inputs,
)

sparsify = import_sparsify()

LAYERS = [1, 2]


# The staged features: some dead (no examples, never fired), most of the live ones dense
# (firing on half the sampled tokens), the rest sparse: what the notebook's showcase must skip.
def _dead(feature: int) -> bool:
    return feature % 16 == 1


def _dense(feature: int) -> bool:
    return feature % 4 != 0 and not _dead(feature)


SAMPLED_TOKENS = 16384
FEATURES_PER_GROUP = 64  # the per-feature files' row groups: several, as at the real width


def _write_per_feature(table, path: Path) -> None:
    """A per-feature parquet file as loupe writes them (examples.feature_file_writer: page
    index, statistics), one row group per FEATURES_PER_GROUP features."""
    import pyarrow.compute as pc

    from loupe.examples import feature_file_writer

    group = pc.divide(table["feature"], FEATURES_PER_GROUP)
    with feature_file_writer(path, table.schema, sorted_by=1) as writer:
        for g in range(pc.max(group).as_py() + 1):
            writer.write_table(table.filter(pc.equal(group, g)))


def _examples_table(layer: int, num_latents: int, per_feature: int = 2):
    """Max-activation rows in the published schema: `per_feature` examples of every live
    feature."""
    import pyarrow as pa

    rng = np.random.default_rng(layer)
    words = ["the", " cat", " sat", " on", " a", " mat", ".", " and", " ran"]
    rows = []
    for feature in (f for f in range(num_latents) if not _dead(f)):
        for rank in range(per_feature):
            tokens = [words[i] for i in rng.integers(0, len(words), 12)]
            values = np.maximum(rng.normal(0, 1, 12), 0).round(3)
            peak = int(rng.integers(0, 12))
            values[peak] = round(3.0 - rank + float(rng.random()), 3)
            rows.append(
                {
                    "feature": feature,
                    "activation": float(values[peak]),
                    "token": tokens[peak],
                    "context": "".join(tokens),
                    "context_tokens": json.dumps(tokens),
                    "token_activations": json.dumps(values.tolist()),
                    "layer": layer,
                    "rank": rank,
                    "peak_index": peak,
                    "token_id": 100 + peak,
                    "sequence": int(rng.integers(0, 500)),
                    "position": int(rng.integers(1, 128)),
                }
            )
    schema = examples_schema()  # the sampler's own published layout
    return pa.Table.from_pylist(rows, schema=schema)


def _intervals_table(layer: int, num_latents: int, intervals: int = 2):
    """Interval-example rows in the published schema: one example per activation interval."""
    import pyarrow as pa

    rows = _examples_table(layer, num_latents, per_feature=intervals).to_pylist()
    for row in rows:
        k = row["rank"]
        row.update(rank=0, interval=k, interval_low=k * 2.0, interval_high=(k + 1) * 2.0)
        row["interval_count"] = 5
    return pa.Table.from_pylist(rows, schema=interval_examples_schema())


def _logits_table(num_latents: int, per_sign: int = 3):
    """Feature-logit rows in the published schema: the top tokens of each sign per feature."""
    import pyarrow as pa

    rows = [
        {
            "feature": feature,
            "sign": sign,
            "rank": rank,
            "token_id": 100 + rank,
            "token": f"tok{rank}",
            "value": scale * (per_sign - rank),
        }
        for feature in range(num_latents)
        for sign, scale in (("negative", -1.0), ("positive", 1.0))
        for rank in range(per_sign)
    ]
    return pa.Table.from_pylist(rows, schema=feature_logits_schema())


def _write_stats(path: Path, num_latents: int) -> None:
    """feature_stats.parquet by the sampler's own writer (histogram edges in its metadata)."""
    features = np.arange(num_latents)
    dead = np.array([_dead(f) for f in features])
    dense = np.array([_dense(f) for f in features])
    count = np.where(dense, SAMPLED_TOKENS // 2 + features, features).astype(np.int64)
    count[dead] = 0
    edges = np.logspace(-2, 1, 9)
    counts = np.random.default_rng(0).integers(0, 5, (num_latents, len(edges) + 1))
    counts[dead] = 0
    write_stats(
        path,
        kept=np.where(dead, 0, 2),
        count=count,
        total=count * 0.5,
        peak=np.where(dead, 0, np.linspace(0, 4, num_latents)).astype(np.float32),
        tokens=SAMPLED_TOKENS,
        histogram={"counts": counts, "edges": edges},
        metadata={},
    )


# results/layer_N/ file of each parquet kind (the maxact rule's outputs).
PARQUET = {
    "examples": "max_activations.parquet",
    "intervals": "interval_examples.parquet",
    "stats": "feature_stats.parquet",
    "logits": "feature_logits.parquet",
    "neighbours": "feature_neighbours.parquet",
}


METRIC_ROWS = [
    {"layer": 1, "fvu": 0.1234567, "explained_variance": 0.8765433, "l0": 8.0, "delta_ce": 0.0421},
    {"layer": 2, "fvu": 0.2345678, "explained_variance": 0.7654322, "l0": 8.0, "delta_ce": 0.0873},
]


def run_cli(args: list[str]) -> int:
    """loupe's command line in-process; the root logger's handlers are put back after, as
    --log points them at a file that closes when the command ends."""
    handlers = logging.root.handlers[:]
    try:
        return cli.main(args)
    finally:
        logging.root.handlers[:] = handlers


@pytest.fixture(scope="module")
def pub_settings(settings) -> dict:
    s = copy.deepcopy(settings)
    s["model"]["layers"] = LAYERS
    return s


@pytest.fixture(scope="module")
def results(tmp_path_factory, trained_layer) -> Path:
    """A results/ folder as the upstream rules leave it, for layers 1 and 2 (both holding the
    trained layer-2 SAE: same width, and the card's code only needs a loadable SAE)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = tmp_path_factory.mktemp("results")
    num_latents = json.loads((trained_layer / "cfg.json").read_text())["d_in"] * 8
    for layer in LAYERS:
        d = root / f"layer_{layer}"
        d.mkdir()
        for name in ("cfg.json", "sae.safetensors"):
            (d / name).write_bytes((trained_layer / name).read_bytes())
        _write_per_feature(_examples_table(layer, num_latents), d / PARQUET["examples"])
        _write_per_feature(_intervals_table(layer, num_latents), d / PARQUET["intervals"])
        _write_stats(d / PARQUET["stats"], num_latents)
        _write_per_feature(_logits_table(num_latents), d / PARQUET["logits"])
        # Every layer holds the same SAE: each feature's best match next door is itself.
        W = read_decoder(d / "sae.safetensors", "cpu")
        adjacent = {r: (n, W) for r, n in (("prev", layer - 1), ("next", layer + 1)) if n in LAYERS}
        found = decoder_neighbours(W, adjacent, layer, 3)
        write_neighbours(d / PARQUET["neighbours"], neighbours_table(found))
    summary = root / "summary"
    summary.mkdir()
    with open(summary / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(METRIC_ROWS[0]))
        writer.writeheader()
        writer.writerows(METRIC_ROWS)
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot(LAYERS, [r["fvu"] for r in METRIC_ROWS])
    fig.savefig(summary / "fvu_by_layer.png")
    plt.close(fig)
    tokens = root / "tokens"
    tokens.mkdir()
    ctx_len = 128  # pub_settings' tokens.ctx_len
    split_tokens = {"train": 65536, "sample": SAMPLED_TOKENS, "eval": 8192}
    manifest = {
        "ctx_len": ctx_len,
        "rows": {split: n // ctx_len for split, n in split_tokens.items()},
        "tokens": split_tokens,
        "sha256": {split: hashlib.sha256(split.encode()).hexdigest() for split in split_tokens},
    }
    (tokens / "manifest.json").write_text(json.dumps(manifest))
    return root


def _stage_args(settings: dict, results: Path, out: Path) -> list[str]:
    layers = settings["model"]["layers"]
    return [
        "stage",
        "--config",
        json.dumps(settings),
        "--threads",
        "2",
        "--sae",
        *[str(results / f"layer_{n}/sae.safetensors") for n in layers],
        *[
            arg
            for kind, name in PARQUET.items()
            for arg in (f"--{kind}", *[str(results / f"layer_{n}/{name}") for n in layers])
        ],
        "--summary",
        str(results / "summary/metrics.csv"),
        str(results / "summary/fvu_by_layer.png"),
        "--manifest",
        str(results / "tokens/manifest.json"),
        "--repo",
        str(out),
    ]


@pytest.fixture(scope="module")
def staged(tmp_path_factory, pub_settings, results) -> Path:
    """The repo staged through the command line, as the `stage` rule runs it."""
    out = tmp_path_factory.mktemp("staged") / "hub"
    log = out.parent / "stage.log"
    assert run_cli(["--log", str(log), *_stage_args(pub_settings, results, out)]) == 0
    return out


def _inputs(settings: dict, results: Path) -> StageInputs:
    return StageInputs(
        layers=[
            LayerInputs(
                n,
                results / f"layer_{n}",
                {kind: results / f"layer_{n}/{name}" for kind, name in PARQUET.items()},
            )
            for n in settings["model"]["layers"]
        ],
        metrics=results / "summary/metrics.csv",
        plots=[results / "summary/fvu_by_layer.png"],
        tokens_manifest=results / "tokens/manifest.json",
    )


# --- layout -------------------------------------------------------------------------------


def test_staged_layout(staged, pub_settings, results):
    prefix = pub_settings["hub"]["prefix"]
    expected = {
        "README.md",
        "config.json",
        NOTEBOOK,
        REPO_MANIFEST,
        f"{prefix}/config.json",
        f"{prefix}/metrics.csv",
        f"{prefix}/plots/fvu_by_layer.png",
        f"{prefix}/saelens/pretrained_saes.yaml",  # hub.saelens (default on)
    }
    for n in LAYERS:
        expected |= {
            f"{prefix}/saelens/language_model.layers.{n}/{name}"
            for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors")
        }
        expected |= {
            f"{prefix}/language_model.layers.{n}/cfg.json",
            f"{prefix}/language_model.layers.{n}/sae.safetensors",
            f"{prefix}/max_activations/layer_{n}.parquet",
            f"{prefix}/interval_examples/layer_{n}.parquet",
            f"{prefix}/feature_stats/layer_{n}.parquet",
            f"{prefix}/feature_logits/layer_{n}.parquet",
            f"{prefix}/feature_neighbours/layer_{n}.parquet",
        }
    # The feature browser: its page, as shipped, and the suite it reads.
    expected |= {
        f"{BROWSER}/{p.relative_to(BROWSER_ASSETS).as_posix()}"
        for p in BROWSER_ASSETS.rglob("*")
        if p.is_file()
    }
    expected.add(f"{BROWSER}/suite.json")
    on_disk = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert on_disk == expected
    assert not [p for p in staged.rglob("*") if p.is_symlink()]
    # Results are hard-linked (same file system here), so staging costs no space.
    src = results / "layer_2/sae.safetensors"
    dst = staged / prefix / "language_model.layers.2/sae.safetensors"
    assert os.stat(src).st_ino == os.stat(dst).st_ino
    assert not list(staged.parent.glob(".hub.tmp*"))  # the temporary folder is gone


def test_every_layer_loads_with_sparsify(staged, pub_settings, trained_layer):
    reference = sparsify.SparseCoder.load_from_disk(trained_layer)
    for n in LAYERS:
        folder = staged / pub_settings["hub"]["prefix"] / f"language_model.layers.{n}"
        sae = sparsify.SparseCoder.load_from_disk(folder)
        assert sae.num_latents == reference.num_latents
        assert torch.equal(sae.encoder.weight, reference.encoder.weight)


def test_saelens_copies_load_like_sparsify(staged, pub_settings):
    """Each layer's SAELens folder loads with SAELens' default disk loader as a TopK SAE that
    encodes and decodes like the sparsify folder beside it (the demo's e2e test does this by
    repo id on real activations)."""
    from sae_lens import SAE, TopKSAE

    prefix = pub_settings["hub"]["prefix"]
    for n in LAYERS:
        reference = sparsify.SparseCoder.load_from_disk(
            staged / prefix / f"language_model.layers.{n}"
        )
        sae = SAE.load_from_disk(staged / prefix / f"saelens/language_model.layers.{n}")
        assert isinstance(sae, TopKSAE) and sae.cfg.d_sae == reference.num_latents
        assert sae.cfg.metadata.hook_name == f"blocks.{n}.hook_resid_post"
        torch.manual_seed(n)
        x = torch.randn(64, reference.d_in) * 2
        with torch.inference_mode():
            out = reference.encode(x)
            want = x.new_zeros(64, reference.num_latents).scatter_(1, out.top_indices, out.top_acts)
            got = sae.encode(x)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            want_recon = reference.decode(out.top_acts, out.top_indices)
            torch.testing.assert_close(sae.decode(got), want_recon, atol=1e-5, rtol=0)


def test_saelens_off_stages_sparsify_folders_only(tmp_path, pub_settings, results):
    settings = copy.deepcopy(pub_settings)
    settings["hub"]["saelens"] = False
    out = tmp_path / "hub"
    stage(typed(settings), _inputs(settings, results), out)
    assert not (out / settings["hub"]["prefix"] / "saelens").exists()
    card = (out / "README.md").read_text()
    assert "staged without SAELens' layout" in card and "SAE.from_pretrained" not in card


def test_the_flow_table_is_staged_and_shown_in_the_card(tmp_path, pub_settings, results):
    """The flow rule's feature_flow.csv and plot, given with the summary's outputs: the table
    is staged under the prefix and the card shows it, row by row, with its plot."""
    summary = tmp_path / "summary"
    summary.mkdir()
    rows = [
        {
            "layer": 1,
            "next_layer": 2,
            "features": 500,
            "median_cosine": 0.61234,
            "tokens": 40000,
            "firing_features": 480,
            "coactivation": 0.4321,
            "random_coactivation": 0.0123,
            "lift": 35.13,
        }
    ]
    write_csv(summary / "feature_flow.csv", rows, FLOW_COLUMNS)
    plot = summary / "feature_flow_by_layer.png"
    plot.write_bytes((results / "summary/fvu_by_layer.png").read_bytes())
    files = [results / "summary/metrics.csv", results / "summary/fvu_by_layer.png"]
    sae = [results / f"layer_{n}/sae.safetensors" for n in LAYERS]
    inputs = stage_inputs(
        typed(pub_settings), sae, {}, [*files, summary / "feature_flow.csv", plot]
    )
    assert inputs.tables == [summary / "feature_flow.csv"] and inputs.plots[-1] == plot
    out = tmp_path / "hub"
    stage(typed(pub_settings), replace(_inputs(pub_settings, results), tables=inputs.tables), out)
    prefix = pub_settings["hub"]["prefix"]
    assert (out / prefix / "feature_flow.csv").read_bytes() == inputs.tables[0].read_bytes()
    card = (out / "README.md").read_text()
    assert "| layers | median cosine | tokens | coactivation | shuffled | lift |" in card
    assert "| 1 → 2 | 0.6123 | 40000 | 0.4321 | 0.0123 | 35.13 |" in card
    assert f"`{prefix}/feature_flow.csv`" in card


def test_run_config_has_what_saelens_reads(staged, pub_settings):
    prefix = pub_settings["hub"]["prefix"]
    cfg = json.loads((staged / prefix / "config.json").read_text())
    # SAELens' sparsify loader reads model, dataset and ctx_len from the SAE folders' parent.
    assert cfg["model"] == pub_settings["model"]["name"]
    assert cfg["dataset"] == pub_settings["dataset"]["path"]  # no hub_id in the demo
    assert cfg["ctx_len"] == pub_settings["tokens"]["ctx_len"]
    assert cfg["hookpoints"] == [f"language_model.layers.{n}" for n in LAYERS]
    assert cfg["sae"]["k"] == pub_settings["sae"]["k"] and cfg["sae"]["d_in"] == 64
    assert cfg["lr"] == pub_settings["train"]["lr"]
    assert (staged / "config.json").read_text() == (staged / prefix / "config.json").read_text()


def test_manifest_lists_every_file_with_size_and_sha256(staged):
    manifest = json.loads((staged / REPO_MANIFEST).read_text())
    listed = {f["path"]: f for f in manifest["files"]}
    assert sorted(listed) == repo_files(staged)
    for path, entry in listed.items():
        data = (staged / path).read_bytes()
        assert entry["size"] == len(data), path
        assert entry["sha256"] == hashlib.sha256(data).hexdigest(), path
    assert manifest["total_size"] == sum(f["size"] for f in manifest["files"])


def test_restaging_replaces_the_repo_atomically(tmp_path, pub_settings, results, monkeypatch):
    out = tmp_path / "hub"
    config = typed(pub_settings)
    stage(config, _inputs(pub_settings, results), out)
    before = (out / REPO_MANIFEST).read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("card failed")

    monkeypatch.setattr("loupe.stage.render_card", broken)
    with pytest.raises(RuntimeError):
        stage(config, _inputs(pub_settings, results), out)
    # The failed run left the previous repo whole and no half-built folder behind.
    assert (out / REPO_MANIFEST).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]


def test_place_copies_across_file_systems(tmp_path, monkeypatch):
    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * 100)
    link = tmp_path / "s.bin"
    link.symlink_to(src)

    def cross_device(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    dst = tmp_path / "out" / "b.bin"
    assert place(link, dst) == "copy"
    assert not dst.is_symlink() and dst.read_bytes() == src.read_bytes()


def test_missing_input_is_one_clear_error(tmp_path, pub_settings, results, capsys):
    args = _stage_args(pub_settings, results, tmp_path / "hub")
    i = args.index("--stats")
    args[i + 2] = str(tmp_path / "nope.parquet")
    # As the rule runs it: the log takes everything, the terminal gets the one line.
    log = ["--log", str(tmp_path / "stage.log")]
    assert run_cli([*log, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"loupe stage: error: missing inputs for staging: {tmp_path / 'nope.parquet'}"]
    assert not (tmp_path / "hub").exists()

    args = _stage_args(pub_settings, results, tmp_path / "hub")
    del args[args.index("--sae") + 1]
    assert run_cli([*log, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["loupe stage: error: sae: 1 files for 2 layers [1, 2]"]
    assert not (tmp_path / "hub").exists()


# --- model card ---------------------------------------------------------------------------


def _front_matter(card: str) -> dict:
    m = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert m, card[:200]
    return yaml.safe_load(m.group(1))


# The card's python blocks: the quick start's, then the SAELens, SAEBench and delphi recipes (run by
# tests/test_interop.py).
QUICK_START_BLOCKS = 4
RECIPE_BLOCKS = 3


def _python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, re.S)


def test_card_metadata_and_tables(staged, pub_settings):
    card = (staged / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["license"] == pub_settings["hub"]["license"]
    assert meta["library_name"] == "sparsify"
    assert "sparse-autoencoder" in meta["tags"] and meta["language"] == ["en"]
    assert "base_model" not in meta  # a local model folder is no hub id
    # Per-layer metrics, formatted from metrics.csv.
    assert "| layer | fvu | explained_variance | l0 | delta_ce |" in card
    assert "| 1 | 0.1235 | 0.8765 | 8 | 0.0421 |" in card
    assert "| 2 | 0.2346 | 0.7654 | 8 | 0.0873 |" in card
    # Plots are embedded by paths that exist in the repo.
    plots = re.findall(r"!\[[^]]*\]\(([^)]+)\)", card)
    assert plots and all((staged / p).is_file() for p in plots)
    # The max-activation columns, by the exact names the parquet has.
    for column in (
        "feature",
        "activation",
        "token",
        "context",
        "context_tokens",
        "token_activations",
    ):
        assert f"| `{column}` |" in card
    assert "## Limitations" in card and "Text only" in card and "English only" in card
    assert "```bibtex" in card
    assert "feature_flow" not in card  # no flow table given: the card says nothing of it


def test_card_states_sizes_coverage_and_the_sample_split(staged, pub_settings, results):
    """The card's sizes are the staged files' (per layer: its SAE folder, SAELens copy and
    parquet files; the repo in all but the card and manifest, written after it); per layer, the
    features without examples and with fewer than top_n, counted here from feature_stats; and
    how to regenerate the unpublished sample split `sequence` and `position` point into."""
    card = (staged / "README.md").read_text()
    prefix = pub_settings["hub"]["prefix"]
    files = {
        p.relative_to(staged).as_posix(): p.stat().st_size for p in staged.rglob("*") if p.is_file()
    }

    def bytes_of(pattern: str) -> int:
        return sum(n for path, n in files.items() if re.fullmatch(pattern, path))

    total = sum(n for path, n in files.items() if path not in ("README.md", REPO_MANIFEST))
    assert f"The repo holds {size(total)} ({total:,} bytes, this card and" in card
    for n in LAYERS:
        sae = bytes_of(rf"{re.escape(prefix)}/language_model\.layers\.{n}/.+")
        lens = bytes_of(rf"{re.escape(prefix)}/saelens/language_model\.layers\.{n}/.+")
        data = bytes_of(rf"{re.escape(prefix)}/\w+/layer_{n}\.parquet")
        assert sae and lens and data
        row = f"| {n} | {size(sae)} | {size(lens)} | {size(data)} | {size(sae + lens + data)} |"
        assert row in card, row
    # One layer's download: layer 2's SAE folder, all that loading it fetches.
    sae2 = bytes_of(rf"{re.escape(prefix)}/language_model\.layers\.2/.+")
    assert f"Load one layer's SAE (downloads only that layer's folder, {size(sae2)})" in card
    # Examples: not every feature has them.
    assert "for every feature of every layer" not in card
    top_n = typed(pub_settings).maxact.top_n
    assert top_n > 2  # each live feature of the fixture has 2
    for n in LAYERS:
        kept = pl.read_parquet(results / f"layer_{n}" / PARQUET["stats"])["examples"]
        none, fewer = int((kept == 0).sum()), int(((kept > 0) & (kept < top_n)).sum())
        assert none == sum(map(_dead, range(len(kept)))) > 0
        share = f"{none:,} ({none / len(kept):.1%}) | {fewer:,} ({fewer / len(kept):.1%})"
        assert f"| {n} | {len(kept):,} | {share} |" in card
    # The sample split: not published, and how to make it again.
    assert not [p for p in files if p.endswith(".npy")]
    manifest = json.loads((results / "tokens/manifest.json").read_text())
    assert "which this repo does not publish" in card
    assert f"(sha256 `{manifest['sha256']['sample']}`)" in card
    assert f"({manifest['rows']['sample']:,} rows of {manifest['ctx_len']} token ids" in card
    assert "snakemake --cores 4 tokenize" in card
    block = re.search(r"<summary>tokenization settings</summary>\n\n```yaml\n(.*?)```", card, re.S)
    assert yaml.safe_load(block.group(1)) == typed(pub_settings).settings_for("tokenize")


# The writer's schema of each per-layer parquet kind a stage without explanations publishes.
SCHEMAS = {
    "examples": examples_schema,
    "intervals": interval_examples_schema,
    "stats": stats_schema,
    "logits": feature_logits_schema,
    "neighbours": neighbours_schema,
}


def test_column_descriptions_are_read_from_the_staged_files(staged, pub_settings):
    """Every column of every staged parquet kind is described in the file's own schema; the
    browser's suite.json and the card's column tables carry exactly those descriptions."""
    layout = Layout.of(typed(pub_settings))
    suite = json.loads((staged / BROWSER / "suite.json").read_text())
    assert list(suite["columns"]) == list(SCHEMAS)
    for kind, schema in SCHEMAS.items():
        for n in LAYERS:
            described = described_columns(staged / layout.per_layer(kind, n), schema())
            assert suite["columns"][kind] == described
    card = (staged / "README.md").read_text()
    for kind in ("examples", "stats"):  # the kinds the card has a column table of
        for column, description in suite["columns"][kind].items():
            row = rf"^\| `{column}` \| [^|]+ \| {re.escape(description)} \|$"
            assert re.search(row, card, re.M), column


def test_card_states_the_reference_settings(monkeypatch):
    """The gemma-loupe card, from config.yaml as shipped, states the reference values."""
    cfg = typed(load_yaml(REPO / "config.yaml"))  # the schema's defaults filled in
    facts = CardFacts(
        layers=list(cfg.model.layers),
        sae={**vars(cfg.sae), "d_in": 1536},
        num_latents=49152,
        sae_bytes=604_000_000,
        metrics=[{"layer": str(n), "fvu": "0.2"} for n in range(35)],
        example_columns=[("feature", "int64", "index"), ("activation", "float", "peak")],
        example_rows=35 * 49152 * 20,
        stats_columns=[("feature", "int64", "index")],
        plots=[],
        tokens={"train": 1_000_001_536, "eval": 1_048_576},
    )
    card = render_card(cfg, facts)
    meta = _front_matter(card)
    assert meta["base_model"] == "google/gemma-4-E2B"
    assert meta["datasets"] == ["togethercomputer/RedPajama-Data-V2"]
    assert meta["license"] == "apache-2.0"
    for row in (
        "| d_in | 1,536 |",
        "| latents | 49,152 (expansion factor 32) |",
        "| activation | topk, k = 100 |",
        "| multi_topk | on (auxiliary 4k reconstruction) |",
        "| auxk_alpha | 0.03 |",
        "| excluded tokens | id 2 (masked out of training) |",
        "| learning rate | 0.000289 (set explicitly) |",
        "| batch | 4 sequences x 1,024 tokens, grad_acc_steps = 4 |",
    ):
        assert row in card, row
    assert (
        "| training tokens | 1B (1,000,001,536 after rounding to whole rows) per layer, RedPajama v2, head_middle partition, English |"
        in card
    )
    assert "signum" in card and "10M tokens" in card and "top 20" in card
    code = "\n".join(_python_blocks(card))
    assert (
        'PREFIX = "sae-gemma-4-E2B-32x-1B"' in code and 'REPO = "rhizomatous/gemma-loupe"' in code
    )
    # The load cells, run with sparsify's loaders replaced: what they would download.
    loads = []

    def load_from_hub(name, hookpoint=None, device="cpu", **kwargs):
        loads.append((name, hookpoint))
        return SimpleNamespace(cfg=SimpleNamespace(k=100), num_latents=49152)

    def load_many(name, local=False, layers=None, device="cpu", pattern=None, **kwargs):
        loads.append((name, layers))
        return {hookpoint: object() for hookpoint in layers}

    monkeypatch.setattr(sparsify.SparseCoder, "load_from_hub", staticmethod(load_from_hub))
    monkeypatch.setattr(sparsify.SparseCoder, "load_many", staticmethod(load_many))
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        for block in _python_blocks(card)[:2]:  # load one layer, load all layers
            exec(compile(block, "README.md", "exec"), namespace)
    prefix = "sae-gemma-4-E2B-32x-1B"
    assert loads == [
        ("rhizomatous/gemma-loupe", f"{prefix}/language_model.layers.17"),
        ("rhizomatous/gemma-loupe", [f"{prefix}/language_model.layers.{i}" for i in range(35)]),
    ]
    assert len(namespace["saes"]) == 35
    # hub.space: the card links the feature browser's Space at the top and where it is described.
    assert "huggingface.co/spaces/" not in card
    raw = load_yaml(REPO / "config.yaml")
    raw["hub"]["space"] = "rhizomatous/gemma-loupe-browser"
    linked = render_card(typed(raw), facts)
    assert linked.count("(https://huggingface.co/spaces/rhizomatous/gemma-loupe-browser)") == 2


class Downloads(list):
    """What each download call delivered: (kind, pattern, files); `folders`: the local folder
    of each repo id served."""

    def __init__(self):
        super().__init__()
        self.folders: dict[str, Path] = {}


@pytest.fixture()
def local_hub(monkeypatch, tmp_path):
    """The hub client's snapshot download (what sparsify's loaders call), replaced at its
    boundary by one that serves the local folder of each repo id in `folders` (a repo id that
    is a folder serves itself), honouring allow_patterns like the Hub does."""
    from huggingface_hub.utils import filter_repo_objects

    requests = Downloads()

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        root = Path(requests.folders.get(repo_id, repo_id))
        assert root.is_dir(), repo_id
        snap = tmp_path / f"snapshot{len(requests)}"
        wanted = list(filter_repo_objects(repo_files(root), allow_patterns=allow_patterns))
        for rel in wanted:
            place(root / rel, snap / rel)
        snap.mkdir(exist_ok=True)
        requests.append(("snapshot", allow_patterns, wanted))
        return str(snap)

    import huggingface_hub
    import sparsify.sparse_coder

    monkeypatch.setattr(sparsify.sparse_coder, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return requests


@contextlib.contextmanager
def hub_of(staged: Path, repo_id: str, local_hub: Downloads, monkeypatch, home: Path):
    """The staged repo as the Hub under `repo_id`: its files over HTTP (hub_server, for
    hf_hub_url, hf_hub_download and polars), its snapshots through `local_hub`."""
    local_hub.folders[repo_id] = staged
    with serve_hub(staged, repo_id, monkeypatch, home) as hub:
        yield hub


def run_card_code(card: str, model: str, tiny_model: Path) -> tuple[dict, list[str]]:
    """Run the quick start's python blocks of the card in one namespace (against the Hub the
    caller serves), the tiny model standing in for the model id; returns the namespace and
    each block's printed output."""
    namespace: dict = {}
    printed = []
    for block in _python_blocks(card)[:QUICK_START_BLOCKS]:
        code = block.replace(f'"{model}"', json.dumps(str(tiny_model)))
        with contextlib.redirect_stdout(io.StringIO()) as out:
            exec(compile(code, "README.md", "exec"), namespace)
        printed.append(out.getvalue())
    return namespace, printed


def test_card_quick_start_runs_against_the_staged_repo(
    staged, pub_settings, tiny_model, local_hub, monkeypatch, tmp_path
):
    """The card's code, run as a reader runs it against the Hub: it downloads one SAE folder,
    then the SAE folders only, and reads the feature's examples without downloading their
    file: its footer, then only the row group holding the feature."""
    card = (staged / "README.md").read_text()
    assert len(_python_blocks(card)) == QUICK_START_BLOCKS + RECIPE_BLOCKS
    repo_id = pub_settings["hub"]["repo"]
    with hub_of(staged, repo_id, local_hub, monkeypatch, tmp_path / "hf") as hub:
        ns, printed = run_card_code(card, pub_settings["model"]["name"], tiny_model)
    prefix = pub_settings["hub"]["prefix"]
    assert ns["sae"].num_latents == 512 and ns["sae"].cfg.k == pub_settings["sae"]["k"]
    assert sorted(ns["saes"]) == [f"{prefix}/language_model.layers.{n}" for n in LAYERS]
    assert ns["out"].top_indices.shape[1] == pub_settings["sae"]["k"]
    # Downloads: one layer's folder, then only SAE folders.
    (kind1, pattern1, got1), (kind2, _, got2) = local_hub
    assert kind1 == kind2 == "snapshot"
    assert pattern1 == f"{prefix}/language_model.layers.2/*"
    assert sorted(got1) == [
        f"{prefix}/language_model.layers.2/{n}" for n in ("cfg.json", "sae.safetensors")
    ]
    assert len(got2) == 4 and all("/language_model.layers." in p for p in got2)
    # The examples: the strongest live feature on the text, one row group of its file read.
    feature = ns["feature"]
    assert not _dead(feature)
    examples = pl.read_parquet(staged / prefix / "max_activations/layer_2.parquet")
    assert_frame_equal(ns["examples"], examples.filter(pl.col("feature") == feature).sort("rank"))
    assert_one_row_group(hub, staged, f"{prefix}/max_activations/layer_2.parquet", feature)
    assert {r.path for r in hub.reads} == {
        f"{prefix}/{kind}/layer_2.parquet" for kind in ("max_activations", "feature_stats")
    }
    # One line per token after BOS with its top features, then the feature's examples.
    assert len(ns["tokens"]) >= 5
    assert printed[2].count("[(") == len(ns["tokens"])
    assert printed[3].count("\n") == min(5, len(ns["examples"]))


def test_load_many_with_only_a_pattern_is_empty_in_sparsify_1_3_3(staged, pub_settings):
    """Why the card names the layers: sparsify 1.3.3's pattern filter matches nothing."""
    prefix = pub_settings["hub"]["prefix"]
    assert (
        sparsify.SparseCoder.load_many(
            str(staged / prefix), local=True, pattern="language_model.layers.*"
        )
        == {}
    )


# --- notebook -----------------------------------------------------------------------------


def execute_notebook(path: Path, params: dict, workdir: Path):
    """Run the notebook headless with its parameters cell rewritten; returns the notebook."""
    import nbformat
    from nbclient import NotebookClient

    nb = json.loads(path.read_text())
    set_notebook_parameters(nb, params)
    notebook = nbformat.reads(json.dumps(nb), as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    ).execute()
    return notebook


def _outputs(notebook, kind: str) -> list[str]:
    texts = []
    for cell in notebook.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and kind == "text/plain":
                texts.append(out["text"])
            elif value := out.get("data", {}).get(kind):
                texts.append("".join(value))
    return texts


def check_notebook(
    staged: Path, settings: dict, model: Path, workdir: Path, repo: str = ""
) -> tuple[int, set[int]]:
    """Run the notebook against `repo` (a repo id the caller serves; default: the staged
    folder itself) and check what it shows; returns the feature it shows and the features in
    its per-token table."""
    nb = execute_notebook(
        staged / NOTEBOOK, {"REPO": repo or str(staged), "MODEL": str(model)}, workdir
    )
    # Nothing on stderr: no warning (tqdm's, without ipywidgets), no traceback.
    stderr = [
        o["text"] for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stderr"
    ]
    assert not stderr, stderr
    layer = sorted(settings["model"]["layers"])[len(settings["model"]["layers"]) // 2]
    text = "\n".join(_outputs(nb, "text/plain"))
    latents = int(
        re.search(rf"layer {layer}: d_in 64, ([\d,]+) latents", text).group(1).replace(",", "")
    )
    html = "\n".join(_outputs(nb, "text/html"))
    # The per-token table: one row per token after BOS, every row shown, no cell cut.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenizer(nb.cells[1].source.split('TEXT = "')[1].split('"')[0]).input_ids
    tokens = len(ids) - (ids[0] == tokenizer.bos_token_id)
    (table,) = [h for h in _outputs(nb, "text/html") if "top features (activation)" in h]
    assert table.count("<tr>") == 2 + tokens  # the names and types rows, then the tokens
    assert "…" not in table
    shown = re.search(r"feature (\d+): its (\d+) max-activating examples", text)
    assert shown, text[-2000:]
    feature = int(shown.group(1))
    assert feature < latents  # a feature of this SAE
    assert int(shown.group(2)) > 0
    assert html.count("rgba(255, 140, 0, 1.00)") >= 1  # each example's peak, fully shaded
    # The feature shown has examples and is not dense, where dense features fire on the text.
    prefix = settings["hub"]["prefix"]
    stats = pl.read_parquet(staged / prefix / f"feature_stats/layer_{layer}.parquet")
    row = stats.filter(pl.col("feature") == feature).row(0, named=True)
    dense = typed(settings).evaluate.dense_threshold
    assert row["examples"] > 0 and row["density"] <= dense
    # The trace follows the best matches through every layer of the suite.
    layers = settings["model"]["layers"]
    assert f"trace of feature {feature} of layer {layer} ({len(layers)} of {len(layers)}" in text
    steps = re.findall(r"^  layer (\d+): feature (\d+) \(cosine", text, re.M)
    assert [int(n) for n, _ in steps] == sorted(layers)
    return feature, {int(f) for f in re.findall(r"(\d+) \(-?[\d.]+\)", table)}


def test_notebook_is_filled_in_for_the_run(staged, pub_settings):
    nb = json.loads((staged / NOTEBOOK).read_text())
    params = "".join(nb["cells"][1]["source"])
    assert f'REPO = "{pub_settings["hub"]["repo"]}"' in params
    assert f'PREFIX = "{pub_settings["hub"]["prefix"]}"' in params
    assert 'HOOKPOINT = "language_model.layers.2"' in params and "LAYER = 2" in params


def check_notebook_reads(hub, staged: Path, prefix: str, layer: int, feature: int) -> None:
    """The notebook read the feature's rows of each per-feature file, not the files: only
    range requests, and of the feature's own files only the row group holding it."""
    parquet = {r.path for r in hub.reads if r.path.endswith(".parquet")}
    assert f"{prefix}/max_activations/layer_{layer}.parquet" in parquet
    assert all(r.ranged for r in hub.reads if r.path in parquet)
    for folder in ("max_activations", "interval_examples", "feature_logits"):
        assert_one_row_group(hub, staged, f"{prefix}/{folder}/layer_{layer}.parquet", feature)
    # Downloaded whole: the layer's SAE folder and the small JSON files, nothing else.
    whole = {r.path for r in hub.reads if r.path not in parquet}
    assert whole == {
        f"{prefix}/language_model.layers.{layer}/cfg.json",
        f"{prefix}/language_model.layers.{layer}/sae.safetensors",
        f"{prefix}/config.json",
        "manifest.json",
    }


def test_notebook_runs_headless_against_the_hub(
    staged, pub_settings, tiny_model, tmp_path, monkeypatch
):
    """The notebook, run as a reader runs it on the Hub's repo id (the staged repo served as
    the Hub serves it): what it shows, and that it reads one row group per feature file."""
    repo_id = pub_settings["hub"]["repo"]
    with serve_hub(staged, repo_id, monkeypatch, tmp_path / "hf") as hub:
        feature, on_text = check_notebook(staged, pub_settings, tiny_model, tmp_path, repo_id)
    # Shown: the strongest non-dense feature on the text, where dense ones fire on it too.
    assert feature in on_text and not _dense(feature)
    assert [f for f in on_text if _dense(f)]
    check_notebook_reads(hub, staged, pub_settings["hub"]["prefix"], 2, feature)


@pytest.mark.e2e
def test_demo_stages_the_repo(demo_run, tmp_path, local_hub, monkeypatch):
    """The demo's default target stages the repo: every layer loads, the card's quick start and
    the notebook run against it, served as the Hub serves it."""
    config = demo_config()
    hub = demo_run / "results/hub"
    prefix = config["hub"]["prefix"]
    manifest = json.loads((hub / REPO_MANIFEST).read_text())
    assert sorted(f["path"] for f in manifest["files"]) == repo_files(hub)
    layout = Layout.of(typed(config))
    for n in config["model"]["layers"]:
        sae = sparsify.SparseCoder.load_from_disk(hub / layout.sae_dir(n))
        assert sae.d_in == 64
        assert (hub / layout.examples(n)).is_file() and (hub / layout.stats(n)).is_file()
    assert (hub / prefix / "metrics.csv").is_file() and list((hub / prefix / "plots").glob("*.png"))
    card = (hub / "README.md").read_text()
    model = demo_run / config["model"]["name"]
    repo_id = config["hub"]["repo"]
    with hub_of(hub, repo_id, local_hub, monkeypatch, tmp_path / "hf"):
        ns, _ = run_card_code(card, config["model"]["name"], model)
        check_notebook(hub, config, model, tmp_path, repo=repo_id)
    assert len(ns["saes"]) == len(config["model"]["layers"])


# --- explanations -------------------------------------------------------------------------


def _write_explanations(path: Path, layer: int, rows: list[tuple]) -> None:
    """An explanations.parquet as the explain stage writes it: (feature, explanation,
    detection, fuzzing, status) per row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from loupe.explain import explanations_schema

    table = pa.Table.from_pylist(
        [
            {
                "feature": f,
                "explanation": e,
                "detection": d,
                "fuzzing": z,
                "explainer": "tiny-explainer",
                "n_examples": 3,
                "prompt_tokens": 100,
                "completion_tokens": 7,
                "status": s,
                "layer": layer,
                "prompt_version": "loupe-2",
                "delphi": "0.1.3",
            }  # fmt: skip
            for f, e, d, z, s in rows
        ],
        schema=explanations_schema(),
    )
    pq.write_table(table, path)


def test_explanations_are_staged_listed_and_described(pub_settings, results, tiny_model, tmp_path):
    """Staged under the prefix, in the manifest and the browser's suite.json; the card's table
    gives each layer's coverage and the mean and quartiles of its scores, computed here
    independently; the demo's card says they are noise; the notebook finds a feature by the
    words of its explanation."""
    import polars as pl

    from loupe.explain import explanations_schema

    rows = {
        1: [
            (0, "cats", 0.9, 0.7, "ok"),
            (3, "dogs", 0.5, None, "ok"),
            (5, None, None, None, "unparsed"),
        ],
        2: [(1, "the word the", 0.6, 0.8, "ok"), (2, None, None, None, "failed")],
    }
    for layer, layer_rows in rows.items():
        _write_explanations(tmp_path / f"explanations_{layer}.parquet", layer, layer_rows)
    out = tmp_path / "hub"
    args = _stage_args(pub_settings, results, out)
    args[args.index("--summary") : args.index("--summary")] = [
        "--explanations", *[str(tmp_path / f"explanations_{n}.parquet") for n in LAYERS],
    ]  # fmt: skip
    assert run_cli(args) == 0
    prefix = pub_settings["hub"]["prefix"]
    manifest = {f["path"] for f in json.loads((out / REPO_MANIFEST).read_text())["files"]}
    suite = json.loads((out / BROWSER / "suite.json").read_text())
    for n in LAYERS:
        rel = f"{prefix}/explanations/layer_{n}.parquet"
        assert (out / rel).read_bytes() == (tmp_path / f"explanations_{n}.parquet").read_bytes()
        assert rel in manifest and suite["files"][str(n)]["explanations"] == rel
        described = described_columns(out / rel, explanations_schema())
        assert suite["columns"]["explanations"] == described
    card = (out / "README.md").read_text()
    assert "## Explanations" in card and "**These explanations are noise.**" in card
    assert "tiny-explainer" in card and "Features are not labelled" not in card
    live = {
        n: pl.read_parquet(results / f"layer_{n}" / PARQUET["stats"])
        .filter(pl.col("examples") > 0)
        .height
        for n in LAYERS
    }
    # layer 1: 2 ok; detection [0.9, 0.5]: mean 0.7, q25 0.6, median 0.7, q75 0.8
    assert (
        f"| 1 | 2 of {live[1]:,} ({2 / live[1]:.1%}) | 1 / 0 | 2 | 0.700 (0.60 / 0.70 / 0.80) | 0.700 (0.70 / 0.70 / 0.70) |"
        in card
    )
    assert (
        f"| 2 | 1 of {live[2]:,} ({1 / live[2]:.1%}) | 0 / 1 | 1 | 0.600 (0.60 / 0.60 / 0.60) | 0.800 (0.80 / 0.80 / 0.80) |"
        in card
    )
    nb = execute_notebook(out / NOTEBOOK, {"REPO": str(out), "MODEL": str(tiny_model)}, tmp_path)
    text = "\n".join(_outputs(nb, "text/plain"))
    assert "1 of 1 explained features of layer 2 mention 'the'" in text
    assert "  feature 1: the word the (detection 0.6, fuzzing 0.8)" in text


def test_explanation_scores_summary(pub_settings, results, tmp_path):
    """The summary's CSV equals numpy's statistics of the files; the plot is a PNG."""
    import numpy as np

    from loupe.explanation_scores import summarize_explanations

    scores = {1: [0.2, 0.4, 0.9, None], 2: [None]}
    paths = []
    for layer, values in scores.items():
        paths.append(tmp_path / f"e{layer}.parquet")
        layer_rows = [
            (f, "x", v, v, "ok" if v is not None else "unparsed") for f, v in enumerate(values)
        ]
        _write_explanations(paths[-1], layer, layer_rows)
    stats = [results / f"layer_{n}" / PARQUET["stats"] for n in LAYERS]
    csv_path, plot = tmp_path / "scores.csv", tmp_path / "scores.png"
    summarize_explanations(typed(pub_settings), paths, stats, csv_path, plot)
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["layer"]) for r in table] == LAYERS
    d = np.array([0.2, 0.4, 0.9])
    first = table[0]
    assert (int(first["ok"]), int(first["unparsed"]), int(first["detection_scored"])) == (3, 1, 3)
    assert float(first["detection_mean"]) == pytest.approx(d.mean())
    for stat, q in (("q25", 25), ("median", 50), ("q75", 75)):
        assert float(first[f"detection_{stat}"]) == pytest.approx(np.percentile(d, q))
    assert table[1]["detection_mean"] == "" and int(table[1]["detection_scored"]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
