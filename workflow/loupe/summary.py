"""The suite at a glance: one CSV row per layer from the eval.json files, and PNG plots of the
per-layer metrics, the feature-density histograms and the training curves.

Figures are built with matplotlib's object API (`Figure`, no pyplot): no interactive backend,
no global state, and the Agg canvas renders PNGs on a machine without a display."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_path, write_csv
from .config import Config
from .errors import LoupeError
from .metrics import (
    CSV_COLUMNS,
    EVAL_COLUMNS,
    LADDER_COLUMNS,
    PREFIX_COLUMNS,
    TRANSFER_COLUMNS,
    extra_columns,
    ladder_column,
    transfer_column,
)

log = logging.getLogger(__name__)


@dataclass
class LayerRecord:
    """Everything the summary knows about one layer."""

    layer: int
    eval: dict
    density: np.ndarray  # [num_latents] firing frequency on the sample split
    curve: list[dict]  # train_metrics.jsonl lines
    prefix: dict | None = None  # spliced.json's prefix ending at this layer

    def row(self) -> dict:
        last = self.curve[-1] if self.curve else {}
        return {
            **{c.name: self.eval.get(c.name) for c in EVAL_COLUMNS},
            "train_tokens": last.get("tokens"),
            "train_fvu": last.get("fvu"),
            **self.evaluation_additions(),
        }

    def evaluation_additions(self) -> dict:
        """The ladder's, the transfer models' and the prefix splice's columns
        (loupe.metrics.extra_columns) this layer has values for."""
        values = {}
        for rung in self.eval.get("ladder", []):
            values |= {ladder_column(c.name, rung["k"]): rung.get(c.name) for c in LADDER_COLUMNS}
        for t in self.eval.get("transfer", []):
            values |= {transfer_column(c.name, t["model"]): t.get(c.name) for c in TRANSFER_COLUMNS}
        if self.prefix is not None:
            values |= {
                c.name: self.prefix.get(c.name.removesuffix("_prefix")) for c in PREFIX_COLUMNS
            }
        return values


def read_json(path: Path) -> dict:
    """A summary input (eval.json, spliced.json): a missing or broken file is one line."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LoupeError(f"not found: {path}") from None
    except json.JSONDecodeError as e:
        raise LoupeError(f"{path} is not valid JSON: {e}") from None


def read_curve(path: Path) -> list[dict]:
    """train_metrics.jsonl: one JSON object per line."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise LoupeError(f"training metrics not found: {path}") from None
    try:
        return [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError as e:
        raise LoupeError(f"{path}: a line is not valid JSON: {e}") from None


def read_density(path: Path) -> np.ndarray:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=["density"])["density"].to_numpy()
    except FileNotFoundError:
        raise LoupeError(f"feature stats not found: {path}") from None
    except Exception as e:
        raise LoupeError(f"cannot read feature stats {path}: {type(e).__name__}: {e}") from e


def load_records(
    layers: list[int], evals: list[Path], stats: list[Path], curves: list[Path]
) -> list[LayerRecord]:
    """One record per layer; the path lists are in the order of `layers`."""
    if not len(layers) == len(evals) == len(stats) == len(curves):
        raise LoupeError(
            f"summary: {len(layers)} layers but {len(evals)} eval files, {len(stats)} feature"
            f" stats and {len(curves)} training logs"
        )
    records = []
    for layer, e, s, c in zip(layers, evals, stats, curves, strict=True):
        ev = read_json(e)
        if ev.get("layer") != layer:
            raise LoupeError(f"{e} holds layer {ev.get('layer')}, expected layer {layer}")
        records.append(LayerRecord(layer, ev, read_density(s), read_curve(c)))
    return sorted(records, key=lambda r: r.layer)


def metrics_csv_columns(records: list[LayerRecord]) -> tuple[str, ...]:
    """CSV_COLUMNS, then the evaluation additions' columns: every k of any layer's ladder (in
    increasing order), every transfer model (in the order evaluate lists them), the prefix
    splice where spliced.json was given. A layer without a value leaves its cell empty."""
    ks = sorted({rung["k"] for r in records for rung in r.eval.get("ladder", [])})
    models = list(dict.fromkeys(t["model"] for r in records for t in r.eval.get("transfer", [])))
    spliced = any(r.prefix is not None for r in records)
    return CSV_COLUMNS + extra_columns(ks, models, spliced)


def attach_spliced(records: list[LayerRecord], spliced: Path) -> None:
    """Give each record the prefix of spliced.json that ends at its layer."""
    prefixes = {p["last_layer"]: p for p in read_json(spliced).get("prefixes", [])}
    missing = [r.layer for r in records if r.layer not in prefixes]
    if missing:
        raise LoupeError(f"{spliced} has no prefix ending at layer(s) {missing}: rerun the splice")
    for r in records:
        r.prefix = prefixes[r.layer]


# --- plots ---------------------------------------------------------------------------------


def save_png(fig, out: Path) -> None:
    """Every summary plot's one PNG writer (atomic: a killed job leaves no half image)."""
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _grid(n: int, ncols: int = 6, cell=(3.0, 2.4), share: bool = False):
    """A figure with n axes in a grid (unused cells hidden): (fig, axes list)."""
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(cell[0] * ncols, cell[1] * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=share, sharey=share).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def plot_by_layer(
    records: list[LayerRecord],
    key: str,
    out: Path,
    ylabel: str,
    title: str,
    zero_line: bool = False,
    unit_range: bool = False,
) -> None:
    """One metric against layer index, one point per layer."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    layers = [r.layer for r in records]
    values = [np.nan if r.eval.get(key) is None else float(r.eval[key]) for r in records]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(layers, values, marker="o", color="tab:blue")
    if zero_line:
        ax.axhline(0, color="grey", linewidth=0.8)
    if unit_range:
        top = max([v for v in values if np.isfinite(v)], default=0.0)
        ax.set_ylim(0, max(0.05, min(1.0, top * 1.15)))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    save_png(fig, out)


def plot_density_histograms(records: list[LayerRecord], out: Path, title: str) -> None:
    """Per layer, a histogram of log10 feature density over the live features (dead ones
    have no logarithm; their share is in each panel's title). Shared x range."""
    live = [r.density[r.density > 0] for r in records]
    lowest = min((float(np.log10(d.min())) for d in live if len(d)), default=-6.0)
    bins = np.linspace(math.floor(lowest), 0.0, 41)
    fig, axes = _grid(len(records))
    for ax, r, d in zip(axes, records, live, strict=True):
        dead = 1.0 - len(d) / max(len(r.density), 1)
        if len(d):
            ax.hist(np.log10(d), bins=bins, color="tab:blue")
        else:
            ax.text(0.5, 0.5, "all features dead", ha="center", transform=ax.transAxes)
        ax.set_title(f"layer {r.layer} ({dead:.1%} dead)", fontsize=9)
        ax.set_xlabel("log10 density", fontsize=8)
        ax.set_ylabel("features", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title)
    save_png(fig, out)


def plot_training_curves(records: list[LayerRecord], out: Path, title: str) -> None:
    """Per layer, training FVU against tokens seen (log scale FVU; shared axes)."""
    from matplotlib.ticker import EngFormatter

    fig, axes = _grid(len(records), share=True)  # shared axes: layers compare at a glance
    for ax, r in zip(axes, records, strict=True):
        points = [(p["tokens"], p["fvu"]) for p in r.curve if p.get("fvu") is not None]
        if points:
            tokens, fvu = zip(*points, strict=True)
            ax.plot(tokens, fvu, color="tab:blue", linewidth=1.2)
            if min(fvu) > 0:
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no training metrics", ha="center", transform=ax.transAxes)
        ax.set_title(f"layer {r.layer}", fontsize=9)
        ax.set_xlabel("tokens", fontsize=8)
        ax.set_ylabel("FVU", fontsize=8)
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.tick_params(which="both", labelsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    save_png(fig, out)


@dataclass(frozen=True)
class SummaryOutputs:
    metrics: Path
    fvu: Path
    delta_ce: Path
    dead: Path
    density: Path
    curves: Path


def summarize(
    config: Config,
    evals: list[Path],
    stats: list[Path],
    train_metrics: list[Path],
    metrics: Path,
    fvu: Path,
    delta_ce: Path,
    dead: Path,
    density: Path,
    curves: Path,
    spliced: Path | None = None,
) -> list[dict]:
    """The summary rule's job: per-layer inputs in model.layers order (and spliced.json, whose
    prefixes join metrics.csv), six outputs."""
    outputs = SummaryOutputs(metrics, fvu, delta_ce, dead, density, curves)
    model_config = config.model
    return write_summary(
        model_config.name, model_config.layers, evals, stats, train_metrics, outputs, spliced
    )


def write_summary(
    model_name: str,
    layers: list[int],
    evals: list[Path],
    stats: list[Path],
    curves: list[Path],
    outputs: SummaryOutputs,
    spliced: Path | None = None,
) -> list[dict]:
    """Write metrics.csv and the five plots; returns the CSV rows. With `spliced`
    (spliced.json), each row also holds the all-layer splice's prefix ending at its layer."""
    records = load_records(layers, evals, stats, curves)
    if spliced is not None:
        attach_spliced(records, spliced)
    write_csv(outputs.metrics, (r.row() for r in records), metrics_csv_columns(records))
    plot_by_layer(
        records,
        "fvu",
        outputs.fvu,
        "FVU (lower is better)",
        f"{model_name}: fraction of variance unexplained on held-out tokens",
    )
    plot_by_layer(
        records,
        "delta_ce",
        outputs.delta_ce,
        "CE increase when spliced (nats)",
        f"{model_name}: next-token loss added by splicing in the SAE",
        zero_line=True,
    )
    plot_by_layer(
        records,
        "dead_fraction",
        outputs.dead,
        "fraction of features never firing",
        f"{model_name}: dead features on the sample split",
        unit_range=True,
    )
    plot_density_histograms(records, outputs.density, f"{model_name}: feature density per layer")
    plot_training_curves(records, outputs.curves, f"{model_name}: training FVU per layer")
    rows = [r.row() for r in records]
    worst = max(records, key=lambda r: r.eval.get("fvu") or 0.0)
    log.info(
        "summary of %d layers: mean fvu %.4f (worst layer %d: %.4f), mean delta CE %+.4f,"
        " mean dead fraction %.3f -> %s",
        len(rows),
        _mean(rows, "fvu"),
        worst.layer,
        worst.eval.get("fvu") or float("nan"),
        _mean(rows, "delta_ce"),
        _mean(rows, "dead_fraction"),
        outputs.metrics.parent,
    )
    return rows


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else float("nan")
