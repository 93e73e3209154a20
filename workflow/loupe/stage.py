"""Staging the hub repo: the exact published layout under results/hub/, assembled in a temporary
folder from hard links of the results (copies where linking fails; never symlinks, which the
hub client does not follow) and renamed into place whole, with a manifest of every file."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, number_format
from .atomic import atomic_dir
from .browse import install_browser
from .card import collect_facts, fill_constants, metrics_rows, render_card
from .config import Config, TrainConfig
from .errors import LoupeError
from .layout import (
    CARD,
    NOTEBOOK,
    REPO_MANIFEST,
    RUN_CONFIG,
    SAE_CFG,
    SAE_WEIGHTS,
    Layout,
    example_layer,
)
from .progress import progress
from .saelens import stage_saelens

log = logging.getLogger(__name__)

_NOTEBOOK_TEMPLATE = Path(__file__).with_name("assets") / NOTEBOOK
_CHUNK = 8 << 20
_PLACED = {"link": "hard-linked", "copy": "copied"}

# sparsify TrainConfig fields recorded in config.json (sparsify's own run config layout).
_TRAIN_FIELDS = tuple(
    f for f in TrainConfig.SPARSIFY_FIELDS if f not in ("save_every", "log_to_wandb")
)


@dataclass(frozen=True)
class LayerInputs:
    """One layer's results: its SAE folder (cfg.json, sae.safetensors) and its parquet file
    of each kind (layout.PER_LAYER: examples, intervals, stats, logits, neighbours)."""

    layer: int
    sae_dir: Path
    parquet: dict[str, Path]


@dataclass(frozen=True)
class StageInputs:
    layers: list[LayerInputs]
    metrics: Path  # summary metrics.csv, one row per layer
    plots: list[Path]  # in the order the card shows them
    tokens_manifest: Path | None = None
    # The summary's other tables (the tradeoffs rule's ladder.csv, transfer.csv, spliced.csv,
    # the flow rule's feature_flow.csv), staged beside metrics.csv under their own names.
    tables: list[Path] = field(default_factory=list)


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
            if rel != REPO_MANIFEST and not _tool_file(rel):
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


def read_repo_manifest(root: Path) -> dict:
    path = Path(root) / REPO_MANIFEST
    if not path.is_file():
        raise LoupeError(f"{path} not found: stage the repo first (snakemake results/hub)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LoupeError(f"{path} is not valid JSON ({e})") from None


def latents(sae: dict, d_in: int) -> int:
    """The SAE's width: sparsify writes num_latents 0 for "d_in x expansion_factor"."""
    return sae["num_latents"] or d_in * sae["expansion_factor"]


def write_sae_cfg(src: Path, dst: Path) -> None:
    """The staged cfg.json: sparsify's, with the real num_latents. SAELens' loaders take
    num_latents as the width (0 would give a 0-latent SAE); sparsify loads either the same."""
    cfg = json.loads(Path(src).read_text())
    cfg["num_latents"] = latents(cfg, cfg["d_in"])
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(cfg, indent=2) + "\n")


def run_config(config: Config, layout: Layout, d_in: int) -> dict:
    """config.json: the run in sparsify's own run-config shape (TrainConfig fields plus model,
    dataset, ctx_len), the keys SAELens' sparsify loader reads, and loupe's own settings."""
    model, dataset, tokens, train = config.model, config.dataset, config.tokens, config.train
    settings = config.settings_for("stage")  # output-changing keys only
    return {
        "model": model.name,
        "revision": model.revision,
        "dataset": dataset.hub_id or dataset.path,
        "dataset_description": dataset.description,
        "data_files": dataset.data_files,
        "split": dataset.split,
        "text_column": dataset.text_column,
        "ctx_len": tokens.ctx_len,
        "sae": {**vars(config.sae), "d_in": d_in, "num_latents": latents(vars(config.sae), d_in)},
        **{k: getattr(train, k) for k in _TRAIN_FIELDS},
        "loss_fn": "fvu",
        "hookpoints": [layout.hookpoint(layer) for layer in model.layers],
        "layers": list(model.layers),
        "train_tokens": tokens.train_tokens,
        "shuffle_seed": train.shuffle_seed,
        "max_activations": {**settings["maxact"], "sample_tokens": tokens.sample_tokens},
        "evaluate": {**settings["evaluate"], "eval_tokens": tokens.eval_tokens},
        "loupe_version": __version__,
    }


def _check_inputs(inputs: StageInputs, config: Config) -> None:
    configured = list(config.model.layers)
    given = [li.layer for li in inputs.layers]
    if given != configured:
        raise LoupeError(f"staging layers {given}, but model.layers is {configured}")
    needed = [inputs.metrics, *inputs.plots, *inputs.tables]
    for li in inputs.layers:
        needed += [li.sae_dir / SAE_CFG, li.sae_dir / SAE_WEIGHTS, *li.parquet.values()]
    names = [Path(p).name for p in inputs.plots]
    if len(set(names)) != len(names):
        raise LoupeError(f"plots share a file name: {sorted(names)}")
    missing = [str(p) for p in needed if not Path(p).is_file()]
    if missing:
        raise LoupeError(f"missing inputs for staging: {', '.join(missing[:5])}")


def set_notebook_parameters(nb: dict, values: dict) -> dict:
    """Fill the `NAME = ...` lines of the cell tagged `parameters` (papermill's convention),
    the same way the card fills its quick start (card.fill_constants)."""
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    cell["source"] = fill_constants("".join(cell["source"]), values).splitlines(keepends=True)
    return nb


def _notebook(config: Config, layout: Layout, layer: int) -> str:
    """The notebook template with this run's repo, suite, layer and model filled in."""
    nb = json.loads(_NOTEBOOK_TEMPLATE.read_text())
    set_notebook_parameters(
        nb,
        {
            "REPO": config.hub.repo,
            "PREFIX": layout.prefix,
            "HOOKPOINT": layout.hookpoint(layer),
            "LAYER": layer,
            "MODEL": config.model.name,
        },
    )
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def stage_inputs(
    config: Config,
    sae: list[Path],
    parquet: dict[str, list[Path]],
    summary: list[Path],
    manifest: Path | None = None,
) -> StageInputs:
    """What staging reads, from the rule's per-layer lists (in model.layers order; `parquet`:
    a list per kind of layout.PER_LAYER) and the summary's outputs (metrics.csv, plots and
    the other tables, files or folders of them)."""
    layers = list(config.model.layers)
    for name, paths in (("sae", sae), *parquet.items()):
        if len(paths) != len(layers):
            raise LoupeError(f"{name}: {len(paths)} files for {len(layers)} layers {layers}")
    files = [f for p in map(Path, summary) for f in (sorted(p.rglob("*")) if p.is_dir() else [p])]
    metrics = [p for p in files if p.name == "metrics.csv"]
    if len(metrics) != 1:
        raise LoupeError("summary must include exactly one metrics.csv")
    return StageInputs(
        layers=[
            LayerInputs(layer, Path(s).parent, {k: Path(v[i]) for k, v in parquet.items()})
            for i, (layer, s) in enumerate(zip(layers, sae, strict=True))
        ],
        metrics=metrics[0],
        plots=[p for p in files if p.suffix == ".png"],  # the rule's order
        tokens_manifest=manifest,
        tables=[p for p in files if p.suffix == ".csv" and p.name != "metrics.csv"],
    )


def stage_repo(
    config: Config,
    sae: list[Path],
    examples: list[Path],
    intervals: list[Path],
    stats: list[Path],
    logits: list[Path],
    neighbours: list[Path],
    summary: list[Path],
    repo: Path,
    manifest: Path | None = None,
    threads: int = 1,
    explanations: list[Path] | None = None,
) -> dict:
    """Stage the hub repo in `repo` from the rule's inputs (see stage_inputs); the
    explanations where given."""
    parquet = {
        "examples": examples,
        "intervals": intervals,
        "stats": stats,
        "logits": logits,
        "neighbours": neighbours,
    }
    if explanations:
        parquet["explanations"] = explanations
    inputs = stage_inputs(config, sae, parquet, summary, manifest)
    return stage(config, inputs, Path(repo), threads)


def stage(config: Config, inputs: StageInputs, out_dir: Path, threads: int = 1) -> dict:
    """Assemble the repo in a temporary folder beside `out_dir`, then rename it into place."""
    _check_inputs(inputs, config)
    layout = Layout.of(config)
    out_dir = Path(out_dir)
    modes: dict[str, int] = {}
    with atomic_dir(out_dir) as tmp:
        for li in inputs.layers:
            sae_dir = tmp / layout.sae_dir(li.layer)
            mode = place(li.sae_dir / SAE_WEIGHTS, sae_dir / SAE_WEIGHTS)
            modes[mode] = modes.get(mode, 0) + 1
            write_sae_cfg(li.sae_dir / SAE_CFG, sae_dir / SAE_CFG)
            for kind, path in li.parquet.items():
                place(path, tmp / layout.per_layer(kind, li.layer))
        place(inputs.metrics, tmp / layout.metrics)
        if config.hub.saelens:
            layers = [(li.layer, li.sae_dir, li.parquet["stats"]) for li in inputs.layers]
            stage_saelens(config, tmp, layers, metrics_rows(inputs.metrics))
        for plot in inputs.plots:
            place(plot, tmp / layout.plots / Path(plot).name)
        for table in inputs.tables:
            place(table, tmp / layout.table(Path(table).name))

        first = json.loads((inputs.layers[0].sae_dir / SAE_CFG).read_text())
        config_text = json.dumps(run_config(config, layout, first["d_in"]), indent=2) + "\n"
        (tmp / layout.run_config).write_text(config_text)
        (tmp / RUN_CONFIG).write_text(config_text)  # the same, where tools look first

        layer = example_layer(config.model.layers)
        (tmp / NOTEBOOK).write_text(_notebook(config, layout, layer))
        num_latents = json.loads((tmp / layout.sae_dir(layer) / SAE_CFG).read_text())["num_latents"]
        install_browser(tmp, layout.prefix, config.model.layers, num_latents, config.model.name)
        # The card after every other file but the manifest: it states their sizes.
        plots = [Path(p).name for p in inputs.plots]
        facts = collect_facts(config, layout, tmp, inputs.tokens_manifest, plots)
        (tmp / CARD).write_text(render_card(config, facts))

        manifest = build_manifest(tmp, threads)
        (tmp / REPO_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info(
        "staged %d files (%s) for %s in %s; SAE files: %s",
        len(manifest["files"]),
        number_format.size(manifest["total_size"]),
        config.hub.repo,
        out_dir,
        ", ".join(f"{n} {_PLACED[m]}" for m, n in sorted(modes.items())),
    )
    return manifest
