"""Each feature's neighbours: its top-N features by decoder cosine in its own layer ("same")
and its top-N matches in the SAEs of the adjacent layers ("prev": layer L-1, "next": L+1), so
a feature can be followed through the stack both ways; written as feature_neighbours.parquet.

Across layers the measure is decoder-decoder cosine: the feature-flow work (Laptev et al.,
"Analyze Feature Flow", arXiv 2502.03032) matches features of adjacent layers' SAEs by the
cosine of their decoder directions, as "Mechanistic Permutability" (arXiv 2410.08869) does;
both directions live in the same residual-stream basis, so the cosine needs no activations.
Both products go through logits.blocked_top_k (the top-logits code), in blocks, so the
[F, F] product never exists whole."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path
from .config import Config
from .errors import LoupeError
from .examples import ROW_GROUP_FEATURES, feature_file_writer, schema
from .gpus import select_device
from .logits import blocked_top_k

log = logging.getLogger(__name__)

# Rows of a feature are ordered by relation in this order, then rank: the file is sorted.
RELATIONS = ("next", "prev", "same")


def unit_rows(W: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (fp32 at least); an all-zero row stays zero (cosine 0)."""
    W = W.to(torch.promote_types(W.dtype, torch.float32))
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def decoder_neighbours(
    W_dec: torch.Tensor,
    adjacent: dict[str, tuple[int, torch.Tensor]],
    layer: int,
    top_n: int,
    chunk: int = 4096,
) -> dict[str, tuple[int, torch.Tensor, torch.Tensor]]:
    """{relation: (other_layer, cosines [F, n], other features [F, n])}: "same" for W_dec's
    own features (never a feature itself; n = min(top_n, F-1)), and one entry per adjacent
    SAE given as {relation: (layer, its W_dec)} (n = min(top_n, its width)). Best first,
    equal cosines by feature index. Decoders are [features, d]."""
    if W_dec.dim() != 2:
        raise LoupeError(f"W_dec must be [features, d], got {list(W_dec.shape)}")
    mine = unit_rows(W_dec)
    out = {}
    if mine.shape[0] > 1:
        n = min(top_n, mine.shape[0] - 1)
        best = blocked_top_k(
            mine,
            mine,
            n,
            query_chunk=chunk,
            key_chunk=chunk,
            skip_self=True,
            desc=f"layer {layer} neighbours",
        )[True]
        out["same"] = (layer, *best)
    for relation, (other_layer, W_other) in adjacent.items():
        if W_other.dim() != 2 or W_other.shape[1] != W_dec.shape[1]:
            raise LoupeError(
                f"layer {other_layer}'s decoder {list(W_other.shape)} does not match layer"
                f" {layer}'s {list(W_dec.shape)}: not SAEs of one model's residual stream"
            )
        other = unit_rows(W_other.to(mine.device))
        n = min(top_n, other.shape[0])
        best = blocked_top_k(
            mine,
            other,
            n,
            query_chunk=chunk,
            key_chunk=chunk,
            desc=f"layer {layer} -> {other_layer}",
        )[True]
        out[relation] = (other_layer, *best)
    return out


def neighbours_schema():
    return schema("""
        feature        int64    feature (latent) index
        relation       string   same: another feature of this layer; prev / next: a match in
                                layer N-1 / N+1
        rank           int64    rank of the neighbour within its relation (0 is the closest)
        other_layer    int64    the neighbour's layer
        other_feature  int64    the neighbour's feature index in that layer
        cosine         float32  cosine between the two features' decoder directions
    """)


def neighbours_table(found: dict[str, tuple[int, torch.Tensor, torch.Tensor]]):
    """The rows (feature, relation, rank, other_layer, other_feature, cosine) of every
    feature, sorted by feature, relation (RELATIONS order), rank (0 = the best)."""
    import pyarrow as pa

    parts = []
    for order, relation in enumerate(RELATIONS):
        if relation not in found:
            continue
        other_layer, values, ids = found[relation]
        num, n = values.shape
        parts.append(
            (
                np.repeat(np.arange(num, dtype=np.int64), n),
                np.full(num * n, order, dtype=np.int64),
                np.tile(np.arange(n, dtype=np.int64), num),
                np.full(num * n, other_layer, dtype=np.int64),
                ids.cpu().numpy().reshape(-1).astype(np.int64),
                values.cpu().numpy().reshape(-1).astype(np.float32),
            )
        )
    if not parts:
        return neighbours_schema().empty_table()
    feature, rel, rank, other_layer, other, cosine = (
        np.concatenate(c) for c in zip(*parts, strict=True)
    )
    order = np.lexsort((rank, rel, feature))
    names = np.array(RELATIONS, dtype=object)
    return pa.table(
        {
            "feature": feature[order],
            "relation": pa.array(names[rel[order]], pa.string()),
            "rank": rank[order],
            "other_layer": other_layer[order],
            "other_feature": other[order],
            "cosine": cosine[order],
        },
        schema=neighbours_schema(),
    )


def write_neighbours(path: Path, table, metadata: dict | None = None) -> int:
    """feature_neighbours.parquet: sorted by feature, relation, rank; zstd; one row group per
    ROW_GROUP_FEATURES features; written atomically. Returns rows."""
    features = table.column("feature").to_numpy()
    last = int(features[-1]) + 1 if len(features) else 0
    with atomic_path(path) as tmp:
        with feature_file_writer(tmp, neighbours_schema(), metadata) as writer:
            for first in range(0, max(last, 1), ROW_GROUP_FEATURES):
                lo, hi = np.searchsorted(features, [first, first + ROW_GROUP_FEATURES])
                part = table.slice(lo, hi - lo).cast(writer.schema)
                writer.write_table(part, row_group_size=max(len(part), 1))
    return len(table)


def read_decoder(path: Path, device: torch.device) -> torch.Tensor:
    """W_dec [features, d] of a sparsify sae.safetensors (or its folder), nothing else."""
    from safetensors import safe_open

    from .layout import SAE_WEIGHTS

    path = Path(path)
    path = path / SAE_WEIGHTS if path.is_dir() else path
    if not path.is_file():
        raise LoupeError(f"no trained SAE at {path}")
    with safe_open(path, framework="pt", device=str(device)) as f:
        if "W_dec" not in f.keys():
            raise LoupeError(f"{path} has no decoder (W_dec)")
        return f.get_tensor("W_dec")


def neighbours_layer(
    config: Config,
    layer: int,
    sae: Path,
    neighbours: Path,
    prev_sae: list[Path] | None = None,
    next_sae: list[Path] | None = None,
) -> dict:
    """Write layer `layer`'s feature_neighbours.parquet from its SAE and those of layers
    layer-1 (prev_sae) and layer+1 (next_sae), each given only when that layer is in
    model.layers (else that relation is absent)."""
    if layer not in config.model.layers:
        raise LoupeError(f"layer {layer} is not in model.layers {config.model.layers}")
    adjacent_paths = {}
    for relation, other_layer, paths in (
        ("prev", layer - 1, prev_sae or []),
        ("next", layer + 1, next_sae or []),
    ):
        if len(paths) > 1:
            raise LoupeError(f"--{relation}-sae takes at most one SAE, got {len(paths)}")
        if paths:
            if other_layer not in config.model.layers:
                raise LoupeError(f"layer {other_layer} is not in model.layers")
            adjacent_paths[relation] = (other_layer, paths[0])
    device = select_device(config.device)
    t0 = time.perf_counter()
    W_dec = read_decoder(sae, device)
    adjacent = {r: (ol, read_decoder(p, device)) for r, (ol, p) in adjacent_paths.items()}
    found = decoder_neighbours(
        W_dec, adjacent, layer, config.neighbours.top_n, config.neighbours.chunk
    )
    seconds = time.perf_counter() - t0
    table = neighbours_table(found)
    metadata = {
        "layer": layer,
        "num_latents": W_dec.shape[0],
        "top_n": config.neighbours.top_n,
        "measure": "decoder cosine",
        "adjacent_layers": sorted(ol for ol, _ in adjacent.values()),
    }
    rows = write_neighbours(Path(neighbours), table, metadata)
    log.info(
        "layer %d: %d features, neighbours in %s in %.2fs; %s rows",
        layer,
        W_dec.shape[0],
        ", ".join(f"{r} (layer {found[r][0]})" for r in RELATIONS if r in found) or "none",
        seconds,
        f"{rows:,}",
    )
    return {"layer": layer, "rows": rows, "seconds": round(seconds, 2)}
