"""Feature flow across the stack, checked against the data: for every adjacent layer pair
(L, L+1), the median cosine of each feature's best match (where the residual stream keeps its
features and where it reorganizes) and how often the matched feature g of layer L+1 fires on a
token where f of layer L fires, against random pairs.

No new forward pass: every layer's random_windows.parquet (written by the maxact sampling pass)
holds the same seeded windows of the sample split with every token's TopK code, so two adjacent
layers' pools are two layers' codes on the same tokens. The matches are the rank-0 `next` rows
of feature_neighbours.parquet (decoder cosine, loupe.neighbours). The random baseline pairs each
f with the match of another feature (the matched targets shuffled): the same targets, with the
same densities, only the pairing broken."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .atomic import write_csv
from .config import Config
from .errors import LoupeError
from .summary import save_png

log = logging.getLogger(__name__)

FLOW_COLUMNS = (
    "layer",
    "next_layer",
    "features",  # live features of `layer` (firing on the sample split: feature_stats)
    "median_cosine",  # of their rank-0 matches in next_layer
    "tokens",  # pool tokens with a code in both layers
    "firing_features",  # live features that fire in the pool
    "coactivation",  # P(match fires | feature fires), pooled over the pool's firings
    "random_coactivation",  # the same for shuffled pairs
    "lift",  # coactivation / random_coactivation
)
BASELINE_SEED = 0


def read_pool(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(windows [size, 2] = (sequence, start), features [tokens, k], activations [tokens, k])
    of a random_windows.parquet; tokens = size x width, window after window."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["sequence", "start", "features", "activations"])
    except FileNotFoundError:
        raise LoupeError(f"random windows not found: {path}") from None
    windows = np.stack([table["sequence"].to_numpy(), table["start"].to_numpy()], axis=1)

    def codes(name: str) -> np.ndarray:
        column = table[name].combine_chunks()
        k = column.type.value_type.list_size
        return column.flatten().flatten().to_numpy().reshape(-1, k)

    return windows, codes("features"), codes("activations")


def best_matches(path: Path, relation: str = "next") -> tuple[int | None, np.ndarray, np.ndarray]:
    """(other layer, other features [F], cosines [F]) of each feature's rank-0 `relation` row in
    a feature_neighbours.parquet; (None, empty, empty) when the file has no such rows."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(
            path, columns=["feature", "relation", "rank", "other_layer", "other_feature", "cosine"]
        )
    except FileNotFoundError:
        raise LoupeError(f"feature neighbours not found: {path}") from None
    rows = table.filter(pc.and_(pc.equal(table["relation"], relation), pc.equal(table["rank"], 0)))
    if not len(rows):
        return None, np.zeros(0, np.int64), np.zeros(0, np.float32)
    feature = rows["feature"].to_numpy()
    if not np.array_equal(feature, np.arange(len(feature))):
        raise LoupeError(f"{path}: not one rank-0 {relation} row per feature, in order")
    (other_layer,) = set(rows["other_layer"].to_numpy().tolist())
    return int(other_layer), rows["other_feature"].to_numpy(), rows["cosine"].to_numpy()


def coactivation_counts(
    features_a: np.ndarray,
    acts_a: np.ndarray,
    features_b: np.ndarray,
    acts_b: np.ndarray,
    match: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Per feature f of layer a: (tokens where f fires, tokens where f and match[f] of layer b
    both fire, tokens counted), over the tokens with a code in both layers ([tokens, k] TopK
    indices and activations each; an activation of 0 does not fire). A sorted-key membership
    test over the sparse codes: O(tokens x k log), never a [tokens, features] matrix."""
    if features_a.shape[0] != features_b.shape[0]:
        raise LoupeError(f"the pools hold {features_a.shape[0]} and {features_b.shape[0]} tokens")
    counted = (acts_a > 0).any(axis=1) & (acts_b > 0).any(axis=1)
    width_b = int(max(features_b.max(initial=0), match.max(initial=0))) + 1
    tokens = np.arange(len(counted), dtype=np.int64)[:, None]
    fires_b = (acts_b > 0) & counted[:, None]
    keys_b = np.sort(
        np.broadcast_to(tokens, fires_b.shape)[fires_b] * width_b + features_b[fires_b]
    )
    fires_a = (acts_a > 0) & counted[:, None]
    f = features_a[fires_a].astype(np.int64)
    query = np.broadcast_to(tokens, fires_a.shape)[fires_a] * width_b + match[f]
    at = np.minimum(np.searchsorted(keys_b, query), max(len(keys_b) - 1, 0))
    hit = keys_b[at] == query if len(keys_b) else np.zeros(len(query), bool)
    num = len(match)
    return np.bincount(f, minlength=num), np.bincount(f[hit], minlength=num), int(counted.sum())


def pair_row(
    layer: int,
    neighbours: Path,
    pool: Path,
    next_pool: Path,
    density: np.ndarray,
) -> dict | None:
    """The FLOW_COLUMNS row of (layer, layer + 1); None when the layer has no `next` matches."""
    next_layer, match, cosine = best_matches(neighbours, "next")
    if next_layer is None:
        return None
    if len(match) != len(density):
        raise LoupeError(
            f"layer {layer}: {len(match)} matched features but {len(density)} stats rows"
        )
    windows_a, features_a, acts_a = read_pool(pool)
    windows_b, features_b, acts_b = read_pool(next_pool)
    if not np.array_equal(windows_a, windows_b) or features_a.shape != features_b.shape:
        raise LoupeError(
            f"{pool} and {next_pool} hold different windows: not one sample split (rerun maxact)"
        )
    fires, both, tokens = coactivation_counts(features_a, acts_a, features_b, acts_b, match)
    shuffled = match[np.random.default_rng(BASELINE_SEED).permutation(len(match))]
    _, random_both, _ = coactivation_counts(features_a, acts_a, features_b, acts_b, shuffled)
    live = density > 0
    rate = both.sum() / fires.sum() if fires.sum() else float("nan")
    random_rate = random_both.sum() / fires.sum() if fires.sum() else float("nan")
    return {
        "layer": layer,
        "next_layer": next_layer,
        "features": int(live.sum()),
        "median_cosine": float(np.median(cosine[live])) if live.any() else float("nan"),
        "tokens": tokens,
        "firing_features": int((fires > 0).sum()),
        "coactivation": float(rate),
        "random_coactivation": float(random_rate),
        "lift": float(rate / random_rate) if random_rate > 0 else float("nan"),
    }


def plot_flow(rows: list[dict], out: Path, title: str) -> None:
    """Median best-match cosine by layer pair, and matched vs random co-activation."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    x = [r["layer"] + 0.5 for r in rows]  # between the two layers of the pair
    labels = [f"{r['layer']}→{r['next_layer']}" for r in rows]
    left.plot(x, [r["median_cosine"] for r in rows], marker="o", color="tab:blue")
    left.set_ylim(0, 1)
    left.set_ylabel("median best-match decoder cosine")
    left.set_title("features kept from layer to layer")
    right.plot(x, [r["coactivation"] for r in rows], marker="o", label="matched pairs")
    right.plot(x, [r["random_coactivation"] for r in rows], marker="s", label="shuffled pairs")
    right.set_yscale("log")
    right.set_ylabel("P(match fires | feature fires)")
    right.set_title("co-activation on the sample split's random windows")
    right.legend()
    step = max(1, len(rows) // 12)
    for ax in (left, right):
        ax.set_xticks(x[::step], labels[::step])
        ax.set_xlabel("layer pair")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    save_png(fig, out)


def summarize_flow(
    config: Config,
    neighbours: list[Path],
    random_windows: list[Path],
    stats: list[Path],
    table: Path,
    plot: Path,
) -> list[dict]:
    """The flow rule's job: per-layer inputs in model.layers order; one row per adjacent pair."""
    from .summary import read_density

    layers = list(config.model.layers)
    if not len(layers) == len(neighbours) == len(random_windows) == len(stats):
        raise LoupeError(
            f"flow: {len(layers)} layers but {len(neighbours)} neighbours files,"
            f" {len(random_windows)} random windows files and {len(stats)} feature stats"
        )
    pools = dict(zip(layers, random_windows, strict=True))
    rows = []
    for layer, path, stat in zip(layers, neighbours, stats, strict=True):
        if layer + 1 not in pools:
            continue
        row = pair_row(
            layer, Path(path), Path(pools[layer]), Path(pools[layer + 1]), read_density(stat)
        )
        if row is not None:
            rows.append(row)
            log.info(
                "layer %d -> %d: median best-match cosine %.3f; co-activation %.4f vs %.4f"
                " for shuffled pairs (%.1fx) on %d tokens",
                *(row[c] for c in ("layer", "next_layer", "median_cosine", "coactivation")),
                row["random_coactivation"],
                row["lift"],
                row["tokens"],
            )
    write_csv(Path(table), rows, FLOW_COLUMNS)
    plot_flow(rows, Path(plot), f"{config.model.name}: feature flow between adjacent layers")
    return rows
