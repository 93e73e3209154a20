"""`loupe tokenize`: config sections model, dataset, tokens."""

from .clitools import add_paths, add_settings, add_threads
from .settings import dataset_spec, token_spec, tokenizer_name
from .tokens import tokenize


def add_arguments(p):
    add_settings(p)
    add_threads(p)
    add_paths(p, "out-dir")


def run(a):
    s = a.settings
    tokenize(
        dataset_spec(s),
        token_spec(s),
        tokenizer_name(s),
        a.out_dir,
        threads=a.threads,
        revision=s["model"].get("revision"),
    )
