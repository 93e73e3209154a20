"""Progress bars and logging that land in the rule's log file."""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm


def progress(**kwargs) -> tqdm:
    """A tqdm bar on stderr (the rule's log). Redrawn at most every few seconds when stderr
    is a file, so a day-long job does not write a gigabyte of bars."""
    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.5 if interactive else 10.0)
    kwargs.setdefault("dynamic_ncols", interactive)
    kwargs.setdefault("file", sys.stderr)
    return tqdm(**kwargs)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
