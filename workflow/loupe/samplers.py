"""What the sampling pass keeps per feature, updated batch by batch on the compute device:
its top-N examples, examples spread over its activation range, its firing statistics and an
activation histogram. Pure tensor code (tensors in, tensors out, any device); everything kept
is sized by the features, never by the sample. loupe.maxact runs the pass."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import LoupeError

if TYPE_CHECKING:
    from .config import MaxactConfig

# ---------------------------------------------------------------------------------------------
# Peaks, windows and the top examples


def sequence_peaks(
    acts: torch.Tensor, indices: torch.Tensor, num_latents: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (row, feature)'s highest activation and the first position that reaches it.

    acts, indices: [rows, seq, k] TopK output, with positions that must not peak zeroed.
    Returns peaks [rows, F] (0 where the feature never fires) and positions [rows, F]
    (int64; `seq` where it never fires)."""
    rows, seq, k = acts.shape
    row = torch.arange(rows, device=acts.device).view(rows, 1, 1)
    key = (row * num_latents + indices).reshape(-1)
    flat = acts.reshape(-1)
    peaks = flat.new_zeros(rows * num_latents).scatter_reduce_(0, key, flat, "amax")
    at_peak = (flat > 0) & (flat == peaks[key])
    pos = torch.arange(seq, device=acts.device).view(1, seq, 1).expand(rows, seq, k).reshape(-1)
    positions = torch.full((rows * num_latents,), seq, dtype=torch.int64, device=acts.device)
    positions.scatter_reduce_(0, key[at_peak], pos[at_peak], "amin")
    return peaks.view(rows, num_latents), positions.view(rows, num_latents)


def window_activations(
    dense: torch.Tensor,
    rows: torch.Tensor,
    features: torch.Tensor,
    positions: torch.Tensor,
    before: int,
    after: int,
) -> torch.Tensor:
    """Feature features[i]'s activation at positions[i]-before .. positions[i]+after of row
    rows[i]: [M, before+1+after], 0 outside the row.

    dense: [batch, seq, F] TopK activations (0 where a feature is not among a token's top-k);
    rows, features, positions: [M] int64."""
    seq = dense.shape[1]
    t = positions[:, None] + torch.arange(-before, after + 1, device=dense.device)
    inside = (t >= 0) & (t < seq)
    return dense[rows[:, None], t.clamp(0, seq - 1), features[:, None]] * inside


def densify(acts: torch.Tensor, indices: torch.Tensor, num_latents: int) -> torch.Tensor:
    """[batch, seq, k] TopK output as [batch, seq, F], zeros elsewhere."""
    batch, seq, k = acts.shape
    dense = acts.new_zeros(batch * seq, num_latents)
    dense.scatter_(1, indices.reshape(-1, k), acts.reshape(-1, k))
    return dense.view(batch, seq, num_latents)


@dataclass
class Batch:
    """One batch as the samplers see it: acts, indices [batch, seq, k] (TopK output, fp32,
    positions that must not peak zeroed) and the split row it starts at. Its per-(row,
    feature) peaks and its dense activations are computed once, on first use, for every
    sampler that needs them."""

    acts: torch.Tensor
    indices: torch.Tensor
    first_row: int
    num_latents: int

    @functools.cached_property
    def peaks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """sequence_peaks: peaks [rows, F] and their positions [rows, F]."""
        return sequence_peaks(self.acts, self.indices, self.num_latents)

    @functools.cached_property
    def dense(self) -> torch.Tensor:
        """densify: [batch, seq, F], transient (the size of the encoder's pre-activations)."""
        return densify(self.acts, self.indices, self.num_latents)


class TopExamples:
    """Running top-N examples per feature, on the compute device.

    Each feature's row of the [F, N] buffers stays sorted by (activation desc, sequence asc),
    so column N-1 is the bar a new candidate must beat; empty slots hold activation 0 and
    sequence -1. Windows [F, N, W] hold the feature's activations around each kept peak."""

    def __init__(self, num_latents: int, maxact_config: MaxactConfig, device: torch.device):
        self.maxact_config = maxact_config
        n, w = maxact_config.top_n, maxact_config.width
        self.values = torch.zeros(num_latents, n, device=device)
        self.sequences = torch.full((num_latents, n), -1, dtype=torch.int64, device=device)
        self.positions = torch.zeros(num_latents, n, dtype=torch.int64, device=device)
        self.windows = torch.zeros(num_latents, n, w, device=device)

    @property
    def num_latents(self) -> int:
        return self.values.shape[0]

    def update(self, batch: Batch) -> int:
        """Merge one batch; returns the examples admitted.

        The merge: per feature, the N kept examples and this batch's candidates (one per
        sequence, its peak; rejected ones set to -1) are sorted together, stably, and the first
        N kept. A kept slot then comes either from the old buffer (order < N: copy its
        sequence, position and window) or from the batch (order >= N: the batch row
        order - N, whose window is read from the dense activations)."""
        maxact_config = self.maxact_config
        n = maxact_config.top_n
        acts, first_row = batch.acts, batch.first_row
        peaks, peak_pos = batch.peaks
        admit = peaks > self.values[:, -1]  # [batch, F]; empty slots are 0, so fires only
        feats = admit.any(0).nonzero().squeeze(1)
        if feats.numel() == 0:
            return 0
        # Rejected candidates get -1: below every kept value and every empty slot.
        cand = torch.where(admit[:, feats], peaks[:, feats], -1.0).T  # [Fs, batch]
        merged = torch.cat([self.values[feats], cand], dim=1)
        # Stable: on equal activations the earlier sequence (buffer, then batch order) wins.
        order = merged.sort(dim=1, descending=True, stable=True).indices[:, :n]
        new = order >= n
        batch_row = (order - n).clamp(min=0)
        old_slot = order.clamp(max=n - 1)
        seq_ids = torch.arange(first_row, first_row + len(acts), device=acts.device)

        values = merged.gather(1, order)
        sequences = torch.where(new, seq_ids[batch_row], self.sequences[feats].gather(1, old_slot))
        positions = torch.where(
            new,
            peak_pos[:, feats].T.gather(1, batch_row),
            self.positions[feats].gather(1, old_slot),
        )
        windows = self.windows[feats].gather(
            1, old_slot[..., None].expand(-1, -1, maxact_config.width)
        )
        fi, slot = new.nonzero(as_tuple=True)
        if fi.numel():
            # Transient [batch, seq, F] (the size of the encoder's own pre-activations): each
            # window value is then one lookup instead of a search through k indices.
            windows[fi, slot] = window_activations(
                batch.dense,
                batch_row[fi, slot],
                feats[fi],
                positions[fi, slot],
                maxact_config.window_before,
                maxact_config.window_after,
            )
        self.values[feats] = values
        self.sequences[feats] = sequences
        self.positions[feats] = positions
        self.windows[feats] = windows
        return int(fi.numel())

    def cpu(self) -> dict[str, np.ndarray]:
        """CPU copies: values, sequences (-1 when empty), positions [F, N], windows [F, N, W]."""
        return {
            name: getattr(self, name).cpu().numpy()
            for name in ("values", "sequences", "positions", "windows")
        }


class FiringStats:
    """Per-feature fire count, activation sum and maximum over counted tokens, on device."""

    def __init__(self, num_latents: int, device: torch.device):
        self.count = torch.zeros(num_latents, dtype=torch.int64, device=device)
        # float64: ten million small additions per feature would drift in float32.
        self.total = torch.zeros(num_latents, dtype=torch.float64, device=device)
        self.peak = torch.zeros(num_latents, device=device)
        self.tokens = 0

    def update(self, acts: torch.Tensor, indices: torch.Tensor, tokens: int) -> None:
        """acts, indices: [..., k], uncounted positions zeroed; tokens: positions counted."""
        fired = acts > 0
        idx, vals = indices[fired], acts[fired]
        self.count += torch.bincount(idx, minlength=self.count.numel())
        self.total.index_add_(0, idx, vals.double())
        self.peak.scatter_reduce_(0, idx, vals, "amax")
        self.tokens += tokens


# ---------------------------------------------------------------------------------------------
# Activation histogram

# 20 log-spaced bins per decade over [1e-4, 1e4), plus an underflow and an overflow column.
# sparsify's TopK SAEs see the raw residual stream (no input normalisation), so activations
# scale with its norm, which grows with depth (Gemma's embeddings alone are scaled by
# sqrt(d_model)): a fixed linear range would suit one layer and flatten the next. Eight
# decades hold everything from near-threshold activations of early layers to the largest of
# late ones; the two open-ended columns keep every firing counted even outside that range
# (each row sums to the feature's fire count). 12%-wide bins give 20-40 bins across a typical
# feature's one to two decades of activations; at 49,152 features the counts take 64 MB.
HISTOGRAM_EDGES = torch.logspace(-4, 4, 8 * 20 + 1, dtype=torch.float64).float()


def _check_edges(edges, what: str) -> torch.Tensor:
    edges = torch.as_tensor(edges, dtype=torch.float32).flatten()
    if edges.numel() < 1 or not bool((edges > 0).all()) or not bool((edges.diff() > 0).all()):
        raise LoupeError(f"{what} edges must be positive and strictly increasing")
    return edges


class ActivationHistogram:
    """Per-feature counts of activations over fixed bins, on device: counts [F, E+1] int64
    for edges [E]; column 0 counts (0, edges[0]), column i [edges[i-1], edges[i]), column E
    [edges[E-1], inf). Every nonzero (token, feature) activation counts once; dead features
    keep all-zero rows."""

    def __init__(self, num_latents: int, device: torch.device, edges=HISTOGRAM_EDGES):
        self.edges = _check_edges(edges, "histogram").to(device)
        self.counts = torch.zeros(
            num_latents, self.edges.numel() + 1, dtype=torch.int64, device=device
        )

    def update(self, acts: torch.Tensor, indices: torch.Tensor) -> None:
        """acts, indices: [..., k] TopK output, uncounted positions zeroed."""
        fired = acts > 0
        idx, vals = indices[fired].long(), acts[fired].float()
        column = torch.bucketize(vals, self.edges, right=True)
        # One flat scatter into the persistent counts: no [F, bins] temporary per batch.
        self.counts.view(-1).index_add_(
            0, idx * self.counts.shape[1] + column, torch.ones_like(column)
        )

    def cpu(self) -> dict[str, np.ndarray]:
        """counts [F, E+1] int64 and edges [E] float32."""
        return {"counts": self.counts.cpu().numpy(), "edges": self.edges.cpu().numpy()}


# ---------------------------------------------------------------------------------------------
# Examples across each feature's activation range

# The fixed grid the interval bins are cut from: three bins per octave (each 26% wide) from
# 2^-20 to 2^20, with open-ended bins below and above.
INTERVAL_EDGES = torch.exp2(torch.arange(-60, 61, dtype=torch.float64) / 3).float()
# SAEDashboard's defaults: 10 intervals of 5 examples. Nine grid bins (the one holding the
# feature's maximum and the eight below it, a factor 8-10 in all) plus one interval for
# everything lower: like SAEDashboard's ten linear intervals of [0, max], whose upper nine also
# reach down to max/10, but at constant relative resolution (maxact.intervals and
# maxact.per_interval, whose defaults are the schema's).

# What an empty slot holds, per state tensor.
_EMPTY = {"keys": float("inf"), "values": 0.0, "sequences": -1, "positions": 0, "windows": 0.0}


class IntervalExamples:
    """Examples spread over each feature's activation range, drawn uniformly at random within
    each interval in the same single pass as TopExamples, on the compute device.

    The unit is TopExamples': one candidate per (sequence, feature), the feature's peak in
    that sequence. The intervals must exist before the pass, yet a feature's maximum is known
    only at its end; so each candidate falls in a bin of a fixed log grid (`edges`, shared by
    all features), and each feature keeps a window of the `intervals - 1` grid bins at and
    below its running maximum plus one interval for everything lower. When a feature's
    maximum rises into a higher bin the window slides up and the bins that leave it merge into
    the lowest interval.

    Sampling: every candidate draws a uniform random key and each interval keeps the
    `per_interval` smallest keys of the candidates it has seen: an exactly uniform sample
    without replacement (the same distribution as Algorithm R), whose decisions do not depend
    on the order of candidates within a batch (so a batch is one sort, as in TopExamples) and
    which merges exactly (the smallest keys of a union are the smallest of the parts' smallest
    keys), which is what lets the window slide. Keys come from a seeded torch.Generator on the
    device: the same seed and stream give the same sample on the same kind of device.

    Trade-off: interval edges are grid edges, not fractions of the maximum (SAEDashboard's
    linear intervals of [0, max] need the maximum first, so a second pass). The top interval is
    the grid bin holding the maximum, so it can be thin when the maximum sits just above a
    grid edge; with the default grid the window reaches a factor 2^((intervals-1)/3) below
    that bin's upper edge.

    State, per feature and interval slot [F, I, m] (I intervals, m per interval): keys
    (float64, inf when empty, ascending), values, sequences (-1 when empty), positions and
    windows [F, I, m, W]; counts [F, I] (candidates seen per interval); top [F] (the grid bin
    of the running maximum, -1 before the first firing). Slot 0 is the bin holding the
    maximum, slot j the bin j below it, slot I-1 everything lower. At F=49,152, 10 intervals,
    5 examples, W=41: windows 403 MB in fp32 (202 MB in fp16), the rest 73 MB."""

    def __init__(
        self,
        num_latents: int,
        maxact_config: MaxactConfig,
        device: torch.device,
        seed: int = 0,
        edges=INTERVAL_EDGES,
    ):
        intervals, per_interval = maxact_config.intervals, maxact_config.per_interval
        if intervals < 1:
            raise LoupeError(f"intervals must be at least 1, got {intervals}")
        if per_interval < 1:
            raise LoupeError(f"examples per interval must be at least 1, got {per_interval}")
        self.maxact_config = maxact_config
        self.edges = _check_edges(edges, "interval").to(device)
        shape = (num_latents, intervals, per_interval)
        self.top = torch.full((num_latents,), -1, dtype=torch.int64, device=device)
        self.keys = torch.full(shape, _EMPTY["keys"], dtype=torch.float64, device=device)
        self.values = torch.zeros(shape, device=device)
        self.sequences = torch.full(shape, -1, dtype=torch.int64, device=device)
        self.positions = torch.zeros(shape, dtype=torch.int64, device=device)
        # fp32 like TopExamples': a window's peak equals the example's activation exactly;
        # fp16 would save 200 MB of GPU memory at the cost of publishing rounded values.
        self.windows = torch.zeros(*shape, maxact_config.width, device=device)
        self.counts = torch.zeros(num_latents, intervals, dtype=torch.int64, device=device)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    @property
    def num_latents(self) -> int:
        return self.values.shape[0]

    @property
    def intervals(self) -> int:
        return self.values.shape[1]

    @property
    def per_interval(self) -> int:
        return self.values.shape[2]

    def _state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _EMPTY}

    def update(self, batch: Batch) -> int:
        """Offer one batch; returns the examples admitted (windows are read from
        batch.dense only if something is)."""
        num, slots, m = self.num_latents, self.intervals, self.per_interval
        rows, first_row, device = len(batch.acts), batch.first_row, batch.acts.device
        peak, peak_pos = batch.peaks
        # A key for every (row, feature), fired or not: a candidate's key does not depend on
        # which other features happen to fire.
        keys = torch.rand(rows, num, generator=self.generator, dtype=torch.float64, device=device)
        row, feat = (peak > 0).nonzero(as_tuple=True)
        if row.numel() == 0:
            return 0
        grid_bin = torch.bucketize(peak[row, feat], self.edges, right=True)
        top = self.top.scatter_reduce(0, feat, grid_bin, "amax")
        moved = ((top > self.top) & (self.top >= 0)).nonzero().squeeze(1)
        if moved.numel():
            self._slide(moved, (top - self.top)[moved])
        self.top = top

        slot = (top[feat] - grid_bin).clamp(max=slots - 1)
        group = feat * slots + slot  # a (feature, interval) pair, as a row of the flat state
        self.counts.view(-1).index_add_(0, group, torch.ones_like(group))
        key = keys[row, feat]
        flat = {name: t.view(num * slots, m, *t.shape[3:]) for name, t in self._state().items()}
        # Keys are kept ascending, so the last is the bar a newcomer must pass.
        admit = key < flat["keys"][group, -1]
        if not bool(admit.any()):
            return 0
        row, group, key = row[admit], group[admit], key[admit]
        groups, inverse = torch.unique(group, return_inverse=True)
        cand = torch.full((groups.numel(), rows), float("inf"), dtype=torch.float64, device=device)
        cand[inverse, row] = key  # (group, row) is unique: one peak per (row, feature)
        merged = torch.cat([flat["keys"][groups], cand], dim=1)
        # Stable: empty slots (inf) stay ahead of rows not offered (inf), so no empty slot is
        # filled with a row that was not a candidate.
        order = merged.sort(dim=1, stable=True).indices[:, :m]
        new = order >= m
        batch_row = (order - m).clamp(min=0)
        old_slot = order.clamp(max=m - 1)
        gfeat = (groups // slots)[:, None].expand(-1, m)

        def kept(name: str) -> torch.Tensor:
            t = flat[name][groups]
            return t.gather(1, old_slot.view(*old_slot.shape, *[1] * (t.dim() - 2)).expand_as(t))

        positions = torch.where(new, peak_pos[batch_row, gfeat], kept("positions"))
        updated = {
            "keys": merged.gather(1, order),
            "values": torch.where(new, peak[batch_row, gfeat], kept("values")),
            "sequences": torch.where(new, first_row + batch_row, kept("sequences")),
            "positions": positions,
            "windows": kept("windows"),
        }
        gi, si = new.nonzero(as_tuple=True)
        dense = batch.dense
        updated["windows"][gi, si] = window_activations(
            dense,
            batch_row[gi, si],
            gfeat[gi, si],
            positions[gi, si],
            self.maxact_config.window_before,
            self.maxact_config.window_after,
        )
        for name, value in updated.items():
            flat[name][groups] = value
        return int(gi.numel())

    def _slide(self, feats: torch.Tensor, shift: torch.Tensor) -> None:
        """Raise the window of features feats [S] by shift [S] (>= 1) grid bins: window slot j
        takes old slot j - shift; the old slots pushed to I-1 or below merge into the lowest
        interval, which keeps the smallest keys of the union (an exact uniform sample of it)."""
        slots, m = self.intervals, self.per_interval
        n = feats.numel()
        j = torch.arange(slots, device=feats.device)
        source = j - shift[:, None]  # [S, I]: the old slot each new window slot takes
        inherits = (source >= 0) & (j < slots - 1)
        source = torch.where(inherits, source, slots)  # slot I: an appended empty one
        merges = j + shift[:, None] >= slots - 1  # [S, I]: old slots that reach the lowest

        old = {name: t[feats] for name, t in self._state().items()}
        pool = torch.where(merges[..., None], old["keys"], float("inf")).view(n, slots * m)
        pick = pool.sort(dim=1, stable=True).indices[:, :m]  # [S, m], into the I*m pool
        filled = pool.gather(1, pick).isfinite()
        for name, t in old.items():
            trail = t.shape[3:]
            ones = [1] * len(trail)
            padded = torch.cat([t, torch.full_like(t[:, :1], _EMPTY[name])], dim=1)
            index = source.view(n, slots, 1, *ones).expand(-1, -1, *t.shape[2:])
            shifted = padded.gather(1, index)
            pooled = t.reshape(n, slots * m, *trail)
            lowest = pooled.gather(1, pick.view(n, m, *ones).expand(-1, -1, *trail))
            empty = torch.full_like(lowest, _EMPTY[name])
            shifted[:, -1] = torch.where(filled.view(n, m, *ones), lowest, empty)
            getattr(self, name)[feats] = shifted
        counts = self.counts[feats]
        shifted = torch.cat([counts, torch.zeros_like(counts[:, :1])], dim=1).gather(1, source)
        shifted[:, -1] = (counts * merges).sum(1)
        self.counts[feats] = shifted

    def interval_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each interval's activation range [lower, upper): two [F, I] float32 tensors, both 0
        where an interval cannot hold anything (dead features, bins below the grid)."""
        ext = torch.cat([self.edges.new_zeros(1), self.edges, self.edges.new_full((1,), torch.inf)])
        # Grid bin b covers [ext[b], ext[b+1]); slot j holds bin top - j, and the lowest slot
        # every bin up to top - (I-1).
        grid_bin = self.top[:, None] - torch.arange(self.intervals, device=self.top.device)
        lower = ext[grid_bin.clamp(min=0)]
        lower[:, -1] = 0.0
        upper = ext[(grid_bin + 1).clamp(min=0)]
        exists = grid_bin >= 0
        return torch.where(exists, lower, 0.0), torch.where(exists, upper, 0.0)

    def cpu(self) -> dict[str, np.ndarray]:
        """CPU copies in TopExamples' layout: values, sequences (-1 when empty), positions
        [F, S] and windows [F, S, W] with S = I x m, plus interval [F, S] (the slot's interval:
        0 holds the maximum, I-1 everything lower); within an interval, by activation desc
        then sequence asc, empty slots last. Per interval: lower, upper [F, I] (its activation
        range [lower, upper)) and count [F, I] (sequences whose peak fell in it)."""
        num, slots, m = self.num_latents, self.intervals, self.per_interval
        arrays = {
            name: getattr(self, name).cpu().numpy()
            for name in ("values", "sequences", "positions", "windows")
        }
        empty = arrays["sequences"] < 0
        desc = np.where(empty, np.inf, -arrays["values"].astype(np.float64))
        order = np.lexsort((arrays["sequences"], desc))  # [F, I, m], along the last axis
        out = {}
        for name, a in arrays.items():
            index = order.reshape(*order.shape, *[1] * (a.ndim - 3))
            out[name] = np.take_along_axis(a, index, axis=2).reshape(num, slots * m, *a.shape[3:])
        out["interval"] = np.tile(np.repeat(np.arange(slots, dtype=np.int64), m), (num, 1))
        lower, upper = self.interval_bounds()
        out["lower"], out["upper"] = lower.cpu().numpy(), upper.cpu().numpy()
        out["count"] = self.counts.cpu().numpy()
        return out


# ---------------------------------------------------------------------------------------------
# Random windows: contexts whose every activation is known

# The pool's seed: the same windows for every layer and every run of a split.
RANDOM_WINDOWS_SEED = 0


class RandomWindows:
    """A seeded pool of random windows of the split, each with every token's sparse code (the
    TopK indices and activations, uncounted positions zeroed): a scorer's non-activating
    contexts for feature f are the windows where f is in no token's code, known exactly, not
    guessed from a feature's missing examples.

    The windows (distinct (row, start) pairs, `width` tokens each, inside one row) are drawn
    before the pass from a numpy generator seeded with RANDOM_WINDOWS_SEED, so they depend only
    on the split's shape, never on the model; each batch copies the codes of the windows in its
    rows. State: acts [size, width, k] float32 and indices int32, on the device: 1,000 windows
    of 41 tokens at k = 100 hold 33 MB, whatever the sample size."""

    def __init__(
        self, rows: int, seq: int, size: int, width: int, k: int, device: torch.device
    ) -> None:
        width = min(width, seq)
        starts = seq - width + 1
        size = min(size, rows * starts)
        rng = np.random.default_rng(RANDOM_WINDOWS_SEED)
        chosen = np.sort(rng.choice(rows * starts, size=size, replace=False))
        self.rows, self.starts = chosen // starts, chosen % starts  # [size] int64, row order
        self.width = width
        self.acts = torch.zeros(size, width, k, device=device)
        self.indices = torch.zeros(size, width, k, dtype=torch.int32, device=device)

    def update(self, batch: Batch) -> int:
        """Copy the codes of the windows whose row is in this batch; returns how many."""
        first, device = batch.first_row, batch.acts.device
        lo, hi = np.searchsorted(self.rows, [first, first + len(batch.acts)])
        if lo == hi:
            return 0
        row = torch.as_tensor(self.rows[lo:hi] - first, device=device)[:, None]
        t = torch.as_tensor(self.starts[lo:hi], device=device)[:, None] + torch.arange(
            self.width, device=device
        )
        self.acts[lo:hi] = batch.acts[row, t]
        self.indices[lo:hi] = batch.indices[row, t].to(torch.int32)
        return int(hi - lo)

    def cpu(self) -> dict[str, np.ndarray]:
        """rows, starts [size] int64; acts [size, width, k] float32, indices int32."""
        return {
            "rows": self.rows,
            "starts": self.starts,
            "acts": self.acts.cpu().numpy(),
            "indices": self.indices.cpu().numpy(),
        }
