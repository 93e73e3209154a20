"""Per-layer evaluation on the held-out eval split: how well the SAE reconstructs the layer
(FVU, explained variance, cosine, L0), what splicing it into the model costs in next-token loss
(CE clean / spliced / zero-ablated, loss recovered, KL), and the dead and dense fractions from
the sample pass's feature stats.

Every metric covers the same positions: those whose token is not BOS, EOS or PAD. Only those
positions are replaced (by the reconstruction, or by zeros for the ablation baseline), so the
attention sink at BOS is never disturbed; CE and KL are taken at those positions, predicting
the next token."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import LoupeError
from .io import write_json
from .model import (
    _NON_TEXT_MODULES,
    get_hookpoint,
    hidden_size,
    import_sparsify,
    model_dtype,
    resolve_device,
    text_config,
)
from .progress import progress
from .settings import hookpoint as hookpoint_of
from .settings import pick
from .tokens import open_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSpec:
    batch_size: int = 4
    max_tokens: int = 1_048_576
    logit_chunk: int = 256
    dense_threshold: float = 0.1

    @classmethod
    def from_settings(cls, settings: dict) -> EvalSpec:
        return pick(cls, settings.get("evaluate"))


# --- the model with its LM head ------------------------------------------------------------


def load_causal_lm(name: str, device: torch.device, revision: str | None = None):
    """The language model with its LM head (Gemma 4: Gemma4ForConditionalGeneration), text
    tower only, frozen, eval mode; like `model.load_text_model`, which has no head."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, revision=revision, dtype=model_dtype(device)
        )
    except Exception as e:
        raise LoupeError(f"cannot load model {name!r}: {type(e).__name__}: {e}") from e
    for owner in (model, model.base_model):
        for attr in _NON_TEXT_MODULES:
            if isinstance(getattr(owner, attr, None), nn.Module):
                setattr(owner, attr, None)
    for cfg in (model.config, text_config(model)):
        cfg.use_cache = False  # one full-sequence pass per batch: a KV cache is overhead
    if model.get_output_embeddings() is None:
        raise LoupeError(f"model {name!r} has no LM head: cannot compute next-token loss")
    model.requires_grad_(False)
    return model.eval().to(device)


@dataclass
class LogitHead:
    """The model's LM head and final logit softcapping, applied to a few positions at a time
    so that [positions, vocab] logits stay small (262k vocab on Gemma 4)."""

    head: nn.Module
    softcap: float | None = None

    @classmethod
    def of(cls, model) -> LogitHead:
        # Gemma 2/3/4 soft-cap their logits: tanh(logits / cap) * cap (modeling_gemma4.py).
        cap = getattr(text_config(model), "final_logit_softcapping", None)
        return cls(model.get_output_embeddings(), cap)

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, d] final hidden states -> [n, vocab] float32 log-probabilities."""
        logits = self.head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.log_softmax(-1)


def final_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states (final norm applied, before the LM head): [batch, seq, d]."""
    return model.base_model(input_ids=input_ids).last_hidden_state


@contextmanager
def replaced_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator:
    """While active, `module`'s output tensor h ([batch, seq, d]) is replaced by fn(h)."""

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def keep_mask(input_ids: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
    """[batch, seq] True at positions the metrics cover (token not BOS/EOS/PAD)."""
    special = torch.tensor(special_ids, dtype=input_ids.dtype, device=input_ids.device)
    return ~torch.isin(input_ids, special)


# --- reconstruction metrics ----------------------------------------------------------------


def reconstruct(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The SAE's k-latent reconstruction of x [n, d_in] (float32), and the number of nonzero
    latents per row [n]. Not `sae.forward`: with multi_topk its output uses 4k latents."""
    enc = sae.encode(x)
    # TopK (and groupmax) select exactly k latents per token; anything else is a bug.
    assert enc.top_indices.shape[-1] == sae.cfg.k, (enc.top_indices.shape, sae.cfg.k)
    recon = sae.decode(enc.top_acts, enc.top_indices)
    if getattr(sae, "W_skip", None) is not None:
        recon = recon + x.to(sae.dtype) @ sae.W_skip.mT
    return recon, (enc.top_acts > 0).sum(-1)


@dataclass
class _Moments:
    """Count, mean [d] and summed squared deviation (over all dims) of rows seen so far,
    merged batch by batch (Chan et al.) in float64: no cancellation from a large mean."""

    n: int = 0
    mean: torch.Tensor | None = None
    m2: float = 0.0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.double()
        nb = rows.shape[0]
        if nb == 0:
            return
        mean_b = rows.mean(0)
        m2_b = float((rows - mean_b).pow(2).sum())
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mean_b, m2_b
            return
        n = self.n + nb
        delta = mean_b - self.mean
        self.m2 += m2_b + float(delta.pow(2).sum()) * self.n * nb / n
        self.mean = self.mean + delta * (nb / n)
        self.n = n


@dataclass
class ReconStats:
    """Running reconstruction statistics over every evaluated position."""

    x: _Moments = field(default_factory=_Moments)
    err: _Moments = field(default_factory=_Moments)
    sq_err: float = 0.0
    cos: float = 0.0
    l0: float = 0.0

    def add(self, x: torch.Tensor, recon: torch.Tensor, active: torch.Tensor) -> None:
        """x, recon: [n, d]; active: [n] nonzero latents per row."""
        err = (x - recon).double()
        self.x.add(x)
        self.err.add(err)
        self.sq_err += float(err.pow(2).sum())
        self.cos += float(F.cosine_similarity(x.double(), recon.double(), dim=-1).sum())
        self.l0 += float(active.sum())

    @property
    def n(self) -> int:
        return self.x.n

    def result(self) -> dict:
        if not self.n:
            raise LoupeError("no positions to evaluate: every eval token is BOS/EOS/PAD")
        return {
            # sparsify's fvu: summed squared error over the inputs' total variance.
            "fvu": self.sq_err / self.x.m2,
            # The error's own variance (its mean removed) over the inputs' variance.
            "explained_variance": 1.0 - self.err.m2 / self.x.m2,
            "cosine": self.cos / self.n,
            "l0": self.l0 / self.n,
        }


# --- next-token loss -----------------------------------------------------------------------

_LOSS_KEYS = ("ce_clean", "ce_spliced", "ce_zero", "kl", "kl_zero")


def next_token_losses(
    head: LogitHead,
    clean: torch.Tensor,
    spliced: torch.Tensor,
    zero: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
) -> dict[str, float]:
    """Summed CE of the three runs and summed KL(clean || spliced), KL(clean || zero) over
    n positions. clean/spliced/zero: [n, d] final hidden states; targets: [n] next tokens.
    Logits exist for `chunk` positions at a time only."""
    sums = dict.fromkeys(_LOSS_KEYS, 0.0)
    for start in range(0, len(targets), chunk):
        part = slice(start, start + chunk)
        t = targets[part, None]
        lp_clean = head.log_probs(clean[part])
        p_clean = lp_clean.exp()
        # KL(p || q) = sum p log p - sum p log q; the first term is shared by both runs.
        neg_entropy = float((p_clean * lp_clean).sum())
        sums["ce_clean"] -= float(lp_clean.gather(-1, t).sum())
        del lp_clean
        for name, hidden in (("spliced", spliced), ("zero", zero)):
            lp = head.log_probs(hidden[part])
            sums[f"ce_{name}"] -= float(lp.gather(-1, t).sum())
            sums["kl" if name == "spliced" else "kl_zero"] += neg_entropy - float(
                (p_clean * lp).sum()
            )
            del lp
    return sums


def loss_metrics(sums: dict[str, float], n: int) -> dict:
    clean, spliced, zero = (sums[k] / n for k in ("ce_clean", "ce_spliced", "ce_zero"))
    recoverable = zero - clean
    if recoverable <= 0:
        log.warning(
            "zero ablation does not raise the loss (clean %.4f, zero-ablated %.4f): "
            "ce_loss_score is undefined",
            clean,
            zero,
        )
    return {
        "ce_loss_clean": clean,
        "ce_loss_spliced": spliced,
        "delta_ce": spliced - clean,
        "ce_loss_zero_ablation": zero,
        # Share of the loss lost by zero ablation that the SAE recovers (1: lossless).
        "ce_loss_score": (zero - spliced) / recoverable if recoverable > 0 else None,
        "kl": sums["kl"] / n,
        "kl_zero_ablation": sums["kl_zero"] / n,
    }


# --- one SAE on the eval split -------------------------------------------------------------


@torch.inference_mode()
def evaluate_sae(
    model,
    sae,
    hookpoint: str,
    tokens: np.ndarray,
    special_ids: list[int],
    spec: EvalSpec,
) -> dict:
    """Reconstruction and loss metrics of `sae` at `hookpoint` on token rows [rows, ctx_len]
    (at most spec.max_tokens tokens, whole rows). Three passes per batch: clean, with the
    reconstruction spliced in, and with the positions zeroed."""
    rows = min(len(tokens), max(1, math.ceil(spec.max_tokens / tokens.shape[1])))
    module = get_hookpoint(model, hookpoint)
    head = LogitHead.of(model)
    device = next(model.parameters()).device
    recon_stats = ReconStats()
    loss_sums = dict.fromkeys(_LOSS_KEYS, 0.0)
    loss_positions = 0
    mask: torch.Tensor | None = None  # this batch's keep mask, read by the hooks

    def splice(h: torch.Tensor) -> torch.Tensor:
        x = h[mask].float()
        recon, active = reconstruct(sae, x)
        recon_stats.add(x, recon, active)
        out = h.clone()
        out[mask] = recon.to(h.dtype)
        return out

    def ablate(h: torch.Tensor) -> torch.Tensor:
        return h.masked_fill(mask[..., None], 0)

    bar = progress(total=rows, desc=f"evaluate {hookpoint}", unit="row")
    for start in range(0, rows, spec.batch_size):
        ids = torch.from_numpy(tokens[start : min(start + spec.batch_size, rows)].astype(np.int64))
        ids = ids.to(device)
        mask = keep_mask(ids, special_ids)
        clean = final_hidden(model, ids)
        with replaced_output(module, splice):
            spliced = final_hidden(model, ids)
        with replaced_output(module, ablate):
            zero = final_hidden(model, ids)
        # Position t predicts token t+1: the last position has no target.
        at = mask.clone()
        at[:, -1] = False
        targets = ids[:, 1:][at[:, :-1]]
        sums = next_token_losses(head, clean[at], spliced[at], zero[at], targets, spec.logit_chunk)
        for k, v in sums.items():
            loss_sums[k] += v
        loss_positions += len(targets)
        bar.update(len(ids))
    bar.close()
    if not loss_positions:
        raise LoupeError("no positions to evaluate: every eval token is BOS/EOS/PAD")
    return {
        **recon_stats.result(),
        **loss_metrics(loss_sums, loss_positions),
        "k": sae.cfg.k,
        "num_latents": sae.num_latents,
        "rows": rows,
        "tokens": recon_stats.n,
        "ce_tokens": loss_positions,
    }


# --- feature stats -------------------------------------------------------------------------


def feature_fractions(fire_count: np.ndarray, density: np.ndarray, dense_threshold: float):
    """Dead fraction (never fired on the sample split) and dense fraction (fires on more than
    `dense_threshold` of the sample tokens)."""
    return {
        "dead_fraction": float(np.mean(fire_count == 0)),
        "dense_fraction": float(np.mean(density > dense_threshold)),
    }


def read_feature_stats(path: Path, num_latents: int) -> tuple[np.ndarray, np.ndarray]:
    """fire_count and density per feature, in feature order, from maxact's parquet table."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["feature", "fire_count", "density"])
    except FileNotFoundError:
        raise LoupeError(f"feature stats not found: {path} (run the maxact rule first)") from None
    except Exception as e:
        raise LoupeError(f"cannot read feature stats {path}: {type(e).__name__}: {e}") from e
    feature = table["feature"].to_numpy()
    if len(feature) != num_latents or not np.array_equal(np.sort(feature), np.arange(num_latents)):
        raise LoupeError(
            f"feature stats {path} cover {len(feature)} features, the SAE has {num_latents}:"
            " they belong to another SAE"
        )
    order = np.argsort(feature)
    return table["fire_count"].to_numpy()[order], table["density"].to_numpy()[order]


# --- the rule's job ------------------------------------------------------------------------


def special_ids_of(manifest: dict) -> list[int]:
    ids = [manifest.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")]
    return sorted({i for i in ids if i is not None})


def load_sae(sae_dir: Path, device: torch.device):
    sparsify = import_sparsify()
    if not (sae_dir / "sae.safetensors").exists() or not (sae_dir / "cfg.json").exists():
        raise LoupeError(f"no SAE in {sae_dir} (expected sae.safetensors and cfg.json)")
    try:
        sae = sparsify.SparseCoder.load_from_disk(sae_dir, device=device)
    except Exception as e:
        raise LoupeError(f"cannot load SAE from {sae_dir}: {type(e).__name__}: {e}") from e
    return sae.requires_grad_(False).eval()


def evaluate_layer(
    settings: dict,
    layer: int,
    sae_dir: Path,
    tokens_path: Path,
    manifest_path: Path,
    stats_path: Path,
    out: Path,
    threads: int = 1,
) -> dict:
    """Evaluate layer `layer`'s SAE on the eval split; writes `out` (eval.json)."""
    if layer not in settings["model"].get("layers", [layer]):
        raise LoupeError(f"layer {layer} is not in model.layers {settings['model']['layers']}")
    spec = EvalSpec.from_settings(settings)
    device = resolve_device(settings["device"])
    if device.type == "cpu":
        torch.set_num_threads(max(1, threads))
    tokens = open_split(tokens_path)
    manifest = json.loads(Path(manifest_path).read_text())
    hookpoint = hookpoint_of(settings, layer)
    sae = load_sae(Path(sae_dir), device)
    fire_count, density = read_feature_stats(Path(stats_path), sae.num_latents)
    model = load_causal_lm(settings["model"]["name"], device, settings["model"].get("revision"))
    if sae.d_in != hidden_size(model):
        raise LoupeError(
            f"SAE in {sae_dir} reads {sae.d_in}-dim activations, the model's are"
            f" {hidden_size(model)}: it was trained on another model"
        )
    log.info("layer %d: evaluating %s on %s (%s)", layer, hookpoint, device, tokens_path)
    t0 = time.perf_counter()
    metrics = evaluate_sae(model, sae, hookpoint, tokens, special_ids_of(manifest), spec)
    elapsed = time.perf_counter() - t0
    result = {
        "layer": layer,
        "hookpoint": hookpoint,
        **metrics,
        **feature_fractions(fire_count, density, spec.dense_threshold),
        "seconds": round(elapsed, 2),
        "split": str(tokens_path),
        "special_token_ids": special_ids_of(manifest),
        "sae_cfg": json.loads((Path(sae_dir) / "cfg.json").read_text()),
        "config": {k: settings.get(k) for k in ("model", "device", "sae", "evaluate")},
    }
    write_json(out, result)
    log.info(
        "layer %d: fvu %.4f, explained variance %.4f, cosine %.4f, l0 %.1f, delta CE %+.4f,"
        " CE score %s, KL %.4f, dead %.3f, dense %.3f over %s tokens in %.1fs",
        layer,
        result["fvu"],
        result["explained_variance"],
        result["cosine"],
        result["l0"],
        result["delta_ce"],
        "n/a" if result["ce_loss_score"] is None else f"{result['ce_loss_score']:.4f}",
        result["kl"],
        result["dead_fraction"],
        result["dense_fraction"],
        f"{result['tokens']:,}",
        elapsed,
    )
    return result
