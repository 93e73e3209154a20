"""The whole suite in one forward: every layer's SAE spliced in at once, and its prefixes (the
SAEs of the first layers only), so errors that compound with depth show. Per-layer delta-CE
(loupe.evaluate) splices one layer into an otherwise clean model; here each spliced layer
reconstructs the activations that the layers before it, themselves spliced, produced.

Same positions and same loss as evaluate: BOS/EOS/PAD are never replaced, CE and KL are taken
at the other positions predicting the next token, logits a chunk of positions at a time.
Writes results/summary/spliced.json (keys in loupe.metrics.SPLICED_COLUMNS)."""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from .atomic import write_json
from .config import Config
from .errors import LoupeError
from .evaluate import (
    LogitHead,
    final_hidden,
    keep_mask,
    reconstruct,
    replaced_output,
    run_losses,
)
from .gpus import select_device
from .model import get_hookpoint, hidden_size, load_model, load_sae
from .progress import progress
from .tokens import open_split, read_tokens_manifest, special_ids

log = logging.getLogger(__name__)


def _spliced_in(sae, mask: torch.Tensor):
    """fn(h) -> h with its rows at `mask` replaced by the SAE's reconstruction of them."""

    def splice(h: torch.Tensor) -> torch.Tensor:
        out = h.clone()
        out[mask] = reconstruct(sae, h[mask].float())[0].to(h.dtype)
        return out

    return splice


@torch.inference_mode()
def splice_suite(
    model,
    saes: list,
    hookpoints: list[str],
    tokens: np.ndarray,
    special: list[int],
    max_tokens: int,
    batch_size: int,
    logit_chunk: int,
) -> dict:
    """CE and KL of the model with the SAEs of hookpoints[:i+1] spliced in, for every i (the
    last: the whole suite), against the clean model, on token rows [rows, ctx_len] (at most
    max_tokens tokens, whole rows). Per batch: one clean forward, one per prefix."""
    if len(saes) != len(hookpoints) or not saes:
        raise LoupeError(f"{len(saes)} SAEs for {len(hookpoints)} hookpoints")
    rows = min(len(tokens), max(1, math.ceil(max_tokens / tokens.shape[1])))
    modules = [get_hookpoint(model, hp) for hp in hookpoints]
    head = LogitHead.of(model)
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    positions = 0
    bar = progress(total=rows, desc=f"splice {len(saes)} layers", unit="row")
    for start in range(0, rows, batch_size):
        ids = torch.from_numpy(tokens[start : min(start + batch_size, rows)].astype(np.int64))
        ids = ids.to(device)
        mask = keep_mask(ids, special)
        at = mask.clone()
        at[:, -1] = False  # position t predicts token t+1: the last has no target
        clean = final_hidden(model, ids)[at]
        runs = {}
        for i in range(len(saes)):
            with ExitStack() as hooks:
                for module, sae in zip(modules[: i + 1], saes[: i + 1], strict=True):
                    hooks.enter_context(replaced_output(module, _spliced_in(sae, mask)))
                runs[str(i)] = final_hidden(model, ids)[at]
        targets = ids[:, 1:][at[:, :-1]]
        for key, value in run_losses(head, clean, runs, targets, logit_chunk).items():
            sums[key] = sums.get(key, 0.0) + value
        positions += len(targets)
        bar.update(len(ids))
    bar.close()
    if not positions:
        raise LoupeError("no positions to evaluate: every eval token is BOS/EOS/PAD")
    clean_ce = sums["ce_clean"] / positions
    prefixes = [
        {
            "spliced_layers": i + 1,
            "last_hookpoint": hookpoints[i],
            "ce_loss_spliced": sums[f"ce_{i}"] / positions,
            "delta_ce": sums[f"ce_{i}"] / positions - clean_ce,
            "kl": sums[f"kl_{i}"] / positions,
        }
        for i in range(len(saes))
    ]
    return {
        "ce_loss_clean": clean_ce,
        "suite": prefixes[-1],
        "prefixes": prefixes,
        "rows": rows,
        "ce_tokens": positions,
    }


def splice_job(
    config: Config,
    sae: list[Path],
    tokens: Path,
    manifest: Path,
    spliced: Path,
    threads: int = 1,
) -> dict:
    """The rule's job: every layer's SAE (`sae`, in model.layers order) spliced into the model
    on the eval split; writes `spliced` (spliced.json)."""
    layers = config.model.layers
    if len(sae) != len(layers):
        raise LoupeError(f"{len(sae)} SAEs given for the {len(layers)} layers of model.layers")
    # Prefixes go by depth, whatever order model.layers lists them in.
    layers, sae = map(list, zip(*sorted(zip(layers, sae, strict=True)), strict=True))
    info = read_tokens_manifest(manifest)
    split = open_split(Path(tokens), info)  # before the model: fails fast
    device = select_device(config.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, threads))
    model_config = config.model
    saes = [load_sae(p, device) for p in sae]
    model = load_model(
        model_config.name, device, model_config.revision, model_config.dtype, head=True
    )
    for path, s in zip(sae, saes, strict=True):
        if s.d_in != hidden_size(model):
            raise LoupeError(
                f"the SAE in {path} reads {s.d_in}-dim activations, but {model_config.name} has hidden"
                f" size {hidden_size(model)}: it was trained on another model"
            )
    hookpoints = [model_config.hookpoint_of(layer) for layer in layers]
    evaluate_config = config.evaluate
    log.info("splicing %d SAEs into %s on %s (%s)", len(saes), model_config.name, device, tokens)
    t0 = time.perf_counter()
    measured = splice_suite(
        model,
        saes,
        hookpoints,
        split,
        special_ids(info),
        evaluate_config.spliced_max_tokens,
        evaluate_config.batch_size,
        evaluate_config.logit_chunk,
    )
    for prefix, layer in zip(measured["prefixes"], layers, strict=True):
        prefix["last_layer"] = layer
    elapsed = time.perf_counter() - t0
    result = {
        "layers": layers,
        **measured,
        "seconds": round(elapsed, 2),
        "split": str(tokens),
        "config": config.settings_for("spliced"),
    }
    write_json(spliced, result)
    suite = measured["suite"]
    log.info(
        "%d layers spliced: CE %.4f (clean %.4f, delta %+.4f), KL %.4f over %s tokens in %.1fs",
        len(layers),
        suite["ce_loss_spliced"],
        measured["ce_loss_clean"],
        suite["delta_ce"],
        suite["kl"],
        f"{measured['ce_tokens']:,}",
        elapsed,
    )
    return result
