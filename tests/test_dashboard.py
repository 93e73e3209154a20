"""Dashboard data: the streamed histogram equals numpy.histogram of the dense activations,
interval examples are exactly uniform samples of each interval and every kept example is
what a dense recomputation gives, and the chunked logit tables equal the full product's."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from loupe.config import MaxactConfig
from loupe.errors import LoupeError
from loupe.examples import ROW_GROUP_FEATURES, TokenStrings, example_table
from loupe.logits import feature_logits_table, top_logits, write_feature_logits
from loupe.samplers import (
    HISTOGRAM_EDGES,
    INTERVAL_EDGES,
    ActivationHistogram,
    Batch,
    FiringStats,
    IntervalExamples,
)

SPEC = MaxactConfig(
    top_n=3,
    window_before=3,
    window_after=2,
    intervals=10,
    per_interval=5,
    top_logits=10,
    batch_size=4,
    random_windows=0,
)


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: extra threads only contend on the shared test machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_topk(rows, seq, k, features, seed, scale=None, used=None):
    """Random TopK-shaped output acts, indices [rows, seq, k] (distinct indices per token,
    drawn from the first `used` features); activations log-uniform over 10**scale."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = scale or (-1, 1)
    acts = 10 ** (lo + (hi - lo) * torch.rand(rows, seq, k, generator=g))
    acts[torch.rand(rows, seq, k, generator=g) < 0.2] = 0  # TopK may keep zeros
    used = used or features
    indices = torch.stack([torch.randperm(used, generator=g)[:k] for _ in range(rows * seq)]).view(
        rows, seq, k
    )
    return acts, indices


def _dense(acts, indices, features):
    return torch.zeros(*acts.shape[:2], features).scatter_(2, indices, acts)


# ---------------------------------------------------------------------------------------------
# Histogram


def test_histogram_equals_numpy_histogram_of_the_dense_activations():
    features, used = 9, 7  # features 7 and 8 never fire
    acts, indices = _random_topk(12, 10, 4, features, seed=1, scale=(-6, 6), used=used)
    # Values exactly on edges must land in the bin they open, as in numpy.
    acts[0, 1:6, 0] = HISTOGRAM_EDGES[[0, 1, 80, 159, 160]]
    acts[:, 0] = 0  # a special position: zeroed, so never counted
    hist = ActivationHistogram(features, torch.device("cpu"))
    stats = FiringStats(features, torch.device("cpu"))
    for start in range(0, 12, 5):
        hist.update(acts[start : start + 5], indices[start : start + 5])
        stats.update(acts[start : start + 5], indices[start : start + 5], tokens=0)

    out = hist.cpu()
    edges = out["edges"].astype(np.float64)
    dense = _dense(acts, indices, features).numpy().reshape(-1, features)
    bins = np.concatenate([[0.0], edges, [np.inf]])
    assert out["counts"].shape == (features, edges.size + 1)
    for f in range(features):
        vals = dense[:, f][dense[:, f] > 0].astype(np.float64)
        # numpy closes its last bin; no value reaches the finite stand-in for infinity.
        expect, _ = np.histogram(vals, bins=np.where(np.isinf(bins), 1e30, bins))
        assert np.array_equal(out["counts"][f], expect), f
    assert out["counts"][:, 0].sum() > 0 and out["counts"][:, -1].sum() > 0  # both tails hit
    assert np.array_equal(out["counts"].sum(1), stats.count.numpy())
    assert not out["counts"][used:].any()


# ---------------------------------------------------------------------------------------------
# Interval examples


def _replica_stream(values: list[float], replicas: int):
    """One token per row, every feature firing with the row's value: each feature is an
    independent replica of one stream. acts, indices [rows, 1, replicas]."""
    rows = len(values)
    acts = torch.tensor(values).view(rows, 1, 1).expand(rows, 1, replicas).contiguous()
    indices = torch.arange(replicas).view(1, 1, replicas).expand(rows, 1, replicas).contiguous()
    return acts, indices


def test_interval_samples_are_exactly_uniform_across_window_slides():
    # Three intervals: grid bins top and top-1, and everything lower. 1.0 (three bins above
    # 0.5) pushes 0.5's bin into the lowest interval; 2.0 later pushes both 1.0's and 0.9's
    # bins into it, so it merges three non-empty samples. Batches of 7 mix the segments.
    values = [0.5] * 12 + [1.0] * 12 + [0.9] * 10 + [0.5] * 8 + [2.0] * 10 + [1.8] * 10
    members = {0: range(42, 52), 1: range(52, 62), 2: range(42)}
    m, replicas = 3, 3000
    maxact_config = dataclasses.replace(SPEC, intervals=3, per_interval=m)
    acts, indices = _replica_stream(values, replicas)
    inclusion = np.zeros(len(values))
    for seed in (0, 1):
        sampler = IntervalExamples(replicas, maxact_config, torch.device("cpu"), seed=seed)
        for start in range(0, len(values), 7):
            sampler.update(
                Batch(acts[start : start + 7], indices[start : start + 7], start, replicas)
            )
        out = sampler.cpu()
        assert (out["count"] == [10, 10, 42]).all()
        for interval, rows in members.items():
            seqs = out["sequences"][:, out["interval"][0] == interval]  # [replicas, m]
            assert np.isin(seqs, list(rows)).all(), interval
            assert all(len(set(s)) == m for s in seqs.tolist())  # m distinct, none empty
        inclusion += np.bincount(out["sequences"].ravel(), minlength=len(values))

    runs = 2 * replicas
    for rows in members.values():
        p = m / len(rows)
        obs = inclusion[list(rows)]
        sd = math.sqrt(runs * p * (1 - p))
        assert np.abs(obs - runs * p).max() < 5 * sd, (obs, runs * p)
        # Inclusions are binomial(runs, p) per row (negatively correlated within a run), so
        # this statistic has mean below len(rows); a bias of a few percent exceeds the bound.
        chi2 = (((obs - runs * p) / sd) ** 2).sum()
        assert chi2 < len(rows) + 6 * math.sqrt(2 * len(rows)), chi2


def _brute_peaks(dense):
    """Each (row, feature)'s peak and its first position; dense [rows, seq, F] numpy."""
    return dense.max(1), dense.argmax(1)


@pytest.mark.parametrize("share", [False, True])
def test_every_interval_example_is_its_dense_recomputation(share):
    rows, seq, k, features, used = 40, 10, 3, 7, 6  # feature 6 never fires
    acts, indices = _random_topk(rows, seq, k, features, seed=3, scale=(-1.5, 0.5), used=used)
    # Growing activations make maxima rise through the pass, so windows slide repeatedly.
    acts = acts * 1.06 ** torch.arange(rows).view(rows, 1, 1)
    acts[:, 0] = 0  # special positions
    intervals, m = 4, 2
    maxact_config = dataclasses.replace(SPEC, intervals=intervals, per_interval=m)
    sampler = IntervalExamples(features, maxact_config, torch.device("cpu"), seed=5)
    for start in range(0, rows, 4):
        a, i = acts[start : start + 4], indices[start : start + 4]
        batch = Batch(a, i, start, features)
        if share:  # as if another sampler had used the batch first
            assert batch.peaks is not None and batch.dense is not None
        sampler.update(batch)
    out = sampler.cpu()

    dense = _dense(acts, indices, features).numpy()
    peaks, positions = _brute_peaks(dense)
    edges = INTERVAL_EDGES.numpy()
    grid = np.searchsorted(edges, peaks, side="right")  # bin b: [edges[b-1], edges[b])
    width = SPEC.width
    small_intervals = 0
    for f in range(features):
        fired = np.nonzero(peaks[:, f] > 0)[0]
        if f >= used:
            assert fired.size == 0 and (out["sequences"][f] == -1).all()
            assert not out["count"][f].any() and not out["upper"][f].any()
            continue
        top = grid[fired, f].max()
        slot = np.minimum(top - grid[fired, f], intervals - 1)
        assert np.array_equal(out["count"][f], np.bincount(slot, minlength=intervals))
        for interval in range(intervals):
            expect = set(fired[slot == interval].tolist())
            cols = np.nonzero(out["interval"][f] == interval)[0]
            seqs = out["sequences"][f, cols]
            kept = seqs[seqs >= 0]
            assert len(kept) == min(m, len(expect)) and set(kept) <= expect
            if len(expect) <= m:  # bins with fewer than m candidates keep them all
                assert set(kept) == expect
                small_intervals += 1
            vals = out["values"][f, cols][seqs >= 0]
            assert (np.diff(vals) <= 0).all()  # activation desc within an interval
            lower, upper = out["lower"][f, interval], out["upper"][f, interval]
            for c in cols[seqs >= 0]:
                r, pos = out["sequences"][f, c], out["positions"][f, c]
                assert out["values"][f, c] == peaks[r, f] and pos == positions[r, f]
                assert lower <= out["values"][f, c] < upper
                t = pos + np.arange(-SPEC.window_before, SPEC.window_after + 1)
                window = np.where((t >= 0) & (t < seq), dense[r, t.clip(0, seq - 1), f], 0)
                assert np.array_equal(out["windows"][f, c], window)
            assert out["windows"][f].shape == (intervals * m, width)
    assert small_intervals > 3  # the check above ran on real cases


class _SpaceTokenizer:
    """Decodes ids as space-joined 't<id>': all maxact's example_table needs."""

    def batch_decode(self, sequences, skip_special_tokens=False):
        return [" ".join(f"t{i}" for i in s) for s in sequences]


def test_maxact_example_table_formats_interval_examples():
    rows, seq, features = 12, 8, 4
    acts, indices = _random_topk(rows, seq, 2, features, seed=4)
    tokens = np.random.default_rng(0).integers(3, 50, size=(rows, seq))
    maxact_config = dataclasses.replace(SPEC, intervals=3, per_interval=2)
    sampler = IntervalExamples(features, maxact_config, torch.device("cpu"))
    for start in range(0, rows, 5):
        sampler.update(Batch(acts[start : start + 5], indices[start : start + 5], start, features))
    cpu = sampler.cpu()
    feats, ranks = np.nonzero(cpu["sequences"] >= 0)
    table = example_table(
        cpu, feats, ranks, tokens, TokenStrings(_SpaceTokenizer()), _SpaceTokenizer(), SPEC, 1
    ).to_pandas()
    dense = _dense(acts, indices, features).numpy()
    assert len(table) == len(feats) > 0
    for row, f, r in zip(table.itertuples(), feats, ranks, strict=True):
        s, pos = cpu["sequences"][f, r], cpu["positions"][f, r]
        assert (row.feature, row.sequence, row.position) == (f, s, pos)
        assert np.float32(row.activation) == dense[s, :, f].max()
        assert row.token_id == tokens[s, pos] and row.token == f"t{tokens[s, pos]}"
        lo = max(pos - SPEC.window_before, 0)
        shown = np.array(json.loads(row.token_activations), dtype=np.float32)
        assert np.array_equal(shown, dense[s, lo : pos + SPEC.window_after + 1, f])


def test_interval_samples_repeat_with_the_seed():
    acts, indices = _random_topk(rows=16, seq=6, k=3, features=5, seed=8)
    maxact_config = dataclasses.replace(SPEC, per_interval=2)

    def run(seed):
        sampler = IntervalExamples(5, maxact_config, torch.device("cpu"), seed=seed)
        for start in range(0, 16, 4):
            sampler.update(Batch(acts[start : start + 4], indices[start : start + 4], start, 5))
        return sampler.cpu()

    a, b, c = run(0), run(0), run(1)
    assert all(np.array_equal(a[name], b[name]) for name in a)
    assert not np.array_equal(a["sequences"], c["sequences"])


def test_interval_settings_are_checked():
    with pytest.raises(LoupeError, match="intervals"):
        IntervalExamples(4, dataclasses.replace(SPEC, intervals=0), torch.device("cpu"))
    with pytest.raises(LoupeError, match="per interval"):
        IntervalExamples(4, dataclasses.replace(SPEC, per_interval=0), torch.device("cpu"))
    with pytest.raises(LoupeError, match="increasing"):
        ActivationHistogram(4, torch.device("cpu"), edges=[1.0, 0.5])


# ---------------------------------------------------------------------------------------------
# Logit effects


def _lexicographic_top(full: np.ndarray, k: int):
    """Per row: k largest (ties by lower column) and k smallest (ties by lower column)."""
    cols = np.broadcast_to(np.arange(full.shape[1]), full.shape)
    pos = np.lexsort((cols, -full))[:, :k]
    neg = np.lexsort((cols, full))[:, :k]
    return pos, neg


def test_top_logits_equal_the_full_product_topk():
    g = torch.Generator().manual_seed(0)
    W_dec, W_U = torch.randn(37, 16, generator=g), torch.randn(101, 16, generator=g)
    got = top_logits(W_dec, W_U, k=4, feature_chunk=5, vocab_chunk=13)
    full = (W_dec.double() @ W_U.double().T).numpy()
    pos, neg = _lexicographic_top(full, 4)
    assert np.array_equal(got.positive_ids.numpy(), pos)
    assert np.array_equal(got.negative_ids.numpy(), neg)
    np.testing.assert_allclose(got.positive_values, np.take_along_axis(full, pos, 1), rtol=1e-5)
    np.testing.assert_allclose(got.negative_values, np.take_along_axis(full, neg, 1), rtol=1e-5)


def test_top_logits_break_ties_by_token_id_even_at_the_cut():
    g = torch.Generator().manual_seed(1)
    # Small integers: exact products, and ties everywhere, many straddling the k-th place.
    W_dec = torch.randint(-2, 3, (23, 3), generator=g).float()
    W_U = torch.randint(-1, 2, (60, 3), generator=g).float()
    got = top_logits(W_dec, W_U, k=5, feature_chunk=7, vocab_chunk=16)
    full = (W_dec @ W_U.T).numpy()
    pos, neg = _lexicographic_top(full, 5)
    assert np.array_equal(got.positive_ids.numpy(), pos)
    assert np.array_equal(got.negative_ids.numpy(), neg)
    assert np.array_equal(got.positive_values.numpy(), np.take_along_axis(full, pos, 1))


def test_top_logits_reject_mismatched_weights():
    with pytest.raises(LoupeError, match="decoder width 8 differs"):
        top_logits(torch.zeros(4, 8), torch.zeros(10, 6), k=1)
    with pytest.raises(LoupeError, match="vocabulary size 10"):
        top_logits(torch.zeros(4, 8), torch.zeros(10, 8), k=11)


def test_feature_logits_parquet_has_one_row_group_per_64_features(tmp_path):
    g = torch.Generator().manual_seed(2)
    features, k = 2 * ROW_GROUP_FEATURES + 3, 3
    W_dec, W_U = torch.randn(features, 8, generator=g), torch.randn(50, 8, generator=g)
    logits = top_logits(W_dec, W_U, k=k)
    path = tmp_path / "feature_logits.parquet"
    rows = write_feature_logits(
        path, logits, lambda ids: [f"t{i}" for i in ids], metadata={"layer": 3}
    )
    assert rows == features * 2 * k
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [
        ROW_GROUP_FEATURES * 2 * k,
        ROW_GROUP_FEATURES * 2 * k,
        3 * 2 * k,
    ]
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind
    table = pq.read_table(path)
    assert b"loupe" in table.schema.metadata
    df = table.to_pandas()
    assert list(df.columns) == ["feature", "sign", "rank", "token_id", "token", "value"]
    keys = list(zip(df["feature"], df["sign"], df["rank"], strict=True))
    assert keys == sorted(keys)
    full = (W_dec @ W_U.T).numpy()
    assert (df["token"] == "t" + df["token_id"].astype(str)).all()
    np.testing.assert_allclose(df["value"], full[df["feature"], df["token_id"]], rtol=1e-5)
    for sign, best in (("positive", full.max(1)), ("negative", full.min(1))):
        first = df[(df["sign"] == sign) & (df["rank"] == 0)]
        np.testing.assert_allclose(first["value"], best[first["feature"]], rtol=1e-5)
    # The in-memory table of a slice numbers its features from first_feature.
    part = feature_logits_table(logits, lambda ids: [str(i) for i in ids], first_feature=100)
    assert part.column("feature")[0].as_py() == 100
