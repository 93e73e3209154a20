"""Training a group of layers' SAEs (one layer, or several on one shared forward pass) with
sparsify's own Trainer, with a local metrics record per SAE and an exact resume from the last
checkpoint.

A group trains on one forward pass of the model cut after its deepest layer: sparsify runs
each SAE's forward and backward inside the hook of its layer, so the group pays one forward
and one SAE step per member, and each member sees exactly the activations, batches and
initialisation it would see trained alone (tests/test_groups.py).

Every patch to sparsify lives in one Trainer subclass (`_trainer_class`): the atomic save, the
two resume fixes, the metrics hook (each SAE forward) and the step hook (each optimizer step).

The checkpoint folder (results/checkpoints/layer_N, N the group's shallowest layer: not a rule
output, so it survives a killed job) holds:

    state/               the checkpoint: sparsify's files (one folder per hookpoint), plus
                         loupe_run.json (what made it) and, in each hookpoint's folder,
                         recorder_state.json (the metrics' running sums) and
                         train_metrics.jsonl (every line up to it)
    <hookpoint>/train_metrics.jsonl   this run's log of that SAE, restored from state/ on resume
    summary.json         the last finished run's numbers
    .other/              the previous checkpoint, made with other settings (see below)
    .unreadable/         the last checkpoint that could not be read

A checkpoint is resumed only if its loupe_run.json equals this run's: the output-changing train
settings (`config.settings_for("train")`), the group's layers and the sha256 of the token
split's content (from tokenize's manifest). No path or file size enters it: moving or copying
the project keeps every checkpoint, and tokens re-made with other settings (same size, other
content) never resume a checkpoint trained on the old ones. The layers enter it because one
checkpoint holds the whole group: a checkpoint of another grouping is set aside, never mixed
into this one (regrouping restarts the groups that are not finished).

Nothing is deleted before the new run has checked its settings (`check_train_settings`, at job
start, before the folder is touched). A checkpoint of other settings is then moved to .other/,
with one log line naming what changed, and deleted when the new run writes its first
checkpoint; changing the settings back before then resumes it (the two swap places). One slot,
not one per settings: a checkpoint holds the SAEs and their optimizer state, GBs per layer at
the flagship's size. A checkpoint with a file that cannot be read (each is read once before the
resume, so the line can name it) is moved to .unreadable/ with one warning line, and training
starts over.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path, write_json
from .config import Config, check_train_settings
from .errors import LoupeError
from .layout import MANIFEST, SAE_CFG, SAE_WEIGHTS, TRAIN_METRICS
from .model import get_hookpoint, import_sparsify, open_layer
from .tokens import open_split, read_manifest

log = logging.getLogger(__name__)

# In the checkpoint folder. STATE is sparsify's run name: its checkpoint folder.
STATE = "state"
OTHER = ".other"
UNREADABLE = ".unreadable"
_SWAP = ".swap"  # the current checkpoint while it trades places with .other
# In each checkpoint, beside sparsify's files.
RUN_RECORD = "loupe_run.json"
RECORDER_STATE = "recorder_state.json"


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


# --- settings the schema accepts but sparsify cannot train with --------------------------------


# --- what makes a checkpoint's result ---------------------------------------------------------


def run_identity(config: Config, layers: list[int], split: str, manifest: dict) -> dict:
    """What a checkpoint must match to be resumed: everything that changes the trained SAEs,
    and which SAEs it holds. `split` is the token split's name in the manifest ("train")."""
    return {
        "layers": sorted(layers),
        "settings": config.settings_for("train"),
        "train_tokens_sha256": manifest["sha256"][split],
    }


def _flat(record: dict) -> dict:
    """A run record as dotted keys ("sae.k", "layers"), settings without their prefix."""
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, "" if name == "settings" else f"{name}.")
            else:
                out[name] = value

    walk(record, "")
    return out


def describe_change(old: dict | None, new: dict) -> str:
    """Why a checkpoint with record `old` is not this run's: 'settings changed: sae.k 8 -> 4'."""
    if old is None:
        return "it has no record of the settings it was made with"
    a, b = _flat(old), _flat(new)

    def show(key, value):
        if key.endswith("sha256") and isinstance(value, str):
            return value[:12]
        return value if isinstance(value, str) else json.dumps(value)

    diffs = [
        f"{k} {show(k, a.get(k))} -> {show(k, b.get(k))}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]
    more = f"; and {len(diffs) - 3} more" if len(diffs) > 3 else ""
    return "settings changed: " + "; ".join(diffs[:3]) + more


# --- the checkpoint folder --------------------------------------------------------------------


def swap_in(new: Path, final: Path) -> None:
    """Replace folder `final` by `new`; at every instant one complete copy exists."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def _trade_places(current: Path, other: Path) -> None:
    """Swap checkpoint folders `current` (may be absent) and `other` by renames; a kill in
    between is finished by _finish_interrupted_moves."""
    parked = current.with_name(_SWAP)
    if current.exists():
        os.replace(current, parked)
    os.replace(other, current)
    if parked.exists():
        os.replace(parked, other)


def _finish_interrupted_moves(checkpoint_dir: Path) -> None:
    """Complete what a kill interrupted, so that no checkpoint is ever lost to one."""
    state, other, parked = (checkpoint_dir / n for n in (STATE, OTHER, _SWAP))
    if parked.exists():  # _trade_places: the checkpoint that was current is parked
        if not state.exists():
            os.replace(other, state)
        os.replace(parked, other)
    old = checkpoint_dir / f".{STATE}.old"  # swap_in: the previous checkpoint is `.state.old`
    if old.exists() and not state.exists():
        os.replace(old, state)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(checkpoint_dir / f".{STATE}.tmp", ignore_errors=True)  # a torn save


def _record_of(checkpoint: Path) -> dict | None:
    try:
        return json.loads((checkpoint / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return None


def _prepare_checkpoint_dir(checkpoint_dir: Path, identity: dict) -> bool:
    """True if checkpoint_dir/state is now a checkpoint of this run (resume it). A checkpoint
    of other settings is moved to .other/, never deleted here (see the module docstring)."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    _finish_interrupted_moves(checkpoint_dir)
    state, other = checkpoint_dir / STATE, checkpoint_dir / OTHER
    current = _record_of(state) if state.exists() else None
    if state.exists() and current == identity:
        return True
    if other.exists() and _record_of(other) == identity:
        log.info(
            "resuming checkpoint %s, set aside when the settings changed: they are back to its"
            " own%s",
            other,
            f"; {state} is set aside in its place" if state.exists() else "",
        )
        _trade_places(state, other)
        return True
    if state.exists():
        log.warning(
            "setting checkpoint %s aside as %s (%s); it is resumed if they change back before"
            " this run writes its first checkpoint",
            state,
            other,
            describe_change(current, identity),
        )
        shutil.rmtree(other, ignore_errors=True)
        os.replace(state, other)
    return False


class UnreadableCheckpoint(Exception):
    """A checkpoint file is missing, truncated or corrupt (the message says which)."""


def _why_unreadable(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "missing"
    text = str(error).strip()
    first = text.splitlines()[0].split(". ")[0][:160] if text else ""  # torch's: long
    # torch's unpickling errors advise weights_only=False, which would run any code the file
    # holds: never relay that advice about a file that is corrupt.
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in first:
        first = "not a file torch.save wrote"
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


# --- metrics ----------------------------------------------------------------------------------


@dataclass
class MetricsRecorder:
    """Builds one SAE's train_metrics.jsonl from its own forward outputs and the optimizer
    steps: sparsify 1.3.3 computes these only when logging to wandb. Its running sums go into
    every checkpoint, so the line after a resume averages the same batches as without one."""

    name: str  # the SAE's name in the Trainer: its hookpoint
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
        """After each SAE forward (one micro-batch)."""
        x = kwargs.get("x", args[0] if args else None)
        self.trained_tokens += 0 if x is None else x.shape[0]
        # Detached tensors: summing on the device avoids a GPU sync per micro-batch.
        for key in self.sums:
            self.sums[key] = self.sums[key] + getattr(out, key).detach()
        self.count += 1

    def on_step(self, trainer, final: bool = False) -> None:
        """After an optimizer step, before the trainer counts the batch just used; `final`
        at the end of fit(), when global_step already counts every batch."""
        batches = trainer.global_step + (not final)
        step = batches // self.grad_acc_steps
        if not self.count or (step % self.log_every and not final):
            return
        tokens = batches * self.tokens_per_batch
        now = time.perf_counter()
        since_fired = trainer.num_tokens_since_fired[self.name]
        row = {
            "step": step,
            "tokens": tokens,
            "trained_tokens": self.trained_tokens,
            **{k: float(v) / self.count for k, v in self.sums.items()},
            "dead_fraction": float((since_fired > self.dead_threshold).float().mean()),
            "lr": float(trainer.optimizers[0].param_groups[0]["lr"]),
            "tokens_per_s": (tokens - self._tokens0) / max(now - self._t0, 1e-9),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.last = row
        self.sums = dict.fromkeys(self.sums, 0.0)
        self.count = 0
        self._t0, self._tokens0 = now, tokens

    def save_state(self, checkpoint: Path) -> None:
        """Into a checkpoint being written (its SAE's folder): the counters, the sums not yet
        logged, the log."""
        # float() of a float32 sum is exact, so the restored sums continue bit for bit.
        state = {
            "trained_tokens": self.trained_tokens,
            "count": self.count,
            "sums": {k: float(v) for k, v in self.sums.items()},
        }
        write_json(checkpoint / RECORDER_STATE, state)
        if self.path.exists():
            shutil.copyfile(self.path, checkpoint / TRAIN_METRICS)
        else:
            (checkpoint / TRAIN_METRICS).touch()

    def restore(self, checkpoint: Path, batches: int) -> None:
        """Resume: the counters, sums and log lines as they were when `checkpoint` (its SAE's
        folder) was saved."""
        state = json.loads((checkpoint / RECORDER_STATE).read_text())
        lines = (checkpoint / TRAIN_METRICS).read_text().splitlines()
        self.last = json.loads(lines[-1]) if lines else {}
        self.trained_tokens, self.count = state["trained_tokens"], state["count"]
        self.sums = {k: float(state["sums"][k]) for k in self.sums}
        self._tokens0 = batches * self.tokens_per_batch
        with atomic_path(self.path) as tmp:
            shutil.copyfile(checkpoint / TRAIN_METRICS, tmp)


# --- sparsify's Trainer, patched --------------------------------------------------------------


def _trainer_class():
    """The Trainer subclass; built on first use, after import_sparsify checked the version
    the patches were written for."""
    sparsify = import_sparsify()
    from safetensors import safe_open
    from schedulefree import ScheduleFreeWrapper

    class LoupeTrainer(sparsify.Trainer):
        """sparsify 1.3.3's Trainer with an atomic save, an exact resume, and loupe's metrics.

        - save: a new folder swapped in whole, with loupe's record, sums and log inside; the
          in-loop global_step fix (1.3.3 saves before counting the batch just used, so a
          resume would replay it).
        - load_state: every file checked first (UnreadableCheckpoint names the bad one); the
          ScheduleFree train/eval mode fix.
        - metrics: a forward hook on each SAE (its own recorder) and a post-step hook on the
          first optimizer (every recorder)."""

        def __init__(self, cfg, dataset, model, recorders: list[MetricsRecorder], identity):
            super().__init__(cfg, dataset, model)
            self.recorders, self.identity = recorders, identity
            self.loaded_batches = -1  # the batch count of the checkpoint read, if any
            for recorder in recorders:
                self.saes[recorder.name].register_forward_hook(
                    recorder.on_forward, with_kwargs=True
                )
            # fit() steps its optimizers inline, with no Trainer method between a step and the
            # batch count, so hook the step itself with torch's post-step hook. ScheduleFree's
            # wrapper is no torch Optimizer: hook the optimizer it steps (the recorder reads
            # only the learning rate, which the two share).
            first = self.optimizers[0]
            stepped = first.base if isinstance(first, ScheduleFreeWrapper) else first
            stepped.register_step_post_hook(lambda *_: self._each_recorder("on_step", self))

        def _each_recorder(self, method: str, *args, **kwargs) -> None:
            for recorder in self.recorders:
                getattr(recorder, method)(*args, **kwargs)

        def save(self):
            in_loop = self.global_step < len(self.dataset) // self.cfg.batch_size
            if self.global_step + in_loop == self.loaded_batches:
                # Resumed at the end: the checkpoint on disk is this state already (writing
                # it again would only round ScheduleFree's weights through eval/train mode).
                return
            if not in_loop:
                # The save after the loop: log the last step first, so the checkpoint holds
                # every line and no pending sums (resuming it logs nothing twice).
                self._each_recorder("on_step", self, final=True)
            # 1.3.3 overwrites its checkpoint in place: a kill mid-save would leave a torn
            # one that every retry fails on. Write a new folder, then swap it in.
            root, final = Path(self.cfg.save_dir), self.cfg.run_name
            tmp = root / f".{final}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            # In-loop saves come before fit() counts the batch just used: save the true
            # count, or a resume would replay that batch.
            self.global_step += in_loop
            self.cfg.run_name = tmp.name
            try:
                super().save()
            finally:
                self.global_step -= in_loop
                self.cfg.run_name = final
            write_json(tmp / RUN_RECORD, self.identity)
            for recorder in self.recorders:
                recorder.save_state(tmp / recorder.name)
            swap_in(tmp, root / final)
            # This run has a checkpoint of its own: the one set aside when the settings
            # changed is no longer kept (at most two checkpoints per group, plus an
            # unreadable one).
            shutil.rmtree(root / OTHER, ignore_errors=True)

        def load_state(self, path: str):
            folder = Path(path)
            if problem := self._unreadable_file(folder):
                raise UnreadableCheckpoint(problem)
            # Checkpoints hold ScheduleFree's eval-mode weights (the average x), but 1.3.3
            # loads them into a wrapper in train mode, so training would go on from x instead
            # of y = lerp(x, z). Mark the wrappers as in eval mode; train() then restores y.
            schedule_free = [o for o in self.optimizers if isinstance(o, ScheduleFreeWrapper)]
            for opt in schedule_free:
                opt.train_mode = False
            try:
                super().load_state(path)
                for recorder in self.recorders:
                    recorder.restore(folder / recorder.name, self.global_step)
            except (torch.OutOfMemoryError, MemoryError):
                raise  # the device's problem, not the checkpoint's
            except Exception as e:
                raise UnreadableCheckpoint(_why_unreadable(e)) from e
            for opt in schedule_free:
                opt.train()
            self.loaded_batches = self.global_step

        def _unreadable_file(self, folder: Path) -> str | None:
            """'file: why' for the first file of checkpoint `folder` that cannot be read."""

            def torch_file(path):
                torch.load(path, map_location="cpu", weights_only=True)

            def safetensors_file(path):
                with safe_open(path, framework="pt"):
                    pass

            def json_file(path):
                json.loads(path.read_text())

            def json_lines(path):
                for line in path.read_text().splitlines():
                    json.loads(line)

            checks = [
                ("state.pt", torch_file),
                *((f"optimizer_{i}.pt", torch_file) for i in range(len(self.optimizers))),
                *((f"lr_scheduler_{i}.pt", torch_file) for i in range(len(self.lr_schedulers))),
                *((p.name, torch_file) for p in sorted(folder.glob("rank_*_state.pt"))),
                *((f"{name}/{SAE_WEIGHTS}", safetensors_file) for name in self.saes),
                *((f"{name}/{RECORDER_STATE}", json_file) for name in self.saes),
                *((f"{name}/{TRAIN_METRICS}", json_lines) for name in self.saes),
            ]
            for name, read in checks:
                try:
                    with warnings.catch_warnings():  # torch's notes on odd pickles: noise here
                        warnings.simplefilter("ignore")
                        read(folder / name)
                except Exception as e:
                    return f"{name}: {_why_unreadable(e)}"
            return None

    return LoupeTrainer


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
    manifest = read_manifest(manifest_path)
    tokens = open_split(tokens_path, manifest)
    identity = run_identity(config, layers, tokens_path.stem, manifest)
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
            rows=len(tokens),
            vocab=model.get_input_embeddings().num_embeddings,
        )
    dataset = ShuffledRows(tokens, config.train.shuffle_seed)
    resume = _prepare_checkpoint_dir(checkpoint_dir, identity)
    if len(layers) > 1:
        log.info("%s: one shared forward pass, one SAE each", _named(layers))

    def new_trainer():
        cfg = train_config(config, layers, checkpoint_dir)
        recorders = [
            MetricsRecorder(
                name=hookpoint,
                path=checkpoint_dir / hookpoint / TRAIN_METRICS,
                log_every=config.train.log_every,
                tokens_per_batch=cfg.batch_size * tokens.shape[1],
                grad_acc_steps=cfg.grad_acc_steps,
                dead_threshold=cfg.dead_feature_threshold,
            )
            for hookpoint in hookpoints
        ]
        return _trainer_class()(cfg, dataset, model, recorders, identity)

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
            (SAE_WEIGHTS, saved / SAE_WEIGHTS),  # last: the rule's main target
        ):
            with atomic_path(out / name) as tmp:
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
                _fmt(sae["final_fvu"]),
                _fmt(sae["dead_fraction"]),
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
                _fmt(sae["final_fvu"]),
                _fmt(sae["dead_fraction"]),
            )
    return summary


def train_layer(
    config: Config,
    layer: int,
    tokens: Path,
    out_dir: Path,
    checkpoint_dir: Path,
    threads: int = 1,
    manifest: Path | None = None,
) -> dict:
    """Train layer `layer`'s SAE alone (a group of one): writes sae.safetensors, cfg.json,
    train_metrics.jsonl into `out_dir`. `manifest` defaults to the one beside `tokens`."""
    manifest = Path(tokens).with_name(MANIFEST) if manifest is None else manifest
    summary = train_group(config, [layer], tokens, manifest, [out_dir], checkpoint_dir, threads)
    (sae,) = summary.pop("saes")
    del summary["layers"]
    return summary | sae


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"
