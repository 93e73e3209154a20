"""Max-activating examples: the streaming top-N equals a brute-force sort for every feature,
every row is self-consistent and recomputable, the stats cover every feature, the parquet
layout serves per-feature reads, bad input is one line, and memory does not grow with the
sample size."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from helpers import demo_config, described_columns, typed

from loupe.errors import LoupeError
from loupe.examples import (
    ROW_GROUP_FEATURES,
    examples_schema,
    interval_examples_schema,
    stats_schema,
)
from loupe.logits import feature_logits_schema
from loupe.maxact import sample_layer
from loupe.model import capture, import_sparsify, load_model, truncate_after
from loupe.samplers import (
    Batch,
    FiringStats,
    TopExamples,
    densify,
    sequence_peaks,
    window_activations,
)

sparsify = import_sparsify()

LAYER = 2  # the layer `trained_layer` trains
SPECIAL = [0, 1, 2]  # the demo tokenizer's pad, eos, bos


# ---------------------------------------------------------------------------------------------
# The algorithm on tiny tensors


def _random_topk(rows: int, seq: int, k: int, features: int, seed: int, levels: int = 0):
    """Random TopK-shaped output: acts, indices [rows, seq, k] (distinct indices per token).
    levels > 0 quantises the activations so that ties are common."""
    g = torch.Generator().manual_seed(seed)
    acts = torch.rand(rows, seq, k, generator=g)
    if levels:
        acts = (acts * levels).ceil() / levels
    acts[torch.rand(rows, seq, k, generator=g) < 0.2] = 0  # TopK may keep zeros
    indices = torch.stack(
        [torch.randperm(features, generator=g)[:k] for _ in range(rows * seq)]
    ).view(rows, seq, k)
    return acts, indices


def _dense(acts, indices, features):
    return torch.zeros(*acts.shape[:2], features).scatter_(2, indices, acts)


def test_sequence_peaks_are_the_dense_max_at_the_first_position():
    acts, indices = _random_topk(rows=4, seq=12, k=3, features=7, seed=0, levels=3)
    dense = _dense(acts, indices, 7)  # [rows, seq, F]
    peaks, positions = sequence_peaks(acts, indices, 7)
    assert torch.equal(peaks, dense.amax(1))
    for r in range(4):
        for f in range(7):
            hits = (dense[r, :, f] == peaks[r, f]).nonzero().flatten()
            expect = int(hits[0]) if peaks[r, f] > 0 else 12
            assert positions[r, f] == expect, (r, f)


def _brute_top(dense: torch.Tensor, n: int, before: int, after: int):
    """Per feature: [(activation, sequence, position, window)] by activation desc, sequence
    asc, one (first) peak per sequence; dense: [rows, seq, F]."""
    rows, seq, features = dense.shape
    out = []
    for f in range(features):
        found = []
        for r in range(rows):
            peak = float(dense[r, :, f].max())
            if peak > 0:
                p = int((dense[r, :, f] == peak).nonzero()[0])
                window = [
                    float(dense[r, t, f]) if 0 <= t < seq else 0.0
                    for t in range(p - before, p + after + 1)
                ]
                found.append((peak, r, p, window))
        out.append(sorted(found, key=lambda e: (-e[0], e[1]))[:n])
    return out


@pytest.mark.parametrize("levels", [0, 4])  # continuous values, and many exact ties
def test_streaming_top_n_equals_a_full_sort(levels):
    rows, seq, k, features = 23, 9, 3, 6
    acts, indices = _random_topk(rows, seq, k, features, seed=1, levels=levels)
    spec = dataclasses.replace(
        typed(demo_config()).maxact, top_n=4, window_before=3, window_after=2, batch_size=5
    )
    assert spec.width == 3 + 1 + 2
    top = TopExamples(features, spec, torch.device("cpu"))
    for start, stop in [(0, 5), (5, 6), (6, 15), (15, 23)]:  # uneven batches
        top.update(Batch(acts[start:stop], indices[start:stop], start, top.num_latents))
    expect = _brute_top(_dense(acts, indices, features), 4, 3, 2)
    for f in range(features):
        n = len(expect[f])
        assert top.values[f, :n].tolist() == [e[0] for e in expect[f]]
        assert top.sequences[f, :n].tolist() == [e[1] for e in expect[f]]
        assert top.positions[f, :n].tolist() == [e[2] for e in expect[f]]
        assert top.windows[f, :n].tolist() == [e[3] for e in expect[f]]
        assert (top.sequences[f, n:] == -1).all() and (top.values[f, n:] == 0).all()


def test_windows_are_clipped_at_row_edges():
    acts = torch.tensor([[[1.0], [2.0], [0.0], [3.0]]])  # one row, 4 positions, k=1
    indices = torch.tensor([[[5], [5], [1], [5]]])
    dense = densify(acts, indices, 6)
    assert dense.shape == (1, 4, 6) and dense.sum() == 6 and dense[0, 3, 5] == 3
    rows = torch.tensor([0, 0])
    got = window_activations(
        dense, rows, torch.tensor([5, 5]), torch.tensor([0, 3]), before=2, after=2
    )
    assert got.tolist() == [[0, 0, 1, 2, 0], [2, 0, 3, 0, 0]]


def test_firing_stats_count_only_positive_activations():
    acts = torch.tensor([[[2.0, 0.0], [1.0, 4.0]]])
    indices = torch.tensor([[[0, 1], [1, 0]]])
    stats = FiringStats(3, torch.device("cpu"))
    stats.update(acts, indices, tokens=2)
    assert stats.count.tolist() == [2, 1, 0]
    assert stats.total.tolist() == [6.0, 1.0, 0.0]
    assert stats.peak.tolist() == [4.0, 1.0, 0.0]
    assert stats.tokens == 2


@pytest.mark.parametrize(
    ("key", "value"),
    [("top_n", 0), ("window_before", -1), ("window_after", -1), ("batch_size", 0)],
)
def test_config_rejects_out_of_range_maxact_settings(key, value):
    raw = demo_config()
    raw["maxact"][key] = value
    with pytest.raises(LoupeError) as info:
        typed(raw)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"config error at maxact/{key}: {value} is less than the minimum")
    raw["maxact"][key] = value + 1  # the smallest allowed value passes
    assert getattr(typed(raw).maxact, key) == value + 1


# ---------------------------------------------------------------------------------------------
# One real pass on the demo model and the trained layer


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, settings, token_dir, trained_layer):
    """sample_layer on layer 2 over the 128-row sample split: (settings, examples, stats)."""
    s = copy.deepcopy(settings)
    s["device"] = "cpu"
    s["maxact"].update(top_n=20, window_before=32, window_after=8, batch_size=8)
    out = tmp_path_factory.mktemp("maxact")
    summary = sample_layer(
        typed(s),
        LAYER,
        trained_layer / "sae.safetensors",
        token_dir / "sample.npy",
        token_dir / "manifest.json",
        out / "max_activations.parquet",
        out / "interval_examples.parquet",
        out / "feature_stats.parquet",
        out / "feature_logits.parquet",
        random_windows=out / "random_windows.parquet",
    )
    assert summary["tokens"] == np.load(token_dir / "sample.npy").size
    assert summary["random_windows"] == s["maxact"]["random_windows"]
    return s, out / "max_activations.parquet", out / "feature_stats.parquet"


def test_the_pass_reads_activations_without_running_the_lm_head(settings, token_dir):
    """Issue 26 #3: maxact loads the causal LM (its W_U gives the top logits) and ran its
    262,144-way head at every position of every batch, for nothing. The activations it reads
    instead equal those of a full forward's hidden states."""
    model = load_model(settings["model"]["name"], torch.device("cpu"), None, "auto", head=True)
    hookpoint = settings["model"]["hookpoint"].format(layer=LAYER)
    ids = torch.from_numpy(np.load(token_dir / "sample.npy")[:4].astype(np.int64))
    heads = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *_: heads.append(1))
    x = capture(model, hookpoint, ids)
    assert heads == []
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True)
    hook.remove()
    assert heads == [1] and len(full.hidden_states) > LAYER + 2  # LAYER is not the last
    torch.testing.assert_close(x, full.hidden_states[LAYER + 1], rtol=0, atol=0)


@pytest.fixture(scope="module")
def reference(sampled, token_dir, trained_layer):
    """Brute force: dense SAE activations of every sample token, specials zeroed: [rows, seq, F]
    (computed 32 rows at a time, not in the sampler's batches of 8)."""
    s = sampled[0]
    hookpoint = s["model"]["hookpoint"].format(layer=LAYER)
    model = load_model(s["model"]["name"], torch.device("cpu"), None, "auto")
    truncate_after(model, hookpoint)
    sae = sparsify.SparseCoder.load_from_disk(trained_layer)
    tokens = torch.from_numpy(np.load(token_dir / "sample.npy").astype(np.int64))
    rows, seq = tokens.shape
    dense = torch.zeros(rows, seq, sae.num_latents)
    with torch.no_grad():
        for start in range(0, rows, 32):
            x = capture(model, hookpoint, tokens[start : start + 32]).float()
            enc = sae.encode(x.reshape(-1, x.shape[-1]))
            block = torch.zeros(enc.top_acts.shape[0], sae.num_latents)
            block.scatter_(1, enc.top_indices, enc.top_acts)
            dense[start : start + 32] = block.view(-1, seq, sae.num_latents)
    dense[torch.isin(tokens, torch.tensor(SPECIAL))] = 0
    return dense


def test_examples_match_brute_force_for_every_feature(sampled, reference):
    _, examples, stats = sampled
    df = pl.read_parquet(examples)
    top_n = sampled[0]["maxact"]["top_n"]
    peaks, positions = reference.max(1)  # [rows, F]: one example per sequence
    tol = 1e-4
    swapped = 0
    for f in range(reference.shape[2]):
        ours = df.filter(pl.col("feature") == f)
        got = {r["sequence"]: (r["activation"], r["position"]) for r in ours.iter_rows(named=True)}
        col = peaks[:, f]
        order = sorted((r for r in range(len(col)) if col[r] > 0), key=lambda r: (-col[r], r))
        want = {r: (float(col[r]), int(positions[r, f])) for r in order[:top_n]}
        assert len(got) == len(want), f
        np.testing.assert_allclose(
            ours["activation"].to_numpy(), [want[r][0] for r in order[:top_n]], rtol=tol, atol=tol
        )
        # A sequence may only differ by a float-level tie at the last kept place.
        for r in got.keys() ^ want.keys():
            act = got.get(r, want.get(r))[0]
            assert len(want) == top_n and abs(act - want[order[top_n - 1]][0]) < tol, (f, r)
            swapped += 1
        for r in got.keys() & want.keys():
            assert got[r][0] == pytest.approx(want[r][0], rel=tol, abs=tol), (f, r)
            assert reference[r, got[r][1], f] == pytest.approx(want[r][0], rel=tol, abs=tol)
    assert swapped <= 2
    assert len(df) == pl.read_parquet(stats)["examples"].sum() > 0


def test_random_windows_hold_every_tokens_exact_code(sampled, reference, token_dir):
    """Each pooled window's codes, densified, equal the brute-force activations of its tokens:
    so "feature f is not active in this window" is exact."""
    s, examples, _ = sampled
    pool = pl.read_parquet(examples.parent / "random_windows.parquet")
    tokens = np.load(token_dir / "sample.npy")
    rows, seq = tokens.shape
    width = s["maxact"]["window_before"] + 1 + s["maxact"]["window_after"]
    assert len(pool) == s["maxact"]["random_windows"]
    pairs = list(zip(pool["sequence"], pool["start"], strict=True))
    assert len(set(pairs)) == len(pairs) and pairs == sorted(pairs)  # distinct, split order
    assert len({r for r, _ in pairs}) > rows // 4  # spread over the split
    for row in pool.iter_rows(named=True):
        r, t = row["sequence"], row["start"]
        assert 0 <= t <= seq - width
        assert row["token_ids"] == tokens[r, t : t + width].tolist()
        dense = torch.zeros(width, reference.shape[2])
        dense.scatter_(
            1,
            torch.tensor(row["features"], dtype=torch.int64),
            torch.tensor(row["activations"]),
        )
        torch.testing.assert_close(dense, reference[r, t : t + width], rtol=1e-4, atol=1e-4)


def test_random_windows_depend_only_on_the_split_shape():
    from loupe.samplers import RandomWindows

    a = RandomWindows(100, 64, 50, 41, 4, torch.device("cpu"))
    b = RandomWindows(100, 64, 50, 41, 8, torch.device("cpu"))
    assert np.array_equal(a.rows, b.rows) and np.array_equal(a.starts, b.starts)
    small = RandomWindows(2, 10, 50, 41, 4, torch.device("cpu"))  # windows clipped to a row
    assert small.width == 10 and len(small.rows) == 2  # one start per row


def _token_string(tokenizer, token_id: int) -> str:
    """What a token shows as: its decoding alone, or, where that is part of a multi-byte
    character (U+FFFD), its bytes escaped. The demo tokenizer is byte-level BPE: each
    character of a vocabulary piece stands for one byte (GPT-2's alphabet)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    raw = bytes(byte_of[c] for c in tokenizer.convert_ids_to_tokens(token_id))
    return raw.decode("utf-8", errors="backslashreplace")


def test_every_row_is_self_consistent(sampled, token_dir):
    from transformers import AutoTokenizer

    s, examples, _ = sampled
    tokenizer = AutoTokenizer.from_pretrained(s["model"]["name"])
    tokens = np.load(token_dir / "sample.npy")
    before, after = s["maxact"]["window_before"], s["maxact"]["window_after"]
    df = pl.read_parquet(examples)
    assert df["layer"].unique().to_list() == [LAYER]
    for row in df.iter_rows(named=True):
        ctx = json.loads(row["context_tokens"])
        acts = np.array(json.loads(row["token_activations"]), dtype=np.float32)
        seq, pos, peak = row["sequence"], row["position"], row["peak_index"]
        start = max(0, pos - before)
        ids = tokens[seq, start : min(tokens.shape[1], pos + after + 1)].tolist()
        assert len(ctx) == len(acts) == len(ids) and peak == pos - start
        assert acts[peak] == np.float32(row["activation"]) > 0
        assert acts[[i not in SPECIAL for i in ids]].max() == acts[peak]
        assert row["token_id"] == ids[peak] not in SPECIAL
        assert row["token"] == ctx[peak] == _token_string(tokenizer, ids[peak])
        assert ctx == [_token_string(tokenizer, i) for i in ids]
        assert row["context"] == tokenizer.decode(ids)
    # Specials stay visible in contexts (every window reaching position 0 shows the BOS).
    assert (
        df.filter(pl.col("position") <= before)["context_tokens"].str.starts_with('["<bos>"').all()
    )


def test_recomputing_the_sae_at_sequence_and_position_gives_the_activation(
    sampled, token_dir, trained_layer
):
    s, examples, _ = sampled
    df = pl.read_parquet(examples).filter(pl.col("rank") == 0).head(40)
    hookpoint = s["model"]["hookpoint"].format(layer=LAYER)
    model = load_model(s["model"]["name"], torch.device("cpu"), None, "auto")
    sae = sparsify.SparseCoder.load_from_disk(trained_layer)
    seqs = sorted(set(df["sequence"].to_list()))
    ids = torch.from_numpy(np.load(token_dir / "sample.npy")[seqs].astype(np.int64))
    with torch.no_grad():  # the full model, these rows only: another batch than the sampler's
        x = capture(model, hookpoint, ids).float()
    for row in df.iter_rows(named=True):
        with torch.no_grad():
            enc = sae.encode(x[seqs.index(row["sequence"]), row["position"]][None])
        hit = enc.top_indices[0] == row["feature"]
        assert hit.any()
        assert float(enc.top_acts[0][hit]) == pytest.approx(row["activation"], rel=1e-4)


def test_every_column_of_the_written_files_is_described_in_the_file(sampled):
    """The writers (their row groups, page index and per-column options) keep each column's
    description in the file's schema, where the card and the browser's suite.json read it."""
    _, examples, _ = sampled
    for name, schema in (
        ("max_activations", examples_schema()),
        ("interval_examples", interval_examples_schema()),
        ("feature_stats", stats_schema()),
        ("feature_logits", feature_logits_schema()),
    ):
        described_columns(examples.with_name(f"{name}.parquet"), schema)
    ranks = (examples_schema(), interval_examples_schema())
    top, interval = (s.field("rank").metadata[b"description"].decode() for s in ranks)
    assert "within its feature" in top and "within its interval" in interval


def test_feature_stats_cover_every_feature(sampled, reference, token_dir):
    _, examples, stats_path = sampled
    stats = pl.read_parquet(stats_path)
    assert stats.schema == {
        "feature": pl.Int64,
        "fire_count": pl.Int64,
        "density": pl.Float64,
        "max_activation": pl.Float32,
        "mean_activation": pl.Float32,
        "examples": pl.Int64,
        "tokens": pl.Int64,
        "histogram": pl.List(pl.Int64),
    }
    features = reference.shape[2]
    assert stats["feature"].to_list() == list(range(features))  # dead ones included
    counted = int((~np.isin(np.load(token_dir / "sample.npy"), SPECIAL)).sum())
    assert stats["tokens"].unique().to_list() == [counted]
    fires = (reference > 0).sum((0, 1)).numpy()
    assert stats["fire_count"].to_list() == fires.tolist()
    np.testing.assert_allclose(stats["density"].to_numpy(), fires / counted)
    np.testing.assert_allclose(
        stats["max_activation"].to_numpy(), reference.amax((0, 1)).numpy(), rtol=1e-4
    )
    mean = reference.sum((0, 1)).numpy() / np.maximum(fires, 1)
    np.testing.assert_allclose(stats["mean_activation"].to_numpy(), mean, rtol=1e-4)
    top = pl.read_parquet(examples).filter(pl.col("rank") == 0).sort("feature")
    live = stats.filter(pl.col("fire_count") > 0)
    assert top["activation"].to_list() == live["max_activation"].to_list()
    dead = stats.filter(pl.col("fire_count") == 0)
    assert (dead["examples"] == 0).all() and (dead["max_activation"] == 0).all()
    counts = pl.read_parquet(examples).group_by("feature").len()
    kept = dict(zip(counts["feature"], counts["len"], strict=True))
    assert stats["examples"].to_list() == [kept.get(f, 0) for f in range(features)]


def test_activation_histograms_count_every_firing_in_its_bin(sampled, reference):
    _, _, stats_path = sampled
    stats = pl.read_parquet(stats_path)
    meta = json.loads(pq.read_schema(stats_path).metadata[b"loupe"])
    edges = np.array(meta["histogram_edges"], dtype=np.float32)
    got = np.array(stats["histogram"].to_list())
    features = reference.shape[2]
    assert got.shape == (features, len(edges) + 1)
    # Brute force: bin 0 below the first edge, bin i in [edges[i-1], edges[i]), the last at
    # or above the last edge.
    flat = reference.reshape(-1, features).numpy()
    rows, feats = np.nonzero(flat > 0)
    want = np.zeros_like(got)
    np.add.at(want, (feats, np.searchsorted(edges, flat[rows, feats], side="right")), 1)
    assert (got.sum(1) == want.sum(1)).all()
    assert got.sum(1).tolist() == stats["fire_count"].to_list()
    # The reference is computed in other batches, so a value within float rounding of an edge
    # may land in the neighbouring bin: a count moved by one place, never more.
    assert np.abs(np.cumsum(got - want, axis=1)).max() <= 1
    assert np.abs(got - want).sum() <= 10, np.abs(got - want).sum()


def test_parquet_is_sorted_compressed_and_grouped_by_feature(sampled, tmp_path):
    _, examples, _ = sampled
    table = pq.read_table(examples)
    assert table.column_names[:6] == [
        "feature",
        "activation",
        "token",
        "context",
        "context_tokens",
        "token_activations",
    ]
    assert set(table.column_names[6:]) == {
        "layer",
        "rank",
        "peak_index",
        "token_id",
        "sequence",
        "position",
    }
    df = pl.from_arrow(table)
    assert df.equals(df.sort(["feature", "activation"], descending=[False, True]))
    assert df.equals(df.sort(["feature", "rank"]))
    meta = pq.ParquetFile(examples).metadata
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        assert all(group.column(c).compression == "ZSTD" for c in range(group.num_columns))
        feature = group.column(0).statistics
        # Each row group holds one block of features, so a per-feature read touches one.
        assert feature.min // ROW_GROUP_FEATURES == feature.max // ROW_GROUP_FEATURES
    one = pq.read_table(examples, filters=[("feature", "=", 70)])
    assert one.num_rows == len(df.filter(pl.col("feature") == 70))

    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(examples), split="train", cache_dir=str(tmp_path))
    assert len(ds) == len(df) and ds.features["context_tokens"].dtype == "string"


# ---------------------------------------------------------------------------------------------
# Bad input: one line each, through the command line


def _cli(settings, trained_layer, token_dir, tmp_path, **override):
    from loupe.cli import main

    args = {
        "config": json.dumps(settings),
        "layer": str(LAYER),
        "sae": str(trained_layer / "sae.safetensors"),
        "tokens": str(token_dir / "sample.npy"),
        "manifest": str(token_dir / "manifest.json"),
        "examples": str(tmp_path / "ex.parquet"),
        "intervals": str(tmp_path / "iv.parquet"),
        "stats": str(tmp_path / "st.parquet"),
        "logits": str(tmp_path / "lg.parquet"),
        "random-windows": str(tmp_path / "rw.parquet"),
        **override,
    }
    return main(["maxact", *[x for k, v in args.items() for x in (f"--{k}", v)]])


def _one_line_error(capsys, message: str) -> None:
    # Other stderr output (the model's loading bar) may come first; the error is one line.
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and lines[0].startswith("loupe maxact: error: "), lines
    assert message in lines[0], lines


def test_bad_input_is_one_line_each(settings, trained_layer, token_dir, tmp_path, capsys):
    s = copy.deepcopy(settings)
    s["device"] = "cpu"

    wrong = tmp_path / "wrong_sae"
    cfg = sparsify.SparseCoderConfig(expansion_factor=2, k=4)
    sparsify.SparseCoder(32, cfg).save_to_disk(wrong)
    assert _cli(s, wrong, token_dir, tmp_path) == 2
    _one_line_error(capsys, "reads 32-dim activations, but")

    assert _cli(s, trained_layer, token_dir, tmp_path, tokens=str(tmp_path / "none.npy")) == 2
    _one_line_error(capsys, "token split not found")

    np.save(tmp_path / "empty.npy", np.zeros((0, 128), dtype=np.uint32))
    assert _cli(s, trained_layer, token_dir, tmp_path, tokens=str(tmp_path / "empty.npy")) == 2
    _one_line_error(capsys, "is empty")

    s["maxact"]["top_n"] = 0
    assert _cli(s, trained_layer, token_dir, tmp_path) == 2
    _one_line_error(capsys, "config error at maxact/top_n: 0 is less than the minimum of 1")
    assert not list(tmp_path.glob("*.parquet"))  # no output of any failed run


# ---------------------------------------------------------------------------------------------
# Memory: the sampler's peak does not grow with the number of tokens

_MEMORY_PROBE = """
import json, sys
from pathlib import Path
import numpy as np, torch
from loupe.config import MaxactConfig
from loupe.maxact import stream
from loupe.model import load_model, load_sae, truncate_after

a = json.loads(sys.argv[1])
torch.set_num_threads(1)
model = load_model(a["model"], torch.device("cpu"), None, "auto")
truncate_after(model, a["hookpoint"])
sae = load_sae(Path(a["sae"]), torch.device("cpu"), decoder=False)
tokens = np.load(a["tokens"], mmap_mode="r")
spec = MaxactConfig(**a["maxact"])
stream(model, sae, a["hookpoint"], tokens[:16], spec, a["special"])  # warm up the allocator

def kb(key):
    line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
    return int(line.split()[1])

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current RSS
start = kb("VmRSS")
stream(model, sae, a["hookpoint"], tokens, spec, a["special"])
print(json.dumps({"growth_kb": kb("VmHWM") - start}))
"""


def _peak_growth_mb(settings, trained_layer, tokens_path: Path) -> float:
    args = {
        "model": settings["model"]["name"],
        "hookpoint": settings["model"]["hookpoint"].format(layer=LAYER),
        "sae": str(trained_layer),
        "tokens": str(tokens_path),
        "special": SPECIAL,
        "maxact": {**settings["maxact"], "top_n": 20, "batch_size": 8},
    }
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["growth_kb"] / 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.slow  # over 30 s: outside the fast loop
def test_peak_memory_stays_flat_when_the_sample_grows_4x(
    settings, trained_layer, token_dir, tmp_path
):
    train = np.load(token_dir / "train.npy")  # 512 rows: more than the sample split
    small, large = tmp_path / "small.npy", tmp_path / "large.npy"
    np.save(small, train)
    np.save(large, np.concatenate([train] * 4))
    grow_small = _peak_growth_mb(settings, trained_layer, small)
    grow_large = _peak_growth_mb(settings, trained_layer, large)
    # Measured: 3-7 MB at both sizes. A sampler that kept every token's top-k activations
    # grew ~8 MB here and ~40 MB at 4x; dense activations would add ~400 MB.
    assert grow_large < grow_small + 10, (grow_small, grow_large)


# ---------------------------------------------------------------------------------------------
# The workflow


@pytest.mark.e2e
def test_demo_writes_both_parquet_files_for_every_layer(demo_run, config):
    for layer in config["model"]["layers"]:
        folder = demo_run / f"results/layer_{layer}"
        stats = pl.read_parquet(folder / "feature_stats.parquet")
        examples = pl.read_parquet(folder / "max_activations.parquet")
        assert len(stats) == 64 * config["sae"]["expansion_factor"]
        assert len(examples) == stats["examples"].sum() > 0
        assert examples["layer"].unique().to_list() == [layer]
        assert "features dead" in (folder / "maxact.log").read_text()
