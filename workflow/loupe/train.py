"""Training one layer's SAE with sparsify's own Trainer, with a local metrics record and
resume from the last checkpoint."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import LoupeError
from .io import atomic_path, write_json
from .model import import_sparsify, load_text_model, resolve_device, truncate_after
from .settings import TRAIN_CONFIG_FIELDS
from .settings import hookpoint as hookpoint_of
from .tokens import open_split

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


# sparsify's checkpoint inside the per-layer checkpoint folder; loupe's fingerprint and the
# metrics log sit beside it.
STATE = "state"


def train_config(settings: dict, layer: int, checkpoint_dir: Path):
    sparsify = import_sparsify()
    sae = sparsify.SparseCoderConfig(**settings["sae"])
    train = {k: v for k, v in settings["train"].items() if k in TRAIN_CONFIG_FIELDS}
    return sparsify.TrainConfig(
        sae=sae,
        hookpoints=[hookpoint_of(settings, layer)],
        save_dir=str(checkpoint_dir),
        run_name=STATE,
        **train,
    )


def _make_trainer_class():
    sparsify = import_sparsify()
    from schedulefree import ScheduleFreeWrapper

    class ResumableTrainer(sparsify.Trainer):
        """sparsify's Trainer with an exact resume (two fixes to 1.3.3's checkpoints).

        In-loop checkpoints are written before `global_step` counts the batch just used, so
        1.3.3 would replay that batch on resume; the final save comes after the increment.
        Saving the true count keeps a resumed run on exactly the same batches."""

        on_save: tuple = ()  # callbacks(folder) that add loupe's own state to a checkpoint

        def save(self):
            # 1.3.3 overwrites its checkpoint in place: a kill mid-save would leave a torn
            # one that every retry fails on. Write a new folder, then swap it in.
            root, final = Path(self.cfg.save_dir), self.cfg.run_name
            tmp = root / f".{final}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            in_loop = self.global_step < len(self.dataset) // self.cfg.batch_size
            self.global_step += in_loop
            self.cfg.run_name = tmp.name
            try:
                super().save()
            finally:
                self.global_step -= in_loop
                self.cfg.run_name = final
            for callback in self.on_save:
                callback(tmp)
            swap_in(tmp, root / final)

        def load_state(self, path: str):
            # Checkpoints hold ScheduleFree's eval-mode weights (the average x), but 1.3.3
            # loads them into a wrapper in train mode, so training would go on from x instead
            # of y = lerp(x, z). Mark the wrappers as in eval mode; train() then restores y.
            schedule_free = [o for o in self.optimizers if isinstance(o, ScheduleFreeWrapper)]
            for opt in schedule_free:
                opt.train_mode = False
            super().load_state(path)
            for opt in schedule_free:
                opt.train()

    return ResumableTrainer


@dataclass
class MetricsRecorder:
    """Builds train_metrics.jsonl from the SAE's own forward outputs and optimizer steps:
    sparsify 1.3.3 computes these only when logging to wandb."""

    path: Path
    log_every: int
    tokens_per_batch: int
    grad_acc_steps: int
    dead_threshold: int
    sums: dict = field(
        default_factory=lambda: {"fvu": 0.0, "multi_topk_fvu": 0.0, "auxk_loss": 0.0}
    )
    count: int = 0
    trained_tokens: int = 0  # activations the SAE saw: excluded tokens (BOS) never count
    last: dict = field(default_factory=dict)
    _t0: float = field(default_factory=time.perf_counter)
    _tokens0: int = 0

    def on_forward(self, _module, args, kwargs, out) -> None:
        x = kwargs.get("x", args[0] if args else None)
        self.trained_tokens += 0 if x is None else x.shape[0]
        # Detached tensors: summing on the device avoids a GPU sync per micro-batch.
        for key in self.sums:
            self.sums[key] = self.sums[key] + getattr(out, key).detach()
        self.count += 1

    def on_step(self, trainer, optimizer, final: bool = False) -> None:
        # Called after optimizer.step(), before the trainer counts the batch just used;
        # `final` after fit(), when global_step already counts every batch.
        batches = trainer.global_step + (not final)
        step = batches // self.grad_acc_steps
        if not self.count or (step % self.log_every and not final):
            return
        tokens = batches * self.tokens_per_batch
        now = time.perf_counter()
        since_fired = next(iter(trainer.num_tokens_since_fired.values()))
        row = {
            "step": step,
            "tokens": tokens,
            "trained_tokens": self.trained_tokens,
            **{k: float(v) / self.count for k, v in self.sums.items()},
            "dead_fraction": float((since_fired > self.dead_threshold).float().mean()),
            "lr": float(optimizer.param_groups[0]["lr"]),
            "tokens_per_s": (tokens - self._tokens0) / max(now - self._t0, 1e-9),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.last = row
        self.sums = dict.fromkeys(self.sums, 0.0)
        self.count = 0
        self._t0, self._tokens0 = now, tokens

    def save_state(self, checkpoint: Path) -> None:
        write_json(checkpoint / "recorder_state.json", {"trained_tokens": self.trained_tokens})

    def start_at(self, tokens: int, step: int) -> None:
        """Resume: restore counters and forget lines past the checkpoint (logged again)."""
        self._tokens0 = tokens
        state = self.path.parent / STATE / "recorder_state.json"
        if state.exists():
            self.trained_tokens = json.loads(state.read_text())["trained_tokens"]
        if not self.path.exists():
            return
        lines = [ln for ln in self.path.read_text().splitlines() if json.loads(ln)["step"] <= step]
        self.last = json.loads(lines[-1]) if lines else {}
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(ln + "\n" for ln in lines))


def _fingerprint(settings: dict, layer: int, tokens_path: Path) -> str:
    """What a checkpoint must match to be resumed: settings, layer and the token split."""
    stat = tokens_path.stat()
    blob = json.dumps([settings, layer, str(tokens_path.resolve()), stat.st_size], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def swap_in(new: Path, final: Path) -> None:
    """Replace folder `final` by `new`; at every instant one complete copy exists."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def _recover_swap(checkpoint_dir: Path) -> None:
    """A kill between swap_in's two renames leaves the previous checkpoint as `.state.old`."""
    old = checkpoint_dir / f".{STATE}.old"
    if old.exists() and not (checkpoint_dir / STATE).exists():
        os.replace(old, checkpoint_dir / STATE)


def _prepare_checkpoint_dir(checkpoint_dir: Path, fingerprint: str) -> bool:
    """True if checkpoint_dir holds a resumable checkpoint of this exact run."""
    stamp = checkpoint_dir / "loupe_fingerprint"
    _recover_swap(checkpoint_dir)
    if (
        (checkpoint_dir / STATE / "state.pt").exists()
        and stamp.exists()
        and stamp.read_text() == fingerprint
    ):
        return True
    if (checkpoint_dir / STATE).exists():
        log.info("discarding checkpoint %s: it belongs to other settings", checkpoint_dir)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    checkpoint_dir.mkdir(parents=True)
    stamp.write_text(fingerprint)
    return False


def train_layer(
    settings: dict,
    layer: int,
    tokens_path: Path,
    out_dir: Path,
    checkpoint_dir: Path,
    threads: int = 1,
) -> dict:
    """Train layer `layer`'s SAE; writes sae.safetensors, cfg.json, train_metrics.jsonl."""
    if layer not in settings["model"].get("layers", [layer]):
        raise LoupeError(f"layer {layer} is not in model.layers {settings['model']['layers']}")
    device = resolve_device(settings["device"])
    if device.type == "cpu":
        torch.set_num_threads(max(1, threads))
    tokens = open_split(tokens_path)
    hookpoint = hookpoint_of(settings, layer)
    train = settings["train"]
    cfg = train_config(settings, layer, checkpoint_dir)
    model = load_text_model(settings["model"]["name"], device, settings["model"].get("revision"))
    kept = truncate_after(model, hookpoint)
    log.info(
        "layer %d: hookpoint %s, running %d decoder layers on %s", layer, hookpoint, kept, device
    )
    if max(cfg.exclude_tokens, default=-1) >= (
        vocab := model.get_input_embeddings().num_embeddings
    ):
        raise LoupeError(
            f"train.exclude_tokens {cfg.exclude_tokens} outside the vocabulary ({vocab})"
        )

    dataset = ShuffledRows(tokens, train.get("shuffle_seed", 0))
    if len(dataset) < cfg.batch_size:
        raise LoupeError(
            f"training split has {len(dataset)} rows, fewer than batch_size {cfg.batch_size}"
        )
    resume = _prepare_checkpoint_dir(checkpoint_dir, _fingerprint(settings, layer, tokens_path))
    trainer = _make_trainer_class()(cfg, dataset, model)

    recorder = MetricsRecorder(
        path=checkpoint_dir / "train_metrics.jsonl",
        log_every=train.get("log_every", 10),
        tokens_per_batch=cfg.batch_size * tokens.shape[1],
        grad_acc_steps=cfg.grad_acc_steps,
        dead_threshold=cfg.dead_feature_threshold,
    )
    trainer.on_save = (recorder.save_state,)
    if resume:
        trainer.load_state(str(checkpoint_dir / STATE))
        log.info("resumed layer %d at batch %d from %s", layer, trainer.global_step, checkpoint_dir)
        recorder.start_at(
            trainer.global_step * recorder.tokens_per_batch,
            trainer.global_step // cfg.grad_acc_steps,
        )
    elif recorder.path.exists():
        recorder.path.unlink()
    start_batch = trainer.global_step

    sae = trainer.saes[hookpoint]
    sae.register_forward_hook(recorder.on_forward, with_kwargs=True)
    for opt in trainer.optimizers[:1]:
        step = opt.step

        def step_and_record(*args, _step=step, _opt=opt, **kwargs):
            result = _step(*args, **kwargs)
            recorder.on_step(trainer, _opt)
            return result

        opt.step = step_and_record

    recorder.path.touch()
    t0 = time.perf_counter()
    trainer.fit()
    elapsed = time.perf_counter() - t0
    recorder.on_step(trainer, trainer.optimizers[0], final=True)  # the last step, if unlogged

    # sparsify's final save holds the ScheduleFree-averaged weights: publish those files.
    saved = checkpoint_dir / STATE / hookpoint
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, src in (
        ("cfg.json", saved / "cfg.json"),
        ("train_metrics.jsonl", recorder.path),
        ("sae.safetensors", saved / "sae.safetensors"),  # last: the rule's main target
    ):
        with atomic_path(out_dir / name) as tmp:
            shutil.copyfile(src, tmp)

    batches = trainer.global_step
    summary = {
        "layer": layer,
        "hookpoint": hookpoint,
        "device": str(device),
        "batches": batches,
        "tokens": batches * recorder.tokens_per_batch,
        "resumed_from_batch": start_batch,
        "seconds": round(elapsed, 2),
        "tokens_per_s": (batches - start_batch) * recorder.tokens_per_batch / max(elapsed, 1e-9),
        "final_fvu": recorder.last.get("fvu"),
        "dead_fraction": recorder.last.get("dead_fraction"),
    }
    write_json(checkpoint_dir / "summary.json", summary)
    log.info(
        "trained layer %d: %s tokens in %.1fs (%.0f tokens/s), final fvu %s, dead fraction %s",
        layer,
        f"{summary['tokens']:,}",
        elapsed,
        summary["tokens_per_s"],
        _fmt(summary["final_fvu"]),
        _fmt(summary["dead_fraction"]),
    )
    return summary


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"
