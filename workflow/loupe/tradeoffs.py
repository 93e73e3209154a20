"""The evaluations suites are compared by, as tables and plots: each layer's sparsity ladder
(eval.json's "ladder": reconstruction and spliced loss at every k of evaluate.k_ladder) with
the suite's Pareto plot, and the all-layer splice (spliced.json: loss as the SAEs of the first
layers are spliced in together). Keys are loupe.metrics' vocabulary."""

from __future__ import annotations

import logging
from pathlib import Path

from .atomic import write_csv
from .config import Config
from .metrics import LADDER_COLUMNS, SPLICED_COLUMNS, TRANSFER_COLUMNS
from .summary import read_json, save_png

log = logging.getLogger(__name__)

LADDER_CSV_COLUMNS = ("layer", "k", *(c.name for c in LADDER_COLUMNS))
SPLICED_CSV_COLUMNS = ("last_layer", *(c.name for c in SPLICED_COLUMNS))
TRANSFER_CSV_COLUMNS = ("layer", "model", *(c.name for c in TRANSFER_COLUMNS))


def ladder_rows(evals: list[dict]) -> list[dict]:
    """One row per (layer, k) of every eval.json's ladder, by layer then k."""
    rows = []
    for ev in sorted(evals, key=lambda e: e["layer"]):
        for rung in ev.get("ladder", []):
            rows.append({"layer": ev["layer"], **rung})
    return rows


def transfer_rows(evals: list[dict], base: str) -> list[dict]:
    """Per layer, the base model's row (model `base`) then one per transfer model."""
    rows = []
    for ev in sorted(evals, key=lambda e: e["layer"]):
        rows.append({"layer": ev["layer"], "model": base, **ev})
        rows.extend({"layer": ev["layer"], **t} for t in ev.get("transfer", []))
    return rows


def plot_transfer(rows: list[dict], out: Path, title: str) -> None:
    """FVU, delta-CE and explained variance by layer, one line per model (the base first)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    axes = fig.subplots(1, 3)
    keys = ("fvu", "delta_ce", "explained_variance")
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        for ax, key in zip(axes, keys, strict=True):
            ax.plot(
                [r["layer"] for r in mine],
                [r[key] for r in mine],
                marker="o",
                label=model,
            )
    for ax, key in zip(axes, keys, strict=True):
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    save_png(fig, out)


def plot_ladder(rows: list[dict], out: Path, title: str) -> None:
    """The suite's Pareto plot: FVU and delta-CE against L0, one line per layer (a colour
    ramp from the first layer to the last), log-scale L0."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator, ScalarFormatter

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    layers = sorted({r["layer"] for r in rows})
    ramp = colormaps["viridis"]
    for i, layer in enumerate(layers):
        rungs = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["l0"])
        colour = ramp(i / max(1, len(layers) - 1))
        for ax, key in zip(axes, ("fvu", "delta_ce"), strict=True):
            ax.plot(
                [r["l0"] for r in rungs],
                [r[key] for r in rungs],
                marker="o",
                markersize=3,
                color=colour,
                label=f"layer {layer}",
            )
    for ax, ylabel in zip(
        axes, ("FVU (lower is better)", "CE increase when spliced (nats)"), strict=True
    ):
        ax.set_xscale("log")
        # The ladder's own L0 values as plain numbers (log axes' default labels collide).
        ax.set_xticks(sorted({round(r["l0"], 1) for r in rows}))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("L0 (active features per token)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    if not rows:  # evaluate.k_ladder empty: say so rather than show blank axes
        for ax in axes:
            ax.text(
                0.5,
                0.5,
                "no sparsity ladder (evaluate.k_ladder is empty)",
                ha="center",
                transform=ax.transAxes,
            )
    elif len(layers) <= 12:
        axes[1].legend(fontsize=7)
    fig.suptitle(title)
    save_png(fig, out)


def plot_spliced(spliced: dict, evals: list[dict], out: Path, title: str) -> None:
    """Delta-CE and KL with the SAEs of layers first..L spliced in together, against L; beside
    it the sum of the per-layer delta-CEs up to L (what independent errors would add to)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    prefixes = spliced["prefixes"]
    last = [p["last_layer"] for p in prefixes]
    per_layer = {e["layer"]: e["delta_ce"] for e in evals}
    summed = [sum(per_layer.get(layer, 0.0) for layer in last[: i + 1]) for i in range(len(last))]
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ce_ax, kl_ax = fig.subplots(1, 2)
    ce_ax.plot(last, [p["delta_ce"] for p in prefixes], marker="o", label="spliced together")
    ce_ax.plot(last, summed, marker="x", linestyle="--", label="sum of per-layer delta-CE")
    ce_ax.set_ylabel("CE increase over the clean model (nats)")
    ce_ax.legend(fontsize=8)
    kl_ax.plot(last, [p["kl"] for p in prefixes], marker="o", color="tab:red")
    kl_ax.set_ylabel("KL from the clean next-token distribution")
    for ax in (ce_ax, kl_ax):
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("SAEs spliced in: layers first..L")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    save_png(fig, out)


def summarize_tradeoffs(
    config: Config,
    evals: list[Path],
    spliced: Path,
    ladder_csv: Path,
    ladder_plot: Path,
    spliced_csv: Path,
    spliced_plot: Path,
    transfer_csv: Path,
    transfer_plot: Path,
) -> None:
    """The rule's job: ladder.csv and sparsity_ladder.png, transfer.csv and
    transfer_by_layer.png from every layer's eval.json; spliced.csv and spliced_by_depth.png
    from spliced.json."""
    name = config.model.name
    records = [read_json(p) for p in evals]
    rows = ladder_rows(records)
    write_csv(ladder_csv, rows, LADDER_CSV_COLUMNS)
    plot_ladder(rows, ladder_plot, f"{name}: reconstruction and loss against sparsity")
    moved = transfer_rows(records, name)
    write_csv(transfer_csv, moved, TRANSFER_CSV_COLUMNS)
    plot_transfer(moved, transfer_plot, f"{name}'s SAEs on other models' activations")
    suite = read_json(spliced)
    write_csv(spliced_csv, suite["prefixes"], SPLICED_CSV_COLUMNS)
    plot_spliced(suite, records, spliced_plot, f"{name}: every SAE up to layer L spliced in")
    log.info(
        "%d ladder rows; the whole suite spliced: delta CE %+.4f, KL %.4f",
        len(rows),
        suite["suite"]["delta_ce"],
        suite["suite"]["kl"],
    )
