"""`loupe stage`: config sections model, dataset, tokens, sae, train, maxact, evaluate, hub.

Per-layer inputs come as parallel lists in model.layers order (the rule expands them so)."""

from pathlib import Path

from .clitools import add_paths, add_settings, add_threads


def add_arguments(p):
    add_settings(p)
    add_threads(p)
    p.add_argument("--sae", type=Path, nargs="+", required=True, help="sae.safetensors per layer")
    p.add_argument(
        "--examples", type=Path, nargs="+", required=True, help="max-activation parquet per layer"
    )
    p.add_argument(
        "--stats", type=Path, nargs="+", required=True, help="feature-stats parquet per layer"
    )
    p.add_argument("--summary", type=Path, nargs="+", required=True, help="metrics.csv and plots")
    p.add_argument("--tokens-manifest", type=Path, default=None)
    add_paths(p, "out-dir")


def run(a):
    from .errors import LoupeError
    from .publish import LayerInputs, StageInputs, stage_repo

    layers = a.settings["model"]["layers"]
    for name in ("sae", "examples", "stats"):
        if len(getattr(a, name)) != len(layers):
            raise LoupeError(
                f"--{name}: {len(getattr(a, name))} files for {len(layers)} layers {layers}"
            )
    # Summary outputs may be files or folders of plots.
    summary = [f for p in a.summary for f in (sorted(p.rglob("*")) if p.is_dir() else [p])]
    metrics = [p for p in summary if p.name == "metrics.csv"]
    if len(metrics) != 1:
        raise LoupeError("--summary must include exactly one metrics.csv")
    inputs = StageInputs(
        layers=[
            LayerInputs(layer, sae.parent, ex, st)
            for layer, sae, ex, st in zip(layers, a.sae, a.examples, a.stats, strict=True)
        ],
        metrics=metrics[0],
        plots=[p for p in summary if p.suffix == ".png"],  # the rule's order
        tokens_manifest=a.tokens_manifest,
    )
    stage_repo(a.settings, inputs, a.out_dir, threads=a.threads)
