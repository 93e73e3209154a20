"""Feature neighbours: the blocked top-k over decoder cosines equals the full [F, F] product's
top-k for every feature, within a layer and across adjacent layers, at the demo's width; the
parquet file holds exactly those rows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from helpers import copy_workflow, described_columns, run_snakemake, typed
from safetensors.torch import save_file

from loupe.cli import main
from loupe.examples import ROW_GROUP_FEATURES
from loupe.logits import blocked_top_k
from loupe.neighbours import decoder_neighbours, neighbours_layer, neighbours_schema
from loupe.train import sae_digest

# The demo's SAEs: hidden size 64, expansion factor 8.
FEATURES, D = 512, 64


def _unit(W: torch.Tensor) -> np.ndarray:
    W = W.double().numpy()
    return W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)


def _brute_top(full: np.ndarray, k: int) -> np.ndarray:
    """Each row's k largest columns of the full product, equal values by column."""
    cols = np.broadcast_to(np.arange(full.shape[1]), full.shape)
    return np.stack([np.lexsort((c, -r))[:k] for r, c in zip(full, cols, strict=True)])


def _decoders(seed: int, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(FEATURES, D, generator=g, dtype=torch.float64) for _ in range(n)]


def test_neighbours_and_matches_equal_the_full_product_for_every_feature():
    prev, mine, nxt = _decoders(0)
    mine[7] = 0.0  # a dead feature: cosine 0 with everything, still ranked
    got = decoder_neighbours(mine, {"prev": (1, prev), "next": (3, nxt)}, 2, top_n=10, chunk=97)
    assert sorted(got) == ["next", "prev", "same"]

    same = _unit(mine) @ _unit(mine).T
    np.fill_diagonal(same, -np.inf)  # never a feature itself
    for relation, (layer, full) in {
        "same": (2, same),
        "prev": (1, _unit(mine) @ _unit(prev).T),
        "next": (3, _unit(mine) @ _unit(nxt).T),
    }.items():
        other_layer, values, ids = got[relation]
        want = _brute_top(full, 10)
        assert other_layer == layer
        assert np.array_equal(ids.numpy(), want), relation
        np.testing.assert_allclose(values.numpy(), np.take_along_axis(full, want, 1), atol=1e-12)
    assert got["same"][2][7].tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9, 10]  # all ties at 0
    assert not (got["same"][2] == torch.arange(FEATURES)[:, None]).any()


def test_blocked_top_k_skips_self_and_breaks_ties_by_index_at_the_cut():
    g = torch.Generator().manual_seed(3)
    # Small integers: exact products and ties everywhere, many straddling the k-th place.
    W = torch.randint(-1, 2, (41, 3), generator=g).float()
    vals, ids = blocked_top_k(W, W, 6, query_chunk=7, key_chunk=9, skip_self=True)[True]
    full = (W @ W.T).numpy()
    np.fill_diagonal(full, -np.inf)
    want = _brute_top(full, 6)
    assert np.array_equal(ids.numpy(), want)
    assert np.array_equal(vals.numpy(), np.take_along_axis(full, want, 1))


def _sae_file(folder, W_dec: torch.Tensor):
    """A sparsify sae.safetensors (the stage reads only W_dec; the rest gives it its shape)."""
    folder.mkdir(parents=True)
    F, d = W_dec.shape
    state = {
        "W_dec": W_dec.float().contiguous(),
        "b_dec": torch.zeros(d),
        "encoder.weight": W_dec.float().T.contiguous().T.contiguous(),
        "encoder.bias": torch.zeros(F),
    }
    save_file(state, folder / "sae.safetensors")
    # and its digest, which training writes beside it and the rules read as its content
    (folder / "sae.sha256").write_text(sae_digest(folder / "sae.safetensors"))
    return folder / "sae.safetensors"


def test_layer_file_holds_every_features_rows_sorted_in_row_groups(config, tmp_path):
    cfg = typed({**config, "device": "cpu"})
    first = cfg.model.layers[0]
    mine, nxt = _decoders(5, 2)
    sae = _sae_file(tmp_path / "a", mine)
    nxt_sae = _sae_file(tmp_path / "b", nxt)
    out = tmp_path / "feature_neighbours.parquet"
    # The first layer has no layer before it: "prev" is simply absent.
    neighbours_layer(cfg, first, sae, out, prev_sae=[], next_sae=[nxt_sae])

    f = pq.ParquetFile(out)
    assert list(described_columns(out, neighbours_schema())) == [
        "feature",
        "relation",
        "rank",
        "other_layer",
        "other_feature",
        "cosine",
    ]
    assert f.metadata.row_group(0).column(0).compression == "ZSTD"
    top_n = cfg.neighbours.top_n
    assert f.metadata.num_row_groups == -(-FEATURES // ROW_GROUP_FEATURES)
    assert f.metadata.row_group(0).num_rows == min(FEATURES, ROW_GROUP_FEATURES) * 2 * top_n
    meta = json.loads(f.schema_arrow.metadata[b"loupe"])
    assert meta["adjacent_layers"] == [first + 1] and meta["layer"] == first

    rows = f.read().to_pydict()
    assert set(rows["relation"]) == {"same", "next"}
    keys = list(zip(rows["feature"], rows["relation"], rows["rank"], strict=True))
    assert keys == sorted(keys)
    assert len(keys) == FEATURES * 2 * top_n
    unit = _unit(mine.float())
    for relation, other, layer in (("same", mine, first), ("next", nxt, first + 1)):
        full = unit @ _unit(other.float()).T
        if relation == "same":
            np.fill_diagonal(full, -np.inf)
        picked = [i for i, r in enumerate(rows["relation"]) if r == relation]
        ids = np.array([rows["other_feature"][i] for i in picked]).reshape(FEATURES, top_n)
        # fp32 weights: near-ties may swap, so compare the cosines, not the order of ids.
        want = -np.sort(-full, axis=1)[:, :top_n]
        cos = np.array([rows["cosine"][i] for i in picked]).reshape(FEATURES, top_n)
        np.testing.assert_allclose(cos, want, atol=1e-5)
        np.testing.assert_allclose(np.take_along_axis(full, ids, 1), want, atol=1e-5)
        assert {rows["other_layer"][i] for i in picked} == {layer}


def test_cli_names_an_unconfigured_adjacent_layer_in_one_line(config, tmp_path, capsys):
    layers = config["model"]["layers"]
    sae = _sae_file(tmp_path / "a", _decoders(6, 1)[0])
    code = main(
        [
            "neighbours",
            "--config",
            json.dumps({**config, "device": "cpu"}),
            "--layer",
            str(layers[0]),
            "--sae",
            str(sae),
            "--prev-sae",
            str(sae),
            "--neighbours",
            str(tmp_path / "n.parquet"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == f"loupe neighbours: error: layer {layers[0] - 1} is not in model.layers"
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "n.parquet").exists()


@pytest.mark.e2e
def test_demo_neighbours_equal_the_full_product_for_every_layer(demo_run, config):
    """The demo's rule output, every layer and every feature: the cosines are the full
    product's top-N of the trained SAEs' decoders, layer 0 has no "prev" and the last layer
    no "next", and the staged copy under the prefix is the same file."""
    from safetensors.torch import load_file

    cfg = typed(config)
    layers, top_n = cfg.model.layers, cfg.neighbours.top_n
    results = demo_run / "results"
    decoders = {n: load_file(results / f"layer_{n}/sae.safetensors")["W_dec"] for n in layers}
    for layer in layers:
        path = results / f"layer_{layer}/feature_neighbours.parquet"
        rows = pq.read_table(path).to_pydict()
        staged = demo_run / f"results/hub/{cfg.hub.prefix}/feature_neighbours/layer_{layer}.parquet"
        assert staged.read_bytes() == path.read_bytes()
        want_relations = {"same"} | {
            r for r, n in (("prev", layer - 1), ("next", layer + 1)) if n in layers
        }
        assert set(rows["relation"]) == want_relations
        unit = _unit(decoders[layer])
        num = unit.shape[0]
        for relation in want_relations:
            other = {"same": layer, "prev": layer - 1, "next": layer + 1}[relation]
            full = unit @ _unit(decoders[other]).T
            if relation == "same":
                np.fill_diagonal(full, -np.inf)
            picked = [i for i, r in enumerate(rows["relation"]) if r == relation]
            assert len(picked) == num * top_n
            ids = np.array([rows["other_feature"][i] for i in picked]).reshape(num, top_n)
            cos = np.array([rows["cosine"][i] for i in picked]).reshape(num, top_n)
            want = -np.sort(-full, axis=1)[:, :top_n]
            np.testing.assert_allclose(cos, want, atol=1e-5)
            np.testing.assert_allclose(np.take_along_axis(full, ids, 1), want, atol=1e-5)
            assert {rows["other_layer"][i] for i in picked} == {other}
    log = (results / f"layer_{layers[0]}/neighbours.log").read_text()
    assert "Traceback" not in log and f"same (layer {layers[0]})" in log


@pytest.mark.e2e
def test_rule_runs_per_layer_with_the_adjacent_layers_there_are(tmp_path, config):
    """`snakemake` builds each layer's feature_neighbours.parquet from the SAE files alone
    (given here, as training leaves them): the first layer gets no "prev", the last no "next",
    and the rows equal the full product of the files' decoders."""
    layers = config["model"]["layers"]
    checkout = copy_workflow(tmp_path / "checkout")
    decoders = dict(zip(layers, _decoders(7, len(layers)), strict=True))
    for n, W in decoders.items():
        _sae_file(checkout / f"results/layer_{n}", W)
    targets = [f"results/layer_{n}/feature_neighbours.parquet" for n in layers]
    run_snakemake(checkout, "--profile", "profiles/demo", *targets)
    top_n = typed(config).neighbours.top_n
    for n in layers:
        rows = pq.read_table(checkout / f"results/layer_{n}/feature_neighbours.parquet")
        rows = rows.to_pydict()
        want = {"same"} | {r for r, m in (("prev", n - 1), ("next", n + 1)) if m in layers}
        assert set(rows["relation"]) == want
        assert len(rows["feature"]) == FEATURES * top_n * len(want)
    middle = layers[len(layers) // 2]
    rows = pq.read_table(checkout / f"results/layer_{middle}/feature_neighbours.parquet")
    nxt = rows.filter(pc.equal(rows["relation"], "next")).to_pydict()
    full = _unit(decoders[middle].float()) @ _unit(decoders[middle + 1].float()).T
    cos = np.array(nxt["cosine"]).reshape(FEATURES, top_n)
    np.testing.assert_allclose(cos, -np.sort(-full, axis=1)[:, :top_n], atol=1e-5)
