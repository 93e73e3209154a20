"""`loupe demo-corpus` and `loupe demo-model`."""

from types import SimpleNamespace

from .clitools import add_paths
from .demo import TinyModelSpec, build_tiny_model, write_corpus


def _corpus_args(p):
    add_paths(p, "out")
    p.add_argument("--min-bytes", type=int, default=3_000_000)


def _model_args(p):
    add_paths(p, "corpus", "out")


corpus = SimpleNamespace(add_arguments=_corpus_args, run=lambda a: write_corpus(a.out, a.min_bytes))
model = SimpleNamespace(
    add_arguments=_model_args, run=lambda a: build_tiny_model(a.out, a.corpus, TinyModelSpec())
)
