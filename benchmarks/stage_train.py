"""Training: loupe's `train` rule code (truncated forward, or with truncation switched off),
and sparsify's Trainer used the plainest way, on the same model, tokens and settings. Each
batch is timed by the moment the trainer fetches it (see timing.BatchClock)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import loupe.train as loupe_train
from loupe.model import import_sparsify, model_dtype, resolve_device
from loupe.settings import hookpoint
from loupe.tokens import open_split

from .stage_floor import measure
from .timing import BatchClock


def _timed_rows_class(clock: BatchClock):
    class TimedRows(loupe_train.ShuffledRows):
        def __getitem__(self, i: int) -> dict:
            clock.row_fetched(i)
            return super().__getitem__(i)

    return TimedRows


def run_ours(spec: dict) -> dict:
    """`loupe.train.train_layer` as the rule runs it; `truncate: false` keeps every layer."""
    s = spec["settings"]
    clock = BatchClock(s["train"]["batch_size"])
    # The benchmark swaps in a timed dataset, and for the full-forward variant a no-op
    # truncation; everything else is the rule's own code path.
    loupe_train.ShuffledRows = _timed_rows_class(clock)
    if not spec["truncate"]:
        loupe_train.truncate_after = lambda model, hookpoint: -1
    out = Path(spec["out_dir"])
    summary = loupe_train.train_layer(
        s, spec["layer"], Path(spec["tokens"]), out / "sae", out / "checkpoint", spec["threads"]
    )
    layers_run = spec["layer"] + 1 if spec["truncate"] else len(s["model"]["layers"])
    return _result(clock, spec, summary.get("final_fvu"), layers_run)


def run_sparsify(spec: dict) -> dict:
    """sparsify's Trainer the plainest way: the model as AutoModel loads it, no truncation,
    hookpoints either the one layer or every layer. Same TrainConfig otherwise."""
    import torch
    from transformers import AutoModel

    s = spec["settings"]
    sparsify = import_sparsify()
    device = resolve_device(s["device"])
    if device.type == "cpu":
        torch.set_num_threads(max(1, spec["threads"]))
    model = AutoModel.from_pretrained(s["model"]["name"], dtype=model_dtype(device)).to(device)
    out = Path(spec["out_dir"])
    cfg = loupe_train.train_config(s, spec["layer"], out / "checkpoint")
    if spec["hookpoints"] == "all":
        cfg = dataclasses.replace(cfg, hookpoints=[hookpoint(s, i) for i in s["model"]["layers"]])
    clock = BatchClock(cfg.batch_size)
    dataset = _timed_rows_class(clock)(
        open_split(spec["tokens"]), s["train"].get("shuffle_seed", 0)
    )
    sparsify.Trainer(cfg, dataset, model).fit()
    del model
    return _result(clock, spec, None, len(s["model"]["layers"]))


def _result(clock: BatchClock, spec: dict, fvu, layers_run: int) -> dict:
    s = spec["settings"]
    t = s["train"]
    ctx_len = open_split(spec["tokens"]).shape[1]
    # The floor right after, under the same machine load: the layers the hooked layer needs
    # (and those this variant ran).
    prefixes = [spec["layer"] + 1, layers_run]
    floor = measure(s, spec["tokens"], t["batch_size"], prefixes, spec["floor_runs"])
    return {
        "floor": floor,
        "layers_run": layers_run,
        **clock.steps(t["grad_acc_steps"], spec["warmup_steps"]),
        "tokens_per_batch": t["batch_size"] * ctx_len,
        "grad_acc_steps": t["grad_acc_steps"],
        "final_fvu": fvu,
        "peak_rss_mb": clock.peak_rss_mb,
    }
