"""Staging the hub repo: the exact published layout under results/hub/, assembled in a temporary
folder from hard links of the results (copies where linking fails; never symlinks, which the
hub client does not follow) and renamed into place whole, with a manifest of every file."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import LoupeError
from .io import atomic_dir
from .progress import progress
from .settings import TRAIN_CONFIG_FIELDS

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
NOTEBOOK = "quickstart.ipynb"
_NOTEBOOK_TEMPLATE = Path(__file__).with_name("assets") / NOTEBOOK
_CHUNK = 8 << 20
_PLACED = {"link": "hard-linked", "copy": "copied"}

# sparsify TrainConfig fields recorded in config.json (sparsify's own run config layout).
_TRAIN_FIELDS = tuple(f for f in TRAIN_CONFIG_FIELDS if f not in ("save_every", "log_to_wandb"))


@dataclass(frozen=True)
class Layout:
    """Where each artifact lives in the repo; the SAE folders are sparsify's hookpoint names."""

    prefix: str
    hookpoint_template: str

    def hookpoint(self, layer: int) -> str:
        return self.hookpoint_template.format(layer=layer)

    def sae_dir(self, layer: int) -> str:
        return f"{self.prefix}/{self.hookpoint(layer)}"

    def examples(self, layer: int) -> str:
        return f"{self.prefix}/max_activations/layer_{layer}.parquet"

    def stats(self, layer: int) -> str:
        return f"{self.prefix}/feature_stats/layer_{layer}.parquet"

    @property
    def metrics(self) -> str:
        return f"{self.prefix}/metrics.csv"

    @property
    def plots(self) -> str:
        return f"{self.prefix}/plots"

    @property
    def run_config(self) -> str:
        # SAELens' sparsify loader reads config.json from the folder above the SAE folders.
        return f"{self.prefix}/config.json"


def layout_of(settings: dict) -> Layout:
    return Layout(settings["hub"]["prefix"], settings["model"]["hookpoint"])


@dataclass(frozen=True)
class LayerInputs:
    """One layer's results: its SAE folder (cfg.json, sae.safetensors) and parquet files."""

    layer: int
    sae_dir: Path
    examples: Path
    stats: Path


@dataclass(frozen=True)
class StageInputs:
    layers: list[LayerInputs]
    metrics: Path  # summary metrics.csv, one row per layer
    plots: list[Path]  # in the order the card shows them
    tokens_manifest: Path | None = None


def place(src: Path, dst: Path) -> str:
    """Hard-link `src` at `dst`, or copy it where linking fails (another file system)."""
    src = Path(src).resolve()  # a symlinked input: publish its target, never the link
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return "link"
    except OSError:
        shutil.copyfile(src, dst)
        return "copy"


def sha256_file(path: Path, on_chunk: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            if on_chunk is not None:
                on_chunk(len(chunk))
    return h.hexdigest()


def _tool_file(rel: str) -> bool:
    """Files tools add to the staged folder, never published: Snakemake's marker in directory
    outputs, huggingface_hub's resume state (upload_large_folder)."""
    return rel == ".snakemake_timestamp" or rel.startswith(".cache/")


def repo_files(root: Path) -> list[str]:
    """Every file under `root` as a repo path (posix, sorted), the manifest excluded."""
    out = []
    for path in root.rglob("*"):
        if path.is_symlink():
            raise LoupeError(f"staged repo holds a symlink ({path}); the hub client skips them")
        if path.is_file():
            rel = path.relative_to(root).as_posix()
            if rel != MANIFEST and not _tool_file(rel):
                out.append(rel)
    return sorted(out)


def build_manifest(root: Path, threads: int = 1) -> dict:
    """Size and sha256 of every file under `root` (hashed in parallel: hashlib drops the GIL)."""
    paths = repo_files(root)
    sizes = {p: (root / p).stat().st_size for p in paths}
    total = sum(sizes.values())
    lock = threading.Lock()
    with progress(total=total, unit="B", unit_scale=True, desc="sha256") as bar:

        def advance(n: int) -> None:  # called from several threads
            with lock:
                bar.update(n)

        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            digests = list(pool.map(lambda p: sha256_file(root / p, advance), paths))
    return {
        "format": 1,
        "loupe_version": __version__,
        "total_size": total,
        "files": [
            {"path": p, "size": sizes[p], "sha256": d} for p, d in zip(paths, digests, strict=True)
        ],
    }


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise LoupeError(f"{path} not found: stage the repo first (snakemake results/hub)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LoupeError(f"{path} is not valid JSON ({e})") from None


def run_config(settings: dict, layout: Layout, d_in: int) -> dict:
    """config.json: the run in sparsify's own run-config shape (TrainConfig fields plus model,
    dataset, ctx_len), the keys SAELens' sparsify loader reads, and loupe's own settings."""
    model, dataset, tokens, train = (settings[k] for k in ("model", "dataset", "tokens", "train"))
    layers = list(model["layers"])
    return {
        "model": model["name"],
        "revision": model.get("revision"),
        "dataset": dataset.get("hub_id") or dataset["path"],
        "dataset_description": dataset.get("description", ""),
        "data_files": dataset.get("data_files"),
        "split": dataset.get("split", "train"),
        "text_column": dataset.get("text_column", "text"),
        "ctx_len": tokens["ctx_len"],
        "sae": {**settings["sae"], "d_in": d_in},
        **{k: train[k] for k in _TRAIN_FIELDS if k in train},
        "loss_fn": "fvu",
        "hookpoints": [layout.hookpoint(layer) for layer in layers],
        "layers": layers,
        "train_tokens": tokens["train_tokens"],
        "shuffle_seed": train.get("shuffle_seed", 0),
        "max_activations": {**settings.get("maxact", {}), "sample_tokens": tokens["sample_tokens"]},
        "evaluate": {**settings.get("evaluate", {}), "eval_tokens": tokens["eval_tokens"]},
        "loupe_version": __version__,
    }


def _check_inputs(inputs: StageInputs, settings: dict) -> None:
    configured = list(settings["model"]["layers"])
    given = [li.layer for li in inputs.layers]
    if given != configured:
        raise LoupeError(f"staging layers {given}, but model.layers is {configured}")
    needed = [inputs.metrics, *inputs.plots]
    for li in inputs.layers:
        needed += [li.sae_dir / "cfg.json", li.sae_dir / "sae.safetensors", li.examples, li.stats]
    names = [Path(p).name for p in inputs.plots]
    if len(set(names)) != len(names):
        raise LoupeError(f"plots share a file name: {sorted(names)}")
    missing = [str(p) for p in needed if not Path(p).is_file()]
    if missing:
        raise LoupeError(f"missing inputs for staging: {', '.join(missing[:5])}")


def metrics_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "layer" not in rows[0]:
        raise LoupeError(f"{path}: expected a CSV with a 'layer' column and one row per layer")
    return rows


def set_notebook_parameters(nb: dict, values: dict) -> dict:
    """Rewrite `NAME = ...` lines of the cell tagged `parameters` (papermill's convention),
    keeping their comments; every name must be there."""
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    lines = "".join(cell["source"]).splitlines(keepends=True)
    missing = set(values)
    for i, line in enumerate(lines):
        m = re.match(r"(\w+) = .*?(\s+#.*)?$", line.rstrip("\n"))
        if m and m.group(1) in values:
            end = "\n" if line.endswith("\n") else ""
            lines[i] = f"{m.group(1)} = {json.dumps(values[m.group(1)])}{m.group(2) or ''}{end}"
            missing.discard(m.group(1))
    if missing:
        raise ValueError(f"notebook parameters cell lacks {sorted(missing)}")
    cell["source"] = lines
    return nb


def _notebook(settings: dict, layout: Layout, layer: int) -> str:
    """The notebook template with this run's repo, suite, layer and model filled in."""
    nb = json.loads(_NOTEBOOK_TEMPLATE.read_text())
    set_notebook_parameters(
        nb,
        {
            "REPO": settings["hub"]["repo"],
            "PREFIX": layout.prefix,
            "HOOKPOINT": layout.hookpoint(layer),
            "LAYER": layer,
            "MODEL": settings["model"]["name"],
        },
    )
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def example_layer(layers: list[int]) -> int:
    """The layer the quick start shows: the middle one (17 of gemma-loupe's 0..34)."""
    return sorted(layers)[len(layers) // 2]


def stage_repo(settings: dict, inputs: StageInputs, out_dir: Path, threads: int = 1) -> dict:
    """Assemble the repo in a temporary folder beside `out_dir`, then rename it into place."""
    from .card import collect_facts, render_card

    _check_inputs(inputs, settings)
    layout = layout_of(settings)
    out_dir = Path(out_dir)
    modes: dict[str, int] = {}
    with atomic_dir(out_dir) as tmp:
        for li in inputs.layers:
            for name in ("cfg.json", "sae.safetensors"):
                mode = place(li.sae_dir / name, tmp / layout.sae_dir(li.layer) / name)
                modes[mode] = modes.get(mode, 0) + 1
            place(li.examples, tmp / layout.examples(li.layer))
            place(li.stats, tmp / layout.stats(li.layer))
        place(inputs.metrics, tmp / layout.metrics)
        for plot in inputs.plots:
            place(plot, tmp / layout.plots / Path(plot).name)

        first = json.loads((inputs.layers[0].sae_dir / "cfg.json").read_text())
        config_text = json.dumps(run_config(settings, layout, first["d_in"]), indent=2) + "\n"
        (tmp / layout.run_config).write_text(config_text)
        (tmp / "config.json").write_text(config_text)  # the same, where tools look first

        layer = example_layer(settings["model"]["layers"])
        (tmp / NOTEBOOK).write_text(_notebook(settings, layout, layer))
        plots = [Path(p).name for p in inputs.plots]
        facts = collect_facts(settings, layout, tmp, inputs.tokens_manifest, plots)
        (tmp / "README.md").write_text(render_card(settings, facts))

        manifest = build_manifest(tmp, threads)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info(
        "staged %d files (%.1f MB) for %s in %s; SAE files: %s",
        len(manifest["files"]),
        manifest["total_size"] / 1e6,
        settings["hub"]["repo"],
        out_dir,
        ", ".join(f"{n} {_PLACED[m]}" for m, n in sorted(modes.items())),
    )
    return manifest
