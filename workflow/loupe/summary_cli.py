"""`loupe summary`: config section model (its name titles the plots)."""

from pathlib import Path

from .clitools import add_settings

_OUTPUTS = ("metrics", "fvu", "delta-ce", "dead", "density", "curves")


def add_arguments(p):
    add_settings(p)
    p.add_argument("--layers", type=int, nargs="+", required=True)
    # One path per layer, in the order of --layers.
    for name in ("evals", "stats", "train-metrics"):
        p.add_argument(f"--{name}", type=Path, nargs="+", required=True)
    for name in _OUTPUTS:
        p.add_argument(f"--{name}", type=Path, required=True)


def run(a):
    from .summary import SummaryOutputs, summarize

    outputs = SummaryOutputs(
        **{n.replace("-", "_"): getattr(a, n.replace("-", "_")) for n in _OUTPUTS}
    )
    summarize(a.settings["model"]["name"], a.layers, a.evals, a.stats, a.train_metrics, outputs)
