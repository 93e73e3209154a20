"""The command line: one subcommand per workflow step, each calling one function of its stage
module. A command's flags are that function's parameters (`--sae-dir` -> `sae_dir`), which are
also the names of the rule's inputs and outputs: one name per thing from rule to parameter.

Every command that reads settings takes `--config`, the whole config as JSON, by default from
the environment variable LOUPE_CONFIG, which the workflow sets: the environment never triggers
a rerun, so execution-only keys reach jobs freely, while the rules' `params:` carry only the
output-changing keys (loupe.config.STAGE_READS)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import LoupeError
from .progress import setup_logging

CONFIG_ENV = "LOUPE_CONFIG"
INTERRUPTED = "nothing finished is lost: run it again (training resumes from its last checkpoint)"


@dataclass(frozen=True)
class Command:
    """`function` ("module:name") is imported only when chosen: torch is slow to import."""

    function: str
    help: str
    paths: tuple[str, ...] = ()  # one path each
    path_lists: tuple[str, ...] = ()  # one or more paths each (one per layer, in layer order)
    optional_lists: tuple[str, ...] = ()  # like path_lists, but may be given empty
    optional_paths: tuple[str, ...] = ()  # like paths, but may be left out (None)
    layer: bool = False
    layers: bool = False  # --layers: one or more
    threads: bool = False
    config: bool = True
    port: bool = False


COMMANDS = {
    "demo-corpus": Command(
        "loupe.demo:build_corpus", "write the demo corpus (Python's own docs)", ("corpus",)
    ),
    "demo-model": Command(
        "loupe.demo:build_model", "build the demo's tiny Gemma 4 model", ("corpus", "model")
    ),
    "demo-explainer-model": Command(
        "loupe.demo:build_explainer",
        "build the demo's tiny chat model (explain.model; its explanations are noise)",
        ("corpus", "explainer_model"),
    ),
    "demo-transfer-model": Command(
        "loupe.demo:build_transfer",
        "build the demo's second model (the tiny model after more steps on other text)",
        ("corpus", "model", "transfer_model"),
    ),
    "check-config": Command(
        "loupe.config:check_config",
        "check config files given to --configfile: YAML (file, line), then the schema",
        path_lists=("configfile",),
        config=False,
    ),
    "browse": Command(
        "loupe.browse:browse",
        "serve the staged repo's feature browser on 127.0.0.1 until Ctrl-C",
        ("repo",),
        config=False,
        port=True,
    ),
    "tokenize": Command(
        "loupe.tokens:tokenize",
        "stream the corpus into train/sample/eval token splits",
        ("out_dir", "store"),
        threads=True,
    ),
    "train": Command(
        "loupe.train:train_group",
        "train the SAEs of one or more layers on one forward pass (resumes from its checkpoint)",
        ("tokens", "manifest", "checkpoint_dir"),
        path_lists=("out_dir",),  # one per layer, in --layers order
        layers=True,
        threads=True,
    ),
    "maxact": Command(
        "loupe.maxact:sample_layer",
        "max-activating examples and feature stats of one layer",
        ("sae", "tokens", "manifest", "examples", "intervals", "stats", "logits", "random_windows"),
        layer=True,
        threads=True,
    ),
    "evaluate": Command(
        "loupe.evaluate:evaluate_layer",
        "reconstruction and next-token-loss metrics of one layer",
        ("sae", "tokens", "manifest", "stats", "metrics"),
        layer=True,
        threads=True,
    ),
    "explain": Command(
        "loupe.explain:explain_layer",
        "explanations of one layer's features by an explainer LLM, a sample scored",
        ("examples", "intervals", "stats", "random_windows", "record", "explanations")
        + ("server_log",),  # the embedded transformers serve's output (explain.base_url null)
        layer=True,
    ),
    "explain-dry-run": Command(
        "loupe.explain:explain_dry_run",
        "print the tokens the explain stage would send, per layer and in total",
        path_lists=("examples", "intervals", "stats", "random_windows"),
        layers=True,
    ),
    "neighbours": Command(
        "loupe.neighbours:neighbours_layer",
        "each feature's nearest features by decoder cosine, in its layer and the adjacent ones",
        ("sae", "neighbours"),
        optional_lists=("prev_sae", "next_sae"),  # empty where that layer is not configured
        layer=True,
    ),
    "splice": Command(
        "loupe.splice:splice_job",
        "every layer's SAE spliced into one forward, and each prefix of the layers",
        ("tokens", "manifest", "spliced"),
        path_lists=("sae",),  # in model.layers order
        threads=True,
    ),
    "summary": Command(
        "loupe.summary:summarize",
        "metrics.csv and plots of the whole suite",
        ("metrics", "fvu", "delta_ce", "dead", "density", "curves"),
        path_lists=("evals", "stats", "train_metrics"),
        optional_paths=("spliced",),
    ),
    "flow": Command(
        "loupe.flow:summarize_flow",
        "feature flow between adjacent layers: best-match cosine and co-activation on the data",
        ("table", "plot"),
        path_lists=("neighbours", "random_windows", "stats"),  # in model.layers order
    ),
    "tradeoffs": Command(
        "loupe.tradeoffs:summarize_tradeoffs",
        "the sparsity ladder and the all-layer splice as tables and plots",
        (
            "spliced",
            "ladder_csv",
            "ladder_plot",
            "spliced_csv",
            "spliced_plot",
            "transfer_csv",
            "transfer_plot",
        ),
        path_lists=("evals",),
    ),
    "explanation-scores": Command(
        "loupe.explanation_scores:summarize_explanations",
        "the explanations' coverage and scores per layer: a CSV and a plot by layer",
        ("scores_csv", "scores_plot"),
        path_lists=("explanations", "stats"),
    ),
    "stage": Command(
        "loupe.stage:stage_repo",
        "assemble the hub repo in one folder",
        ("manifest", "repo"),
        path_lists=("sae", "examples", "intervals", "stats", "logits", "neighbours", "summary"),
        optional_lists=("explanations",),
        threads=True,
    ),
    "neuronpedia": Command(
        "loupe.neuronpedia:export",
        "the suite as a Neuronpedia export (its own export's layout and fields)",
        ("out_dir",),
        path_lists=("sae", "examples", "intervals", "stats", "logits"),
        optional_lists=("neighbours", "explanations"),
    ),
    "upload": Command(
        "loupe.upload:upload", "publish the staged repo and verify it", ("repo", "receipt")
    ),
    "upload-dry-run": Command(
        "loupe.upload:dry_run", "list what an upload would send; send nothing", ("repo", "plan")
    ),
}


def _function(command: Command):
    module, _, name = command.function.partition(":")
    return getattr(importlib.import_module(module), name)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loupe", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--log",
        type=Path,
        action="append",
        help="append all output to this file (repeat: to each of them, e.g. every trained layer's)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if command.config:
            p.add_argument(
                "--config",
                default=os.environ.get(CONFIG_ENV),
                required=CONFIG_ENV not in os.environ,
                help=f"the config, as JSON (default: ${CONFIG_ENV}, set by the workflow)",
            )
        if command.layer:
            p.add_argument("--layer", type=int, required=True)
        if command.layers:
            p.add_argument("--layers", type=int, nargs="+", required=True)
        if command.threads:
            p.add_argument("--threads", type=int, default=1)
        if command.port:
            p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
        for path in command.paths:
            p.add_argument(_flag(path), dest=path, type=Path, required=True)
        for paths in command.path_lists:
            p.add_argument(_flag(paths), dest=paths, type=Path, nargs="+", required=True)
        for path in command.optional_paths:
            p.add_argument(_flag(path), dest=path, type=Path, default=None)
        for paths in command.optional_lists:
            p.add_argument(_flag(paths), dest=paths, type=Path, nargs="*", default=[])
    return parser


def run(args: argparse.Namespace) -> None:
    """Call the chosen command's function with the parsed arguments, by name."""
    from .config import Config

    command = COMMANDS[args.command]
    kwargs = {k: v for k, v in vars(args).items() if k not in ("command", "log", "config")}
    if command.config:
        kwargs["config"] = Config.from_json(args.config)
    _function(command)(**kwargs)


class _Tee:
    """A text stream writing to several files (a group job logs to each member's log)."""

    def __init__(self, files):
        self.files = files

    def write(self, text: str) -> int:
        for f in self.files:
            f.write(text)
        return len(text)

    def flush(self) -> None:
        for f in self.files:
            f.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.files[0].fileno()


@contextlib.contextmanager
def _log_to(paths: list[Path] | None):
    """Send stdout and stderr (logging, tqdm, sparsify's prints) to the rule's log file(s)."""
    if not paths:
        yield
        return
    # Bars from libraries too (sparsify's Trainer): redraw rarely in a file.
    os.environ.setdefault("TQDM_MININTERVAL", "10")
    handlers = logging.root.handlers[:]  # setup_logging replaces them; restore for callers
    try:
        with contextlib.ExitStack() as stack:
            files = []
            for path in paths:
                path.parent.mkdir(parents=True, exist_ok=True)
                files.append(stack.enter_context(open(path, "a", buffering=1)))
            out = files[0] if len(files) == 1 else _Tee(files)
            stack.enter_context(contextlib.redirect_stdout(out))
            stack.enter_context(contextlib.redirect_stderr(out))
            yield
    finally:
        logging.root.handlers[:] = handlers


def error_line(command: str, error: LoupeError) -> str:
    """The one line a LoupeError prints, also when it quotes a library's message of several
    lines (torch's state-dict size mismatches list one line per tensor)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return f"loupe {command}: error: {text}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    terminal = sys.stderr
    try:
        with _log_to(args.log):
            setup_logging()
            # Which copy of the package runs: the workflow's own (PYTHONPATH), even when
            # another is installed.
            logging.getLogger("loupe").info("loupe %s from %s", __version__, Path(__file__).parent)
            try:
                run(args)
            except LoupeError as e:
                print(error_line(args.command, e), file=sys.stderr)
                raise
    except LoupeError as e:
        # The log has it too; the terminal gets exactly one line.
        if args.log:
            print(error_line(args.command, e), file=terminal)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C: no traceback through sparsify and torch. Every output is written whole or
        # not at all, and training resumes from its last checkpoint.
        line = f"loupe {args.command}: interrupted (Ctrl-C); {INTERRUPTED}"
        print(line, file=terminal)
        for path in args.log or []:
            with open(path, "a") as f:
                print(line, file=f)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
