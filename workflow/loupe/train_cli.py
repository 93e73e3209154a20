"""`loupe train`: config sections model, device, sae, train."""

from .clitools import add_paths, add_settings, add_threads


def add_arguments(p):
    add_settings(p)
    add_threads(p)
    p.add_argument("--layer", type=int, required=True)
    add_paths(p, "tokens", "out-dir", "checkpoint-dir")


def run(a):
    from .train import train_layer

    train_layer(a.settings, a.layer, a.tokens, a.out_dir, a.checkpoint_dir, threads=a.threads)
