"""Feature flow checked against the data: the co-activation of matched features in adjacent
layers equals a dense brute-force count, and on real TopK codes of two related SAEs the
matched pairs co-fire far above shuffled pairs; the rule's job writes the per-pair table and
plot from the files the neighbours and maxact stages write."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import demo_config, typed

from loupe.cli import main
from loupe.errors import LoupeError
from loupe.examples import write_random_windows
from loupe.flow import FLOW_COLUMNS, coactivation_counts, summarize_flow
from loupe.neighbours import decoder_neighbours, neighbours_table, write_neighbours


def _dense(features: np.ndarray, acts: np.ndarray, width: int) -> np.ndarray:
    """[tokens, width] bool: which features fire on each token."""
    out = np.zeros((len(features), width), bool)
    for t, (ids, values) in enumerate(zip(features, acts, strict=True)):
        out[t, ids[values > 0]] = True
    return out


def _codes(rng, tokens: int, k: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Random TopK codes: k distinct features per token, some activations 0, some tokens
    uncounted (all 0, as the pool marks them)."""
    features = np.stack([rng.choice(width, k, replace=False) for _ in range(tokens)])
    acts = rng.uniform(0.1, 2.0, (tokens, k)) * (rng.random((tokens, k)) > 0.2)
    acts[rng.random(tokens) < 0.1] = 0.0
    return features.astype(np.int32), acts.astype(np.float32)


def test_coactivation_counts_equal_a_dense_brute_force():
    rng = np.random.default_rng(0)
    features_a, acts_a = _codes(rng, 500, 6, 40)
    features_b, acts_b = _codes(rng, 500, 6, 30)
    match = rng.integers(0, 30, 40)
    fires, both, tokens = coactivation_counts(features_a, acts_a, features_b, acts_b, match)

    A, B = _dense(features_a, acts_a, 40), _dense(features_b, acts_b, 30)
    counted = (acts_a > 0).any(1) & (acts_b > 0).any(1)
    A, B = A & counted[:, None], B & counted[:, None]
    assert tokens == counted.sum() < 500
    assert np.array_equal(fires, A.sum(0))
    assert np.array_equal(both, (A & B[:, match]).sum(0))
    assert both.sum() > 0

    with pytest.raises(LoupeError, match="tokens"):
        coactivation_counts(features_a, acts_a, features_b[:10], acts_b[:10], match)


class _Tokenizer:
    """What write_random_windows asks of a tokenizer: decoding ids."""

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)

    def batch_decode(self, sequences, skip_special_tokens=False):
        return [self.decode(s) for s in sequences]


def _sae_codes(x: torch.Tensor, W_enc: torch.Tensor, k: int):
    """sparsify's TopK encoder on x: (indices, activations)."""
    from sparsify.fused_encoder import fused_encoder

    out = fused_encoder(x, W_enc, torch.zeros(W_enc.shape[0]), k, "topk")
    return out.top_indices.numpy(), out.top_acts.numpy()


@pytest.fixture(scope="module")
def flow_files(tmp_path_factory):
    """Three layers whose SAEs are each a noisy permutation of the one before, encoding a
    residual stream that drifts a little per layer; their neighbours, pools and stats files."""
    root = tmp_path_factory.mktemp("flow")
    g = torch.Generator().manual_seed(0)
    num, d, k, windows, width = 96, 32, 4, 40, 9
    x = torch.randn(windows * width, d, generator=g)
    W = torch.randn(num, d, generator=g)
    files = {"neighbours": [], "random_windows": [], "stats": []}
    decoders, pools = [], []
    for layer in range(3):
        if layer:
            W = W[torch.randperm(num, generator=g)] + 0.3 * torch.randn(num, d, generator=g)
            x = x + 0.3 * torch.randn(x.shape, generator=g)
        decoders.append(W.clone())
        encoder = W.clone()
        encoder[7] = 0.0  # feature 7 never fires: a dead feature
        pools.append(_sae_codes(x, encoder, k))
    tokens = np.arange(windows * 20).reshape(windows, 20)
    for layer in range(3):
        adjacent = {
            r: (o, decoders[o]) for r, o in (("prev", layer - 1), ("next", layer + 1)) if 0 <= o < 3
        }
        path = root / f"neighbours_{layer}.parquet"
        write_neighbours(
            path, neighbours_table(decoder_neighbours(decoders[layer], adjacent, layer, 3))
        )
        indices, acts = pools[layer]
        acts[0] = 0.0  # an uncounted position
        pool = {
            "rows": np.arange(windows),
            "starts": np.full(windows, 5),
            "acts": acts.reshape(windows, width, k),
            "indices": indices.reshape(windows, width, k),
        }
        windows_path = root / f"random_windows_{layer}.parquet"
        write_random_windows(windows_path, pool, tokens, _Tokenizer(), {"layer": layer})
        density = np.bincount(indices[acts > 0], minlength=num) / len(indices)
        stats = root / f"stats_{layer}.parquet"
        pq.write_table(pa.table({"feature": np.arange(num), "density": density}), stats)
        for kind, p in (("neighbours", path), ("random_windows", windows_path), ("stats", stats)):
            files[kind].append(p)
    return root, files, pools


def test_matched_pairs_co_fire_above_shuffled_pairs_on_real_codes(flow_files, tmp_path):
    root, files, pools = flow_files
    settings = demo_config()
    settings["model"]["layers"] = [0, 1, 2]
    table, plot = tmp_path / "flow.csv", tmp_path / "flow.png"
    rows = summarize_flow(typed(settings), **files, table=table, plot=plot)

    assert [(r["layer"], r["next_layer"]) for r in rows] == [(0, 1), (1, 2)]
    with open(table) as f:
        written = list(csv.DictReader(f))
    assert list(written[0]) == list(FLOW_COLUMNS) and len(written) == 2
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in rows:
        # Oracle: rank-0 next matches from the parquet, dense codes, tokens counted in both.
        nb = pq.read_table(files["neighbours"][row["layer"]]).to_pylist()
        best = {r["feature"]: r for r in nb if r["relation"] == "next" and r["rank"] == 0}
        match = np.array([best[f]["other_feature"] for f in range(len(best))])
        (ia, aa), (ib, ab) = pools[row["layer"]], pools[row["layer"] + 1]
        A, B = _dense(ia, aa, 96), _dense(ib, ab, 96)
        counted = A.any(1) & B.any(1)
        A, B = A[counted], B[counted]
        assert row["tokens"] == counted.sum() == 40 * 9 - 1
        assert row["coactivation"] == pytest.approx((A & B[:, match]).sum() / A.sum())
        density = pq.read_table(files["stats"][row["layer"]])["density"].to_numpy()
        live = [best[f]["cosine"] for f in range(96) if density[f] > 0]
        assert row["features"] == len(live) < 96  # some features never fire
        assert row["median_cosine"] == pytest.approx(float(np.median(live)), rel=1e-6)
        # The layers are related, so the matches co-fire far above chance.
        print(f"\n{row}")
        assert row["coactivation"] > 3 * row["random_coactivation"] > 0
        assert row["lift"] == pytest.approx(row["coactivation"] / row["random_coactivation"])


def test_flow_command_writes_the_table(flow_files, tmp_path):
    """The rule's command line: per-layer path lists in model.layers order."""
    _, files, _ = flow_files
    settings = demo_config()
    settings["model"]["layers"] = [0, 1, 2]
    table = tmp_path / "flow.csv"
    args = ["flow", "--config", json.dumps(settings)]
    for kind in ("neighbours", "random_windows", "stats"):
        args += [f"--{kind.replace('_', '-')}", *map(str, files[kind])]
    assert main([*args, "--table", str(table), "--plot", str(tmp_path / "flow.png")]) == 0
    with open(table) as f:
        assert [(r["layer"], r["next_layer"]) for r in csv.DictReader(f)] == [
            ("0", "1"),
            ("1", "2"),
        ]


def test_flow_refuses_pools_of_different_windows(flow_files, tmp_path):
    _, files, _ = flow_files
    settings = demo_config()
    settings["model"]["layers"] = [0, 1, 2]
    moved = tmp_path / "moved.parquet"  # layer 1's pool, its windows starting elsewhere
    t = pq.read_table(files["random_windows"][1])
    pq.write_table(t.set_column(2, "start", pa.array(np.zeros(len(t), np.int64))), moved)
    pools = files["random_windows"]
    swapped = {**files, "random_windows": [pools[0], moved, pools[2]]}
    with pytest.raises(LoupeError, match="different windows"):
        summarize_flow(
            typed(settings), **swapped, table=tmp_path / "t.csv", plot=tmp_path / "p.png"
        )
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.e2e
def test_demo_flow_equals_the_brute_force_and_beats_shuffled_pairs(demo_run):
    """The demo's feature_flow.csv: one row per adjacent pair, each co-activation equal to a
    dense count over the two layers' pools with the parquet's rank-0 matches, matched pairs
    co-firing above shuffled ones; staged with the card's table."""
    from loupe.flow import read_pool

    results = demo_run / "results"
    layers = demo_config()["model"]["layers"]
    with open(results / "summary/feature_flow.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["layer"]), int(r["next_layer"])) for r in rows] == list(
        zip(layers, layers[1:], strict=False)
    )
    for row in rows:
        layer = int(row["layer"])
        nb = pq.read_table(results / f"layer_{layer}/feature_neighbours.parquet").to_pylist()
        match = np.array(
            [r["other_feature"] for r in nb if r["relation"] == "next" and r["rank"] == 0]
        )
        _, ia, aa = read_pool(results / f"layer_{layer}/random_windows.parquet")
        _, ib, ab = read_pool(results / f"layer_{layer + 1}/random_windows.parquet")
        A, B = _dense(ia, aa, len(match)), _dense(ib, ab, len(match))
        counted = A.any(1) & B.any(1)
        A, B = A[counted], B[counted]
        assert int(row["tokens"]) == counted.sum()
        assert float(row["coactivation"]) == pytest.approx((A & B[:, match]).sum() / A.sum())
        assert float(row["coactivation"]) > 2 * float(row["random_coactivation"]) > 0
    hub = results / "hub"
    prefix = demo_config()["hub"]["prefix"]
    assert (hub / prefix / "feature_flow.csv").read_bytes() == (
        results / "summary/feature_flow.csv"
    ).read_bytes()
    assert (hub / prefix / "plots/feature_flow_by_layer.png").is_file()
    assert f"| {layers[0]} → {layers[1]} |" in (hub / "README.md").read_text()
