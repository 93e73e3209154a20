"""The tokens each feature promotes and suppresses: its decoder direction pushed through the
model's unembedding, top and bottom k per feature, computed in blocks so the [features, vocab]
product never exists whole; written as feature_logits.parquet."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .atomic import atomic_path
from .errors import LoupeError
from .examples import ROW_GROUP_FEATURES, feature_file_writer, schema
from .progress import progress

# ---------------------------------------------------------------------------------------------
# Logit effects of each feature's decoder direction


class FeatureLogits(NamedTuple):
    """Per feature the k tokens whose logit the decoder direction raises most and lowers
    most: positive_values [F, k] descending, negative_values [F, k] ascending (most negative
    first), and their token ids [F, k] int64; equal values are ordered by token id (also
    at the k-th place: the lower ids make the cut)."""

    positive_values: torch.Tensor
    positive_ids: torch.Tensor
    negative_values: torch.Tensor
    negative_ids: torch.Tensor


def _best(
    values: torch.Tensor, ids: torch.Tensor, k: int, largest: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (value, id) pairs of each row of [rows, n] candidates; equal values by id."""
    by_id = ids.argsort(dim=1)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    order = values.sort(dim=1, descending=largest, stable=True).indices[:, :k]
    return values.gather(1, order), ids.gather(1, order)


def _chunk_top(logits: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best values of each row of logits [rows, n] and their columns, where a tie at
    the k-th place goes to the lower columns (torch.topk picks among ties as it likes)."""
    vals, cols = logits.topk(k, dim=1, largest=largest)
    kth = vals[:, -1:]
    # Rows with more ties of the k-th value than topk kept: rare (duplicate unembedding rows),
    # so a full stable sort of just those rows costs nothing overall.
    short = ((logits == kth).sum(1) > (vals == kth).sum(1)).nonzero().squeeze(1)
    if short.numel():
        order = logits[short].sort(dim=1, descending=largest, stable=True)
        vals[short], cols[short] = order.values[:, :k], order.indices[:, :k]
    return vals, cols


@torch.inference_mode()
def blocked_top_k(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    directions: tuple[bool, ...] = (True,),
    query_chunk: int = 1024,
    key_chunk: int = 65536,
    skip_self: bool = False,
    desc: str = "top k",
) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
    """Per row of queries [Q, d], the k largest (direction True) and/or smallest (False) dot
    products with the rows of keys [K, d], and those rows' indices: {direction: (values
    [Q, k], indices [Q, k] int64)}, best first, equal values by index (also at the k-th
    place: the lower indices make the cut). Computed on queries' device in fp32 (fp64 if
    given), in blocks of query_chunk x key_chunk, so the [Q, K] product never exists whole.
    skip_self: queries and keys are the same set, and a row never matches itself."""
    num = queries.shape[0]
    count = keys.shape[0] - (1 if skip_self else 0)
    if not 1 <= k <= count:
        raise LoupeError(f"{desc}: k must be between 1 and {count}, got {k}")
    if query_chunk < 1 or key_chunk < 1:
        raise LoupeError(f"{desc}: chunk sizes must be at least 1")
    device = queries.device
    dtype = torch.promote_types(queries.dtype, torch.float32)
    out: dict[bool, tuple[list[torch.Tensor], list[torch.Tensor]]] = {
        d: ([], []) for d in directions
    }
    bar = progress(total=num, desc=desc, unit="row", unit_scale=True)
    for q0 in range(0, num, query_chunk):
        block = queries[q0 : q0 + query_chunk].to(dtype)
        rows = torch.arange(q0, q0 + block.shape[0], device=device)[:, None]
        best: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
        for k0 in range(0, keys.shape[0], key_chunk):
            product = block @ keys[k0 : k0 + key_chunk].to(device, dtype).T  # [chunk, kchunk]
            own = None
            if skip_self:
                own = rows == torch.arange(k0, k0 + product.shape[1], device=device)[None]
            for largest in directions:
                scores = product
                if own is not None:  # the row itself can never win
                    scores = product.masked_fill(own, -torch.inf if largest else torch.inf)
                vals, ids = _chunk_top(scores, min(k, scores.shape[1]), largest)
                ids = ids + k0
                if largest in best:
                    vals = torch.cat([best[largest][0], vals], dim=1)
                    ids = torch.cat([best[largest][1], ids], dim=1)
                best[largest] = _best(vals, ids, k, largest)
        for largest in directions:
            out[largest][0].append(best[largest][0])
            out[largest][1].append(best[largest][1])
        bar.update(block.shape[0])
    bar.close()
    return {d: (torch.cat(v), torch.cat(i)) for d, (v, i) in out.items()}


def top_logits(
    W_dec: torch.Tensor,
    W_U: torch.Tensor,
    k: int,
    feature_chunk: int = 1024,
    vocab_chunk: int = 65536,
) -> FeatureLogits:
    """Each feature's k largest and k smallest W_dec[f] . W_U[t] over the vocabulary.

    W_dec: [F, d] decoder directions; W_U: [vocab, d] the unembedding (for Gemma the tied
    embedding matrix). Computed by blocked_top_k on W_dec's device in fp32 (fp64 if given),
    in blocks of feature_chunk x vocab_chunk, so the [F, vocab] product never exists whole.

    The direction goes straight through the unembedding, as SAEDashboard's Neuronpedia runner
    does (`feature_resid_dir @ W_U`, the model loaded without processing or W_U taken from the
    LM head, so no final-norm weight folded in): not through the final RMSNorm's per-dimension
    scale (the direction is not a hidden state, and the norm's division by the RMS means
    nothing for it), nor Gemma's final-logit softcap (tanh(x/30)*30 is monotonic, so the
    ranking is unchanged). Values are the raw dot products."""
    if W_dec.dim() != 2 or W_U.dim() != 2:
        raise LoupeError(
            f"top_logits needs W_dec [F, d] and W_U [vocab, d], got {list(W_dec.shape)} and"
            f" {list(W_U.shape)}"
        )
    d = W_dec.shape[1]
    vocab = W_U.shape[0]
    if W_U.shape[1] != d:
        raise LoupeError(
            f"decoder width {d} differs from the unembedding's {W_U.shape[1]}: the SAE was"
            " trained on another model"
        )
    if not 1 <= k <= vocab:
        raise LoupeError(f"top_logits k must be between 1 and the vocabulary size {vocab}, got {k}")
    if feature_chunk < 1 or vocab_chunk < 1:
        raise LoupeError("top_logits chunk sizes must be at least 1")
    best = blocked_top_k(
        W_dec, W_U, k, (True, False), feature_chunk, vocab_chunk, desc="top logits"
    )
    return FeatureLogits(*best[True], *best[False])


def feature_logits_schema():
    return schema("""
        feature   int64    feature (latent) index
        sign      string   positive: a token whose logit the feature raises; negative: one it
                           lowers
        rank      int64    rank of the token within its sign (0 is the strongest effect)
        token_id  int64    token id
        token     string   the token's string
        value     float32  W_dec[feature] . W_U[token]: the logit change per unit of
                           activation, straight through the unembedding (the final norm and
                           logit soft-cap left out)
    """)


def feature_logits_table(
    logits: FeatureLogits,
    token_strings: Callable[[np.ndarray], list[str]],
    first_feature: int = 0,
):
    """Rows (feature, sign, rank, token_id, token, value) of features first_feature.. held
    in `logits`, sorted by feature, sign ("negative" before "positive"), rank (0 = the
    strongest effect of that sign). token_strings maps token ids to their strings (e.g.
    maxact.TokenStrings)."""
    import pyarrow as pa

    pos_v, pos_i, neg_v, neg_i = (
        t.cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in logits
    )
    num, k = pos_v.shape
    values = np.stack([neg_v, pos_v], axis=1).reshape(-1)  # [F, sign, rank], flattened
    ids = np.stack([neg_i, pos_i], axis=1).reshape(-1).astype(np.int64)
    sign = np.repeat(np.array(["negative", "positive"], dtype=object), k)
    return pa.table(
        {
            "feature": pa.array(np.repeat(np.arange(num, dtype=np.int64) + first_feature, 2 * k)),
            "sign": pa.array(np.tile(sign, num), pa.string()),
            "rank": pa.array(np.tile(np.arange(k, dtype=np.int64), 2 * num)),
            "token_id": pa.array(ids),
            "token": pa.array(token_strings(ids), pa.string()),
            "value": pa.array(values.astype(np.float32)),
        },
        schema=feature_logits_schema(),
    )


def write_feature_logits(
    path: Path,
    logits: FeatureLogits,
    token_strings: Callable[[np.ndarray], list[str]],
    metadata: dict | None = None,
) -> int:
    """A feature-logits parquet file: sorted by feature, sign, rank; zstd; one row group per
    ROW_GROUP_FEATURES features; written atomically. Returns rows."""
    cpu = FeatureLogits(*(t.cpu() for t in logits))
    written = 0
    with atomic_path(path) as tmp:
        with feature_file_writer(tmp, feature_logits_schema(), metadata) as writer:
            for first in range(0, cpu.positive_values.shape[0], ROW_GROUP_FEATURES):
                part = FeatureLogits(*(t[first : first + ROW_GROUP_FEATURES] for t in cpu))
                table = feature_logits_table(part, token_strings, first_feature=first)
                writer.write_table(table, row_group_size=len(table))
                written += len(table)
    return written
