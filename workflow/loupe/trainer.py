"""sparsify's Trainer with loupe's patches (the atomic save, the two resume fixes, the metrics
hook on each SAE forward and the step hook on each optimizer step), and the metrics recorder
those hooks feed.

Importing this module checks sparsify's version first (the patches are written for one):
loupe.train imports it only when a job trains."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .model import import_sparsify

sparsify = import_sparsify()  # before anything of sparsify's: the version check

from safetensors import safe_open  # noqa: E402
from schedulefree import ScheduleFreeWrapper  # noqa: E402

from .atomic import atomic_path, write_json  # noqa: E402
from .checkpoints import (  # noqa: E402
    OTHER,
    RECORDER_STATE,
    RUN_RECORD,
    UnreadableCheckpoint,
    swap_in,
    why_unreadable,
)
from .layout import SAE_WEIGHTS, TRAIN_METRICS  # noqa: E402

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
            self.saes[recorder.name].register_forward_hook(recorder.on_forward, with_kwargs=True)
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
            raise UnreadableCheckpoint(why_unreadable(e)) from e
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
                return f"{name}: {why_unreadable(e)}"
        return None
