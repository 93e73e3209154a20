"""`loupe maxact`: config sections model, device, maxact."""

from .clitools import add_paths, add_settings, add_threads


def add_arguments(p):
    add_settings(p)
    add_threads(p)
    p.add_argument("--layer", type=int, required=True)
    add_paths(p, "sae-dir", "tokens", "manifest", "examples", "stats")


def run(a):
    from .maxact import sample_layer

    sample_layer(
        a.settings,
        a.layer,
        sae_dir=a.sae_dir,
        tokens_path=a.tokens,
        manifest_path=a.manifest,
        examples_path=a.examples,
        stats_path=a.stats,
        threads=a.threads,
    )
