"""Argument helpers shared by the stage command lines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_settings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", type=json.loads, required=True, help="JSON config sections")


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1)


def add_paths(p: argparse.ArgumentParser, *names: str, required: bool = True) -> None:
    for name in names:
        p.add_argument(f"--{name}", type=Path, required=required)
