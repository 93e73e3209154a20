"""Max-activating examples: one streaming pass over the sample split keeps, for every feature,
its top-N sequences (one peak each, with the feature's activations around the peak), examples
spread over its activation range, an activation histogram and its firing statistics; after the
pass, the tokens each feature's decoder direction promotes and suppresses most. Everything
kept is sized features x N: nothing grows with the token count. The parquet files are written
by loupe.examples."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import Config, MaxactConfig
from .examples import TokenStrings, write_examples, write_random_windows, write_stats
from .logits import top_logits, write_feature_logits
from .model import capture, open_layer
from .progress import progress
from .samplers import (
    ActivationHistogram,
    Batch,
    FiringStats,
    IntervalExamples,
    RandomWindows,
    TopExamples,
)
from .tokens import load_tokenizer, open_split, read_tokens_manifest

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# The pass


def encode_batch(
    model, sae, hookpoint: str, ids: torch.Tensor, special: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """TopK activations of a batch in fp32, zeroed at special positions: acts, indices
    [batch, seq, k], and the count of other positions. ids: [batch, seq] int64; special:
    the ids (BOS, EOS, PAD) that never peak and never count as tokens."""
    x = capture(model, hookpoint, ids)
    batch, seq, d = x.shape
    out = sae.encode(x.reshape(-1, d).float())
    counted = ~torch.isin(ids.to(x.device), special)
    acts = out.top_acts.view(batch, seq, -1) * counted[..., None]
    return acts, out.top_indices.view(batch, seq, -1), int(counted.sum())


@dataclass
class Sampled:
    """What one pass keeps: the top examples, the interval examples, the firing statistics,
    the activation histogram, and the random-window pool (maxact.random_windows of them,
    possibly none)."""

    top: TopExamples
    interval_examples: IntervalExamples
    stats: FiringStats
    histogram: ActivationHistogram
    random_windows: RandomWindows | None = None  # set by stream


@torch.inference_mode()
def stream(
    model,
    sae,
    hookpoint: str,
    tokens: np.ndarray,
    maxact_config: MaxactConfig,
    special_ids: list[int],
    desc: str = "maxact",
) -> Sampled:
    """One pass over the token rows ([rows, seq], memory-mapped), batch by batch."""
    device = sae.device
    num = sae.num_latents
    special = torch.tensor(special_ids, dtype=torch.int64, device=device)
    kept = Sampled(
        TopExamples(num, maxact_config, device),
        IntervalExamples(num, maxact_config, device),
        FiringStats(num, device),
        ActivationHistogram(num, device),
    )
    rows, seq = tokens.shape
    k = sae.cfg.k
    kept.random_windows = RandomWindows(
        rows, seq, maxact_config.random_windows, maxact_config.width, k, device
    )
    bar = progress(total=rows * seq, desc=desc, unit="tok", unit_scale=True)
    for start in range(0, rows, maxact_config.batch_size):
        ids = torch.from_numpy(tokens[start : start + maxact_config.batch_size].astype(np.int64))
        acts, indices, counted = encode_batch(model, sae, hookpoint, ids.to(device), special)
        kept.stats.update(acts, indices, counted)
        kept.histogram.update(acts, indices)
        batch = Batch(acts, indices, start, num)  # peaks and dense computed once, for both
        kept.top.update(batch)
        kept.interval_examples.update(batch)
        kept.random_windows.update(batch)
        bar.update(ids.numel())
    bar.close()
    return kept


# ---------------------------------------------------------------------------------------------
# Inputs and outputs


def sample_layer(
    config: Config,
    layer: int,
    sae: Path,
    tokens: Path,
    manifest: Path,
    examples: Path,
    intervals: Path,
    stats: Path,
    logits: Path,
    threads: int = 1,
    random_windows: Path | None = None,
) -> dict:
    """Stream the sample split through layers 0..layer and the SAE; write the four parquet
    files (max_activations, interval_examples, feature_stats, feature_logits), and the pool of
    random windows with their sparse codes where `random_windows` names a file."""
    maxact_config = config.maxact
    split = open_split(tokens, read_tokens_manifest(manifest))
    job = open_layer(config, layer, threads, head=True, sae=sae, manifest=manifest)
    model, hookpoint, special, coder = job.model, job.hookpoint, job.special_ids, job.sae
    tokenizer = load_tokenizer(config.model.tokenizer_name, config.model.revision)
    rows, seq = split.shape
    log.info(
        "layer %d: %s rows x %d tokens, %d features, top %d, %d intervals x %d, window -%d/+%d",
        layer,
        f"{rows:,}",
        seq,
        coder.num_latents,
        maxact_config.top_n,
        maxact_config.intervals,
        maxact_config.per_interval,
        maxact_config.window_before,
        maxact_config.window_after,
    )
    t0 = time.perf_counter()
    kept = stream(
        model, coder, hookpoint, split, maxact_config, special, desc=f"maxact layer {layer}"
    )
    elapsed = time.perf_counter() - t0
    t1 = time.perf_counter()
    # The unembedding: Gemma ties it to the input embeddings; untied models have their own.
    promoted = top_logits(
        coder.W_dec, model.get_output_embeddings().weight, k=maxact_config.top_logits
    )
    logit_seconds = time.perf_counter() - t1

    metadata = {
        "layer": layer,
        "hookpoint": hookpoint,
        "num_latents": coder.num_latents,
        "k": coder.cfg.k,
        "top_n": maxact_config.top_n,
        "window_before": maxact_config.window_before,
        "window_after": maxact_config.window_after,
        "intervals": maxact_config.intervals,
        "per_interval": maxact_config.per_interval,
        "sample_rows": rows,
        "ctx_len": seq,
        "tokens": kept.stats.tokens,
        "special_token_ids": special,
    }
    top = kept.top.cpu()
    counts = write_stats(
        Path(stats),
        (top["sequences"] >= 0).sum(1),
        kept.stats.count.cpu().numpy(),
        kept.stats.total.cpu().numpy(),
        kept.stats.peak.cpu().numpy(),
        kept.stats.tokens,
        kept.histogram.cpu(),
        metadata,
    )
    written = write_examples(Path(examples), top, split, tokenizer, maxact_config, layer, metadata)
    spread = write_examples(
        Path(intervals),
        kept.interval_examples.cpu(),
        split,
        tokenizer,
        maxact_config,
        layer,
        metadata,
        by_interval=True,
    )
    write_feature_logits(Path(logits), promoted, TokenStrings(tokenizer), metadata)
    pool = kept.random_windows
    if random_windows is not None:
        write_random_windows(Path(random_windows), pool.cpu(), split, tokenizer, metadata)
    summary = {
        "layer": layer,
        "tokens": rows * seq,
        "counted_tokens": kept.stats.tokens,
        "seconds": round(elapsed, 2),
        "logit_seconds": round(logit_seconds, 2),
        "tokens_per_s": rows * seq / max(elapsed, 1e-9),
        "dead_features": counts["dead"],
        "features": coder.num_latents,
        "examples": written,
        "interval_examples": spread,
        "random_windows": len(pool.rows),
    }
    log.info(
        "layer %d: %s tokens (%s non-special) in %.1fs (%.0f tokens/s); %d of %d features dead;"
        " %s top and %s interval examples; top logits in %.2fs",
        layer,
        f"{summary['tokens']:,}",
        f"{kept.stats.tokens:,}",
        elapsed,
        summary["tokens_per_s"],
        counts["dead"],
        coder.num_latents,
        f"{written:,}",
        f"{spread:,}",
        logit_seconds,
    )
    return summary
