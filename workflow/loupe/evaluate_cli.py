"""`loupe evaluate`: config sections model, device, sae, evaluate."""

from .clitools import add_paths, add_settings, add_threads


def add_arguments(p):
    add_settings(p)
    add_threads(p)
    p.add_argument("--layer", type=int, required=True)
    add_paths(p, "sae-dir", "tokens", "manifest", "stats", "out")


def run(a):
    from .evaluate import evaluate_layer

    evaluate_layer(
        a.settings,
        a.layer,
        a.sae_dir,
        a.tokens,
        a.manifest,
        a.stats,
        a.out,
        threads=a.threads,
    )
