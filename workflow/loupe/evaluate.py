"""Per-layer evaluation on the held-out eval split: how well the SAE reconstructs the layer
(FVU, explained variance, cosine, L0), what splicing it into the model costs in next-token loss
(CE clean / spliced / zero-ablated, loss recovered, KL), and the dead and dense fractions from
the sample pass's feature stats.

Every metric covers the same positions: those whose token is not BOS, EOS or PAD. Only those
positions are replaced (by the reconstruction, or by zeros for the ablation baseline), so the
attention sink at BOS is never disturbed; CE and KL are taken at those positions, predicting
the next token. The keys of eval.json shared with metrics.csv and the card are loupe.metrics'
vocabulary."""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .atomic import write_json
from .config import Config, EvaluateConfig
from .errors import LoupeError
from .metrics import EVAL_COLUMNS, LADDER_COLUMNS, TRANSFER_COLUMNS
from .model import get_hookpoint, hidden_size, load_model, open_layer, text_config
from .number_format import fixed
from .progress import progress
from .tokens import open_split, read_tokens_manifest

log = logging.getLogger(__name__)


# --- the model with its LM head ------------------------------------------------------------


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


@contextmanager
def recorded_output(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While active, each output tensor of `module` ([batch, seq, d]) is appended to the list
    this yields; the output itself is unchanged."""
    seen: list[torch.Tensor] = []

    def keep(h: torch.Tensor) -> torch.Tensor:
        seen.append(h)
        return h

    with replaced_output(module, keep):
        yield seen


@contextmanager
def substituted_output(module: nn.Module, mask: torch.Tensor, values) -> Iterator:
    """While active, `module`'s output h [batch, seq, d] has its rows at `mask` [batch, seq]
    replaced by `values` ([mask.sum(), d] in h's dtype, or a scalar)."""

    def substitute(h: torch.Tensor) -> torch.Tensor:
        out = h.clone()
        out[mask] = values
        return out

    with replaced_output(module, substitute):
        yield


def keep_mask(input_ids: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
    """[batch, seq] True at positions the metrics cover (token not BOS/EOS/PAD)."""
    special = torch.tensor(special_ids, dtype=input_ids.dtype, device=input_ids.device)
    return ~torch.isin(input_ids, special)


# --- reconstruction metrics ----------------------------------------------------------------


def encode_at(sae, x: torch.Tensor, k: int):
    """sparsify's `sae.encode` with `k` latents kept per row instead of the trained cfg.k (the
    same fused encoder, so at k == cfg.k it is exactly `encode`)."""
    from sparsify.fused_encoder import fused_encoder

    if not sae.cfg.transcode:
        x = x - sae.b_dec
    return fused_encoder(x, sae.encoder.weight, sae.encoder.bias, k, sae.cfg.activation)


def reconstruct(sae, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The SAE's k-latent reconstruction of x [n, d_in] (float32), and the number of nonzero
    latents per row [n]; k defaults to the trained cfg.k. Not `sae.forward`: with multi_topk
    its output uses 4k latents."""
    k = sae.cfg.k if k is None else k
    enc = sae.encode(x) if k == sae.cfg.k else encode_at(sae, x, k)
    # TopK (and groupmax) select exactly k latents per token; anything else is a bug.
    assert enc.top_indices.shape[-1] == k, (enc.top_indices.shape, k)
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


def run_losses(
    head: LogitHead,
    clean: torch.Tensor,
    runs: dict[str, torch.Tensor],
    targets: torch.Tensor,
    chunk: int,
) -> dict[str, float]:
    """Summed CE of the clean run ("ce_clean") and of each modified run ("ce_<name>"), and
    summed KL(clean || run) ("kl_<name>") over n positions. clean and each run: [n, d] final
    hidden states; targets: [n] next tokens. Logits exist for `chunk` positions at a time."""
    sums = {"ce_clean": 0.0}
    for name in runs:
        sums[f"ce_{name}"] = sums[f"kl_{name}"] = 0.0
    for start in range(0, len(targets), chunk):
        part = slice(start, start + chunk)
        t = targets[part, None]
        lp_clean = head.log_probs(clean[part])
        p_clean = lp_clean.exp()
        # KL(p || q) = sum p log p - sum p log q; the first term is shared by every run.
        neg_entropy = float((p_clean * lp_clean).sum())
        sums["ce_clean"] -= float(lp_clean.gather(-1, t).sum())
        del lp_clean
        for name, hidden in runs.items():
            lp = head.log_probs(hidden[part])
            sums[f"ce_{name}"] -= float(lp.gather(-1, t).sum())
            sums[f"kl_{name}"] += neg_entropy - float((p_clean * lp).sum())
            del lp
    return sums


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
    sums = run_losses(head, clean, {"spliced": spliced, "zero": zero}, targets, chunk)
    sums["kl"] = sums.pop("kl_spliced")
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
    evaluate_config: EvaluateConfig,
) -> dict:
    """Reconstruction and loss metrics of `sae` at `hookpoint` on token rows [rows, ctx_len]
    (at most evaluate_config.max_tokens tokens, whole rows). Three passes per batch: clean
    (recording the layer's output, reconstructed here), with the reconstruction spliced in, and
    with the positions zeroed; then one spliced pass per k of evaluate_config.k_ladder other
    than the trained k (the trained k's entry is the main splice itself): its metrics under
    "ladder"."""
    rows = min(len(tokens), max(1, math.ceil(evaluate_config.max_tokens / tokens.shape[1])))
    module = get_hookpoint(model, hookpoint)
    head = LogitHead.of(model)
    device = next(model.parameters()).device
    ladder = sorted(evaluate_config.k_ladder)
    if ladder and ladder[-1] > sae.num_latents:
        raise LoupeError(
            f"evaluate.k_ladder's k {ladder[-1]} exceeds the SAE's {sae.num_latents} latents"
        )
    if sae.cfg.activation != "topk" and set(ladder) - {sae.cfg.k}:
        # groupmax's k is its number of groups: another k is another SAE, not a sparsity level.
        raise LoupeError(
            f"evaluate.k_ladder needs a topk SAE; this one is {sae.cfg.activation} (k"
            f" {sae.cfg.k}): set evaluate.k_ladder to [] or [{sae.cfg.k}]"
        )
    recon_stats = ReconStats()
    ladder_stats = {k: ReconStats() for k in ladder if k != sae.cfg.k}
    loss_sums: dict[str, float] = {}
    loss_positions = 0
    bar = progress(total=rows, desc=f"evaluate {hookpoint}", unit="row")
    for start in range(0, rows, evaluate_config.batch_size):
        ids = torch.from_numpy(
            tokens[start : min(start + evaluate_config.batch_size, rows)].astype(np.int64)
        )
        ids = ids.to(device)
        mask = keep_mask(ids, special_ids)
        with recorded_output(module) as seen:
            clean = final_hidden(model, ids)
        # The spliced pass computes the same activations up to the hookpoint: reconstruct
        # them once here, and let that pass only put the reconstruction in.
        h = seen[0]  # [batch, seq, d_in], the model's dtype
        x = h[mask].float()  # [n, d_in]
        recon, active = reconstruct(sae, x)
        recon_stats.add(x, recon, active)
        with substituted_output(module, mask, recon.to(h.dtype)):
            spliced = final_hidden(model, ids)
        with substituted_output(module, mask, 0):
            zero = final_hidden(model, ids)
        # Position t predicts token t+1: the last position has no target.
        at = mask.clone()
        at[:, -1] = False
        runs = {"spliced": spliced[at], "zero": zero[at]}
        for k, stats in ladder_stats.items():
            recon_k, active_k = reconstruct(sae, x, k)
            stats.add(x, recon_k, active_k)
            with substituted_output(module, mask, recon_k.to(h.dtype)):
                runs[f"k{k}"] = final_hidden(model, ids)[at]
        targets = ids[:, 1:][at[:, :-1]]
        sums = run_losses(head, clean[at], runs, targets, evaluate_config.logit_chunk)
        sums["kl"] = sums.pop("kl_spliced")
        for k, v in sums.items():
            loss_sums[k] = loss_sums.get(k, 0.0) + v
        loss_positions += len(targets)
        bar.update(len(ids))
    bar.close()
    if not loss_positions:
        raise LoupeError("no positions to evaluate: every eval token is BOS/EOS/PAD")
    result = {
        **recon_stats.result(),
        **loss_metrics(loss_sums, loss_positions),
        "k": sae.cfg.k,
        "num_latents": sae.num_latents,
        "rows": rows,
        "tokens": recon_stats.n,
        "ce_tokens": loss_positions,
    }
    if ladder:
        result["ladder"] = [
            ladder_entry(k, result)
            if k == sae.cfg.k
            else ladder_entry(
                k,
                {
                    **ladder_stats[k].result(),
                    **loss_metrics(
                        {
                            "ce_clean": loss_sums["ce_clean"],
                            "ce_spliced": loss_sums[f"ce_k{k}"],
                            "ce_zero": loss_sums["ce_zero"],
                            "kl": loss_sums[f"kl_k{k}"],
                            "kl_zero": loss_sums["kl_zero"],
                        },
                        loss_positions,
                    ),
                },
            )
            for k in ladder
        ]
    return result


def ladder_entry(k: int, metrics: dict) -> dict:
    """One rung of eval.json's "ladder": k, then loupe.metrics.LADDER_COLUMNS' keys."""
    return {"k": k, **{c.name: metrics[c.name] for c in LADDER_COLUMNS}}


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


def transfer_entry(config: Config, name: str, job, split: np.ndarray) -> dict:
    """The SAE of `job` scored on model `name` (e.g. the instruction-tuned model): its
    activations at the same hookpoint, spliced into it, on the same eval rows; no ladder."""
    model_config = config.model
    model = load_model(
        name,
        job.device,
        model_config.revision if name == model_config.name else None,
        model_config.dtype,
        head=True,
    )
    if hidden_size(model) != job.sae.d_in:
        raise LoupeError(
            f"evaluate.transfer_models: {name} has hidden size {hidden_size(model)}, the SAE"
            f" reads {job.sae.d_in}-dim activations"
        )
    vocab = model.get_input_embeddings().num_embeddings
    if int(split.max()) >= vocab:
        raise LoupeError(
            f"evaluate.transfer_models: the eval split holds token id {int(split.max())}, but"
            f" {name} has {vocab} embeddings: it uses another tokenizer"
        )
    t0 = time.perf_counter()
    evaluate_config = replace(config.evaluate, k_ladder=[])
    measured = evaluate_sae(model, job.sae, job.hookpoint, split, job.special_ids, evaluate_config)
    log.info(
        "layer %d on %s: fvu %.4f, delta CE %+.4f, KL %.4f in %.1fs",
        job.layer,
        name,
        measured["fvu"],
        measured["delta_ce"],
        measured["kl"],
        time.perf_counter() - t0,
    )
    del model
    gc.collect()  # before the next transfer model loads
    return {"model": name, **{c.name: measured[c.name] for c in TRANSFER_COLUMNS}}


def evaluate_layer(
    config: Config,
    layer: int,
    sae: Path,
    tokens: Path,
    manifest: Path,
    stats: Path,
    metrics: Path,
    threads: int = 1,
) -> dict:
    """Evaluate layer `layer`'s SAE on the eval split; writes `metrics` (eval.json)."""
    split = open_split(Path(tokens), read_tokens_manifest(manifest))  # before the model: fails fast
    job = open_layer(config, layer, threads, head=True, truncate=False, sae=sae, manifest=manifest)
    fire_count, density = read_feature_stats(Path(stats), job.sae.num_latents)
    log.info("layer %d: evaluating %s on %s (%s)", layer, job.hookpoint, job.device, tokens)
    t0 = time.perf_counter()
    measured = evaluate_sae(
        job.model, job.sae, job.hookpoint, split, job.special_ids, config.evaluate
    )
    elapsed = time.perf_counter() - t0
    if config.evaluate.transfer_models:
        # Done with the base model: free it before a transfer model loads, so the job holds one
        # model at a time (two Gemma 4 E2B copies would double its memory).
        job.model = None
        gc.collect()
    transfer = [
        transfer_entry(config, name, job, split) for name in config.evaluate.transfer_models
    ]
    values = {
        "layer": layer,
        "hookpoint": job.hookpoint,
        **measured,
        **feature_fractions(fire_count, density, config.evaluate.dense_threshold),
    }
    # The vocabulary's keys first, in its order (a key no computation made fails here); then
    # what the metrics were computed over.
    result = {c.name: values.pop(c.name) for c in EVAL_COLUMNS}
    if transfer:
        values["transfer"] = transfer
    result.update(
        values,
        seconds=round(elapsed, 2),
        split=str(tokens),
        special_token_ids=job.special_ids,
        sae_cfg={**job.sae.cfg.to_dict(), "d_in": job.sae.d_in},  # cfg.json, as sparsify writes it
        config=config.settings_for("evaluate"),
    )
    write_json(metrics, result)
    log.info(
        "layer %d: fvu %.4f, explained variance %.4f, cosine %.4f, l0 %.1f, delta CE %+.4f,"
        " CE score %s, KL %.4f, dead %.3f, dense %.3f over %s tokens in %.1fs",
        layer,
        result["fvu"],
        result["explained_variance"],
        result["cosine"],
        result["l0"],
        result["delta_ce"],
        fixed(result["ce_loss_score"], 4),
        result["kl"],
        result["dead_fraction"],
        result["dense_fraction"],
        f"{result['tokens']:,}",
        elapsed,
    )
    return result
