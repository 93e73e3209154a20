"""Training a group of layers' SAEs (one layer, or several on one shared forward pass) with
sparsify's own Trainer, with a local metrics record per SAE and an exact resume from the last
checkpoint.

A group trains on one forward pass of the model cut after its deepest layer: sparsify runs
each SAE's forward and backward inside the hook of its layer, so the group pays one forward
and one SAE step per member, and each member sees exactly the activations, batches and
initialisation it would see trained alone (tests/test_groups.py).

The checkpoint folder (what resumes, what is set aside) is loupe.checkpoints; every patch to
sparsify's Trainer, and the metrics recorder it feeds, is loupe.trainer, imported only when a
job trains.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path, write_json
from .checkpoints import (
    STATE,
    UNREADABLE,
    UnreadableCheckpoint,
    prepare_checkpoint_dir,
    run_identity,
)
from .config import Config, check_train_settings
from .errors import LoupeError
from .layout import SAE_CFG, SAE_DIGEST, SAE_WEIGHTS, TRAIN_METRICS
from .model import get_hookpoint, import_sparsify, open_layer
from .number_format import fixed
from .tokens import open_split, read_tokens_manifest

log = logging.getLogger(__name__)


class ShuffledRows(torch.utils.data.Dataset):
    """Rows of a memory-mapped token split in a seeded random order; never loaded whole."""

    def __init__(self, tokens: np.ndarray, seed: int, order: np.ndarray | None = None):
        self.tokens = tokens
        self.order = (
            np.random.default_rng(seed).permutation(len(tokens)) if order is None else order
        )

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": torch.from_numpy(self.tokens[self.order[i]].astype(np.int64))}

    def select(self, rows: range) -> ShuffledRows:
        """Rows `rows` of this order (sparsify skips consumed batches with this on resume)."""
        return ShuffledRows(self.tokens, 0, self.order[rows.start : rows.stop])


def train_config(config: Config, layers: int | list[int], checkpoint_dir: Path):
    """sparsify's TrainConfig for one layer or a group (every hookpoint on one forward), with
    every field it takes from the config."""
    sparsify = import_sparsify()
    layers = [layers] if isinstance(layers, int) else list(layers)
    return sparsify.TrainConfig(
        sae=sparsify.SparseCoderConfig(**vars(config.sae)),
        hookpoints=[config.model.hookpoint_of(layer) for layer in layers],
        save_dir=str(checkpoint_dir),
        run_name=STATE,
        **config.train.sparsify_kwargs(),
    )


def _widths(model, hookpoints: list[str]) -> dict[str, int]:
    """Each hookpoint's output width (d_in), found as sparsify's Trainer finds it."""
    from sparsify.utils import resolve_widths

    return resolve_widths(model, hookpoints)


def _named(layers: list[int]) -> str:
    """'layer 3' or 'layers 1, 3', for log lines."""
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {', '.join(map(str, layers))}"


def train_group(
    config: Config,
    layers: list[int],
    tokens: Path,
    manifest: Path,
    out_dir: list[Path],
    checkpoint_dir: Path,
    threads: int = 1,
) -> dict:
    """Train the SAEs of `layers` on one shared forward pass, the model cut after the deepest
    of them; writes sae.safetensors, cfg.json and train_metrics.jsonl of layers[i] into
    out_dir[i]. `tokens` is the [rows, ctx_len] uint32 split, checked against `manifest`."""
    if len(layers) != len(out_dir):
        raise LoupeError(f"{len(layers)} layers but {len(out_dir)} output folders: one per layer")
    if len(set(layers)) != len(layers):
        raise LoupeError(f"layers {layers} name a layer twice")
    for layer in layers:
        if layer not in config.model.layers:
            raise LoupeError(f"layer {layer} is not in model.layers {config.model.layers}")
    # In depth order, the order in which sparsify's hooks run.
    members = sorted(zip(layers, map(Path, out_dir), strict=True))
    layers = [layer for layer, _ in members]
    tokens_path, manifest_path, checkpoint_dir = Path(tokens), Path(manifest), Path(checkpoint_dir)
    tokens_manifest = read_tokens_manifest(manifest_path)
    split = open_split(tokens_path, tokens_manifest)
    identity = run_identity(config, layers, tokens_path.stem, tokens_manifest)
    # The model cut after the deepest member: every shallower hookpoint is kept.
    job = open_layer(config, layers[-1], threads, manifest=manifest_path)
    model, device = job.model, job.device
    hookpoints = [config.model.hookpoint_of(layer) for layer in layers]
    for hookpoint in hookpoints:
        get_hookpoint(model, hookpoint)  # one clear line for a member's bad hookpoint
    # Everything that can fail on a setting, before the checkpoint folder is touched.
    for d_in in sorted(set(_widths(model, hookpoints).values())):
        check_train_settings(
            config,
            d_in=d_in,
            rows=len(split),
            vocab=model.get_input_embeddings().num_embeddings,
        )
    dataset = ShuffledRows(split, config.train.shuffle_seed)
    resume = prepare_checkpoint_dir(checkpoint_dir, identity)
    if len(layers) > 1:
        log.info("%s: one shared forward pass, one SAE each", _named(layers))

    from .trainer import LoupeTrainer, MetricsRecorder  # checks sparsify's version first

    def new_trainer():
        cfg = train_config(config, layers, checkpoint_dir)
        recorders = [
            MetricsRecorder(
                name=hookpoint,
                path=checkpoint_dir / hookpoint / TRAIN_METRICS,
                log_every=config.train.log_every,
                tokens_per_batch=cfg.batch_size * split.shape[1],
                grad_acc_steps=cfg.grad_acc_steps,
                dead_threshold=cfg.dead_feature_threshold,
            )
            for hookpoint in hookpoints
        ]
        return LoupeTrainer(cfg, dataset, model, recorders, identity)

    trainer = new_trainer()
    if resume:
        state = checkpoint_dir / STATE
        try:
            trainer.load_state(str(state))
        except UnreadableCheckpoint as e:
            aside = checkpoint_dir / UNREADABLE
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(state, aside)
            log.warning(
                "checkpoint %s is unreadable (%s): moved it to %s, training %s from the start",
                state,
                e,
                aside,
                _named(layers),
            )
            trainer, resume = new_trainer(), False  # the failed load may have changed it
        else:
            log.info("resumed %s at batch %d from %s", _named(layers), trainer.global_step, state)
    for recorder in trainer.recorders:
        recorder.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume:
            recorder.path.unlink(missing_ok=True)
        recorder.path.touch()
    start_batch = trainer.global_step

    t0 = time.perf_counter()
    trainer.fit()
    elapsed = time.perf_counter() - t0

    # sparsify's final save holds the ScheduleFree-averaged weights: publish those files.
    for (_, out), recorder in zip(members, trainer.recorders, strict=True):
        saved = checkpoint_dir / STATE / recorder.name
        out.mkdir(parents=True, exist_ok=True)
        for name, src in (
            (SAE_CFG, saved / SAE_CFG),
            (TRAIN_METRICS, recorder.path),
            (SAE_DIGEST, None),
            (SAE_WEIGHTS, saved / SAE_WEIGHTS),  # last: the rule's main target
        ):
            with atomic_path(out / name) as tmp:
                if src is None:
                    tmp.write_text(sae_digest(saved / SAE_WEIGHTS))
                else:
                    shutil.copyfile(src, tmp)

    batches = trainer.global_step
    tokens_per_batch = trainer.recorders[0].tokens_per_batch
    summary = {
        "layers": layers,
        "device": str(device),
        "batches": batches,
        "tokens": batches * tokens_per_batch,
        "resumed_from_batch": start_batch,
        "seconds": round(elapsed, 2),
        "tokens_per_s": (batches - start_batch) * tokens_per_batch / max(elapsed, 1e-9),
        "saes": [
            {
                "layer": layer,
                "hookpoint": recorder.name,
                "trained_tokens": recorder.trained_tokens,
                "final_fvu": recorder.last.get("fvu"),
                "dead_fraction": recorder.last.get("dead_fraction"),
            }
            for layer, recorder in zip(layers, trainer.recorders, strict=True)
        ],
    }
    write_json(checkpoint_dir / "summary.json", summary)
    for sae in summary["saes"]:
        if start_batch == batches:
            log.info(
                "layer %d: its checkpoint had finished training (%s tokens): published it,"
                " final fvu %s, dead fraction %s",
                sae["layer"],
                f"{summary['tokens']:,}",
                fixed(sae["final_fvu"], 4),
                fixed(sae["dead_fraction"], 4),
            )
        else:
            log.info(
                "trained layer %d: %s tokens (%s in this run: %.1fs, %.0f tokens/s), final fvu"
                " %s, dead fraction %s",
                sae["layer"],
                f"{summary['tokens']:,}",
                f"{(batches - start_batch) * tokens_per_batch:,}",
                elapsed,
                summary["tokens_per_s"],
                fixed(sae["final_fvu"], 4),
                fixed(sae["dead_fraction"], 4),
            )
    return summary


def sae_digest(weights: Path) -> str:
    """sae.sha256's text (`sha256sum -c` reads it): the small file that stands for the weights
    in the DAG. Snakemake compares only files under 1 MB by content, so maxact and evaluate
    take the weights as ancient() and this file as their content: an SAE republished from its
    finished checkpoint (same bytes, new mtime) reruns nothing downstream."""
    with open(weights, "rb") as f:
        return f"{hashlib.file_digest(f, 'sha256').hexdigest()}  {SAE_WEIGHTS}\n"
