"""How good the explanations are, per layer: coverage (the share of a layer's live features
with a parsed explanation), the statuses, and the mean and quartiles of delphi's detection and
fuzzing scores over the scored features; as a CSV and a plot of the scores by layer (the
summary), and as the card's table (read from the staged files)."""

from __future__ import annotations

import logging
from pathlib import Path

from .atomic import write_csv
from .config import Config
from .errors import LoupeError
from .number_format import fixed

log = logging.getLogger(__name__)

SCORERS = ("detection", "fuzzing")
COLUMNS = (
    "layer", "explainer", "live", "explained", "ok", "unparsed", "failed", "coverage",
    *(f"{s}_{stat}" for s in SCORERS for stat in ("scored", "mean", "q25", "median", "q75")),
)  # fmt: skip


def layer_scores(explanations: Path, stats: Path) -> dict:
    """One layer's row of COLUMNS from its explanations.parquet and feature_stats.parquet."""
    import polars as pl

    df = pl.read_parquet(explanations)
    live = pl.read_parquet(stats, columns=["examples"]).filter(pl.col("examples") > 0).height
    layers = df["layer"].unique().to_list() if df.height else []
    row = {
        "layer": layers[0] if len(layers) == 1 else None,
        "explainer": ", ".join(sorted(set(df["explainer"].to_list()))),
        "live": live,
        "explained": df.height,
        **{s: df.filter(pl.col("status") == s).height for s in ("ok", "unparsed", "failed")},
    }
    row["coverage"] = row["ok"] / live if live else 0.0
    for scorer in SCORERS:
        scores = df[scorer].drop_nulls()
        row[f"{scorer}_scored"] = len(scores)
        row[f"{scorer}_mean"] = scores.mean() if len(scores) else None
        for stat, q in (("q25", 0.25), ("median", 0.5), ("q75", 0.75)):
            row[f"{scorer}_{stat}"] = scores.quantile(q, "linear") if len(scores) else None
    return row


def scores_by_layer(layers: list[int], explanations: list[Path], stats: list[Path]) -> list[dict]:
    if not len(layers) == len(explanations) == len(stats):
        raise LoupeError(
            f"explanations: {len(explanations)} and stats: {len(stats)} files"
            f" for {len(layers)} layers {layers}"
        )
    rows = []
    for layer, ex, st in zip(layers, explanations, stats, strict=True):
        row = layer_scores(ex, st)
        row["layer"] = layer
        rows.append(row)
    return rows


def plot_scores(layers: list[int], explanations: list[Path], out: Path, title: str) -> None:
    """Box plots of each scorer's scores per layer (chance, 0.5, dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import polars as pl

    from .summary import save_png

    fig, axes = plt.subplots(1, len(SCORERS), figsize=(6 * len(SCORERS), 3.5), squeeze=False)
    for ax, scorer in zip(axes[0], SCORERS, strict=True):
        data = [
            pl.read_parquet(p, columns=[scorer])[scorer].drop_nulls().to_list()
            for p in explanations
        ]
        if any(data):
            ax.boxplot(data, positions=range(len(layers)), widths=0.6)
        else:
            ax.text(0.5, 0.5, "no feature scored", ha="center", va="center", transform=ax.transAxes)
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(layers)), [str(x) for x in layers])
        ax.set_ylim(0, 1)
        ax.set_xlabel("layer")
        ax.set_ylabel(f"{scorer} score (accuracy)")
        ax.set_title(scorer)
    fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, Path(out))
    plt.close(fig)


def summarize_explanations(
    config: Config, explanations: list[Path], stats: list[Path], scores_csv: Path, scores_plot: Path
) -> list[dict]:
    """The explanation_scores rule's job: explanation_scores.csv and the plot by layer."""
    layers = list(config.model.layers)
    rows = scores_by_layer(layers, explanations, stats)
    write_csv(scores_csv, rows, COLUMNS)
    plot_scores(
        layers, explanations, scores_plot, f"Explanation scores by layer ({config.explain.model})"
    )
    for row in rows:
        log.info(
            "layer %d: %d of %d live features explained (%d ok), detection %s, fuzzing %s",
            row["layer"], row["explained"], row["live"], row["ok"],
            fixed(row["detection_mean"], 3, "-"), fixed(row["fuzzing_mean"], 3, "-"),
        )  # fmt: skip
    return rows
