"""Command line entry points, one subcommand per workflow stage; each rule calls one.

Settings arrive as one JSON object (the config sections the stage needs, passed through the
rule's params so Snakemake reruns a stage exactly when its settings change)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from pathlib import Path

from .errors import LoupeError
from .progress import setup_logging

# Subcommand -> module. Each stage module defines `add_arguments(parser)` and `run(args)`,
# so a stage's command line lives beside its logic and the CLI only dispatches.
STAGES = {
    "demo-corpus": "loupe.demo_cli:corpus",
    "demo-model": "loupe.demo_cli:model",
    "tokenize": "loupe.tokens_cli",
    "train": "loupe.train_cli",
    "maxact": "loupe.maxact_cli",
    "evaluate": "loupe.evaluate_cli",
    "summary": "loupe.summary_cli",
    "stage": "loupe.publish_cli",
    "upload": "loupe.upload_cli",
}


def _stage(name: str):
    module, _, attr = STAGES[name].partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, attr) if attr else mod


@contextlib.contextmanager
def _log_to(path: Path | None):
    """Send stdout and stderr (logging, tqdm, sparsify's prints) to the rule's log file."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # Bars from libraries too (sparsify's Trainer): redraw rarely in a file.
    os.environ.setdefault("TQDM_MININTERVAL", "10")
    handlers = logging.root.handlers[:]  # setup_logging replaces them; restore for callers
    try:
        with (
            open(path, "a", buffering=1) as f,
            contextlib.redirect_stdout(f),
            contextlib.redirect_stderr(f),
        ):
            yield
    finally:
        logging.root.handlers[:] = handlers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loupe", description=__doc__)
    parser.add_argument("--log", type=Path, default=None, help="append all output to this file")
    sub = parser.add_subparsers(dest="command", required=True)
    # Only the chosen stage is imported (torch and friends are slow to import).
    chosen = next((a for a in (argv if argv is not None else sys.argv[1:]) if a in STAGES), None)
    for name in STAGES:
        p = sub.add_parser(name)
        if name == chosen:
            _stage(name).add_arguments(p)
    args = parser.parse_args(argv)
    fn = _stage(args.command).run
    terminal = sys.stderr
    try:
        with _log_to(args.log):
            setup_logging()
            try:
                fn(args)
            except LoupeError as e:
                print(f"loupe {args.command}: error: {e}", file=sys.stderr)
                raise
    except LoupeError as e:
        # The log has it too; the terminal gets exactly one line.
        if args.log is not None:
            print(f"loupe {args.command}: error: {e}", file=terminal)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
