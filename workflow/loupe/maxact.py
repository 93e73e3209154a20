"""Max-activating examples: one streaming pass over the sample split keeps, for every feature,
its top-N sequences (one peak each, with the feature's activations around the peak) and its
firing statistics. Everything kept is sized features x N: nothing grows with the token count."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import LoupeError
from .io import atomic_path
from .model import (
    capture,
    hidden_size,
    import_sparsify,
    load_text_model,
    resolve_device,
    truncate_after,
)
from .progress import progress
from .settings import hookpoint as hookpoint_of
from .settings import pick, tokenizer_name
from .tokens import load_tokenizer, open_split

log = logging.getLogger(__name__)

# Features per parquet row group: a reader after one feature fetches ~N x 64 rows, and each
# group is still big enough for zstd to compress the string columns well.
ROW_GROUP_FEATURES = 64


@dataclass(frozen=True)
class MaxactSpec:
    top_n: int = 20
    window_before: int = 32
    window_after: int = 8
    batch_size: int = 8

    @classmethod
    def from_settings(cls, settings: dict) -> MaxactSpec:
        spec = pick(cls, settings.get("maxact"))
        spec.check()
        return spec

    def check(self) -> None:
        # The schema rejects these too; the CLI can be called without the workflow.
        if self.top_n < 1:
            raise LoupeError(f"maxact.top_n must be at least 1, got {self.top_n}")
        if self.window_before < 0 or self.window_after < 0:
            raise LoupeError(
                f"maxact window sizes must be >= 0, got before {self.window_before},"
                f" after {self.window_after}"
            )
        if self.batch_size < 1:
            raise LoupeError(f"maxact.batch_size must be at least 1, got {self.batch_size}")

    @property
    def width(self) -> int:
        return self.window_before + 1 + self.window_after


# ---------------------------------------------------------------------------------------------
# Pure algorithm (tensors in, tensors out; any device)


def sequence_peaks(
    acts: torch.Tensor, indices: torch.Tensor, num_latents: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (row, feature)'s highest activation and the first position that reaches it.

    acts, indices: [rows, seq, k] TopK output, with positions that must not peak zeroed.
    Returns peaks [rows, F] (0 where the feature never fires) and positions [rows, F]
    (int64; `seq` where it never fires)."""
    rows, seq, k = acts.shape
    row = torch.arange(rows, device=acts.device).view(rows, 1, 1)
    key = (row * num_latents + indices).reshape(-1)
    flat = acts.reshape(-1)
    peaks = flat.new_zeros(rows * num_latents).scatter_reduce_(0, key, flat, "amax")
    at_peak = (flat > 0) & (flat == peaks[key])
    pos = torch.arange(seq, device=acts.device).view(1, seq, 1).expand(rows, seq, k).reshape(-1)
    positions = torch.full((rows * num_latents,), seq, dtype=torch.int64, device=acts.device)
    positions.scatter_reduce_(0, key[at_peak], pos[at_peak], "amin")
    return peaks.view(rows, num_latents), positions.view(rows, num_latents)


def window_activations(
    dense: torch.Tensor,
    rows: torch.Tensor,
    features: torch.Tensor,
    positions: torch.Tensor,
    before: int,
    after: int,
) -> torch.Tensor:
    """Feature features[i]'s activation at positions[i]-before .. positions[i]+after of row
    rows[i]: [M, before+1+after], 0 outside the row.

    dense: [batch, seq, F] TopK activations (0 where a feature is not among a token's top-k);
    rows, features, positions: [M] int64."""
    seq = dense.shape[1]
    t = positions[:, None] + torch.arange(-before, after + 1, device=dense.device)
    inside = (t >= 0) & (t < seq)
    return dense[rows[:, None], t.clamp(0, seq - 1), features[:, None]] * inside


def densify(acts: torch.Tensor, indices: torch.Tensor, num_latents: int) -> torch.Tensor:
    """[batch, seq, k] TopK output as [batch, seq, F], zeros elsewhere."""
    batch, seq, k = acts.shape
    dense = acts.new_zeros(batch * seq, num_latents)
    dense.scatter_(1, indices.reshape(-1, k), acts.reshape(-1, k))
    return dense.view(batch, seq, num_latents)


class TopExamples:
    """Running top-N examples per feature, on the compute device.

    Each feature's row of the [F, N] buffers stays sorted by (activation desc, sequence asc),
    so column N-1 is the bar a new candidate must beat; empty slots hold activation 0 and
    sequence -1. Windows [F, N, W] hold the feature's activations around each kept peak."""

    def __init__(self, num_latents: int, spec: MaxactSpec, device: torch.device):
        self.spec = spec
        n, w = spec.top_n, spec.width
        self.values = torch.zeros(num_latents, n, device=device)
        self.sequences = torch.full((num_latents, n), -1, dtype=torch.int64, device=device)
        self.positions = torch.zeros(num_latents, n, dtype=torch.int64, device=device)
        self.windows = torch.zeros(num_latents, n, w, device=device)

    @property
    def num_latents(self) -> int:
        return self.values.shape[0]

    def update(self, acts: torch.Tensor, indices: torch.Tensor, first_row: int) -> int:
        """Merge one batch (rows first_row.. of the split); returns the examples admitted.

        acts, indices: [batch, seq, k], positions that must not peak already zeroed."""
        n, spec = self.spec.top_n, self.spec
        batch = acts.shape[0]
        peaks, peak_pos = sequence_peaks(acts, indices, self.num_latents)
        admit = peaks > self.values[:, -1]  # [batch, F]; empty slots are 0, so fires only
        feats = admit.any(0).nonzero().squeeze(1)
        if feats.numel() == 0:
            return 0
        # Rejected candidates get -1: below every kept value and every empty slot.
        cand = torch.where(admit[:, feats], peaks[:, feats], -1.0).T  # [Fs, batch]
        merged = torch.cat([self.values[feats], cand], dim=1)
        # Stable: on equal activations the earlier sequence (buffer, then batch order) wins.
        order = merged.sort(dim=1, descending=True, stable=True).indices[:, :n]
        new = order >= n
        batch_row = (order - n).clamp(min=0)
        old_slot = order.clamp(max=n - 1)
        seq_ids = torch.arange(first_row, first_row + batch, device=acts.device)

        values = merged.gather(1, order)
        sequences = torch.where(new, seq_ids[batch_row], self.sequences[feats].gather(1, old_slot))
        positions = torch.where(
            new,
            peak_pos[:, feats].T.gather(1, batch_row),
            self.positions[feats].gather(1, old_slot),
        )
        windows = self.windows[feats].gather(1, old_slot[..., None].expand(-1, -1, spec.width))
        fi, slot = new.nonzero(as_tuple=True)
        if fi.numel():
            # Transient [batch, seq, F] (the size of the encoder's own pre-activations): each
            # window value is then one lookup instead of a search through k indices.
            windows[fi, slot] = window_activations(
                densify(acts, indices, self.num_latents),
                batch_row[fi, slot],
                feats[fi],
                positions[fi, slot],
                spec.window_before,
                spec.window_after,
            )
        self.values[feats] = values
        self.sequences[feats] = sequences
        self.positions[feats] = positions
        self.windows[feats] = windows
        return int(fi.numel())


class FiringStats:
    """Per-feature fire count, activation sum and maximum over counted tokens, on device."""

    def __init__(self, num_latents: int, device: torch.device):
        self.count = torch.zeros(num_latents, dtype=torch.int64, device=device)
        # float64: ten million small additions per feature would drift in float32.
        self.total = torch.zeros(num_latents, dtype=torch.float64, device=device)
        self.peak = torch.zeros(num_latents, device=device)
        self.tokens = 0

    def update(self, acts: torch.Tensor, indices: torch.Tensor, tokens: int) -> None:
        """acts, indices: [..., k], uncounted positions zeroed; tokens: positions counted."""
        fired = acts > 0
        idx, vals = indices[fired], acts[fired]
        self.count += torch.bincount(idx, minlength=self.count.numel())
        self.total.index_add_(0, idx, vals.double())
        self.peak.scatter_reduce_(0, idx, vals, "amax")
        self.tokens += tokens


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


@torch.inference_mode()
def stream(
    model,
    sae,
    hookpoint: str,
    tokens: np.ndarray,
    spec: MaxactSpec,
    special_ids: list[int],
    desc: str = "maxact",
) -> tuple[TopExamples, FiringStats]:
    """One pass over the token rows ([rows, seq], memory-mapped), batch by batch."""
    device = sae.device
    special = torch.tensor(special_ids, dtype=torch.int64, device=device)
    top = TopExamples(sae.num_latents, spec, device)
    stats = FiringStats(sae.num_latents, device)
    rows, seq = tokens.shape
    bar = progress(total=rows * seq, desc=desc, unit="tok", unit_scale=True)
    for start in range(0, rows, spec.batch_size):
        ids = torch.from_numpy(tokens[start : start + spec.batch_size].astype(np.int64))
        acts, indices, counted = encode_batch(model, sae, hookpoint, ids.to(device), special)
        stats.update(acts, indices, counted)
        top.update(acts, indices, first_row=start)
        bar.update(ids.numel())
    bar.close()
    return top, stats


# ---------------------------------------------------------------------------------------------
# Inputs and outputs


def read_special_ids(manifest_path: Path) -> list[int]:
    """BOS, EOS and PAD ids of the tokenized splits (never peaks, never counted)."""
    try:
        manifest = json.loads(Path(manifest_path).read_text())
    except (OSError, ValueError) as e:
        raise LoupeError(f"cannot read token manifest {manifest_path}: {e}") from e
    ids = {manifest.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return sorted(i for i in ids if i is not None)


def load_sae(sae_dir: Path, device: torch.device):
    """The trained SAE, encoder only (the decoder is never used here), in fp32."""
    sparsify = import_sparsify()
    sae_dir = Path(sae_dir)
    if not (sae_dir / "cfg.json").exists() or not (sae_dir / "sae.safetensors").exists():
        raise LoupeError(f"no trained SAE in {sae_dir} (needs cfg.json and sae.safetensors)")
    try:
        sae = sparsify.SparseCoder.load_from_disk(sae_dir, device=device, decoder=False)
    except Exception as e:
        raise LoupeError(f"cannot load SAE from {sae_dir}: {type(e).__name__}: {e}") from e
    return sae.float().eval().requires_grad_(False)


def write_stats(path: Path, top: TopExamples, stats: FiringStats, metadata: dict) -> dict:
    """feature_stats.parquet: one row per feature, dead ones included."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    count = stats.count.cpu().numpy()
    total = stats.total.cpu().numpy()
    firing = count > 0
    mean = np.zeros(count.shape, dtype=np.float64)
    mean[firing] = total[firing] / count[firing]
    kept = (top.sequences >= 0).sum(1).cpu().numpy()
    tokens = stats.tokens
    table = pa.table(
        {
            "feature": pa.array(np.arange(count.size, dtype=np.int64)),
            "fire_count": pa.array(count.astype(np.int64)),
            "density": pa.array(count / tokens if tokens else np.zeros(count.size)),
            "max_activation": pa.array(stats.peak.cpu().numpy().astype(np.float32)),
            "mean_activation": pa.array(mean.astype(np.float32)),
            "examples": pa.array(kept.astype(np.int64)),
            "tokens": pa.array(np.full(count.size, tokens, dtype=np.int64)),
        }
    ).replace_schema_metadata({"loupe": json.dumps(metadata, sort_keys=True)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return {"dead": int((~firing).sum()), "examples": int(kept.sum())}


def examples_schema():
    import pyarrow as pa

    # The published columns first, exactly as the model card names them.
    return pa.schema(
        [
            ("feature", pa.int64()),
            ("activation", pa.float32()),
            ("token", pa.string()),
            ("context", pa.string()),
            ("context_tokens", pa.string()),
            ("token_activations", pa.string()),
            ("layer", pa.int64()),
            ("rank", pa.int64()),
            ("peak_index", pa.int64()),
            ("token_id", pa.int64()),
            ("sequence", pa.int64()),
            ("position", pa.int64()),
        ]
    )


def decode_many(tokenizer, sequences: list[list[int]]) -> list[str]:
    """tokenizer.decode(ids) of each sequence, special tokens kept. Straight to the Rust
    tokenizer's batched decode when that gives the same text: transformers' batch_decode
    checks every id in Python, the slowest part of writing a million examples."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return backend.decode_batch(sequences, skip_special_tokens=False)
    return tokenizer.batch_decode(sequences, skip_special_tokens=False)


class TokenStrings:
    """Each id's string (the tokenizer's decoding of that id alone) and its JSON encoding,
    computed once per id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text: dict[int, str] = {}
        self.json: dict[int, str] = {}

    def _fill(self, ids: np.ndarray) -> list[int]:
        ids = [int(i) for i in ids]
        missing = [i for i in ids if i not in self.text]
        for i, text in zip(
            missing, decode_many(self.tokenizer, [[i] for i in missing]), strict=True
        ):
            self.text[i], self.json[i] = text, json.dumps(text, ensure_ascii=False)
        return ids

    def __call__(self, ids: np.ndarray) -> list[str]:
        return [self.text[i] for i in self._fill(ids)]

    def as_json(self, ids: np.ndarray) -> list[str]:
        return [self.json[i] for i in self._fill(ids)]


def _json_lists(values, offsets: np.ndarray):
    """'[v0,v1,...]' per list, from flat JSON-ready strings and list offsets."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)
    return pc.binary_join_element_wise("[", pc.binary_join(lists, ","), "]", "")


def example_table(
    top: dict[str, np.ndarray],
    features: np.ndarray,
    ranks: np.ndarray,
    tokens: np.ndarray,
    strings: TokenStrings,
    tokenizer,
    spec: MaxactSpec,
    layer: int,
):
    """The rows of the given (feature, rank) examples, from CPU copies of TopExamples."""
    import pyarrow as pa
    import pyarrow.compute as pc

    seq_len = tokens.shape[1]
    seqs = top["sequences"][features, ranks]
    pos = top["positions"][features, ranks]
    t = pos[:, None] + np.arange(-spec.window_before, spec.window_after + 1)
    inside = (t >= 0) & (t < seq_len)  # windows are clipped at row edges
    ids = np.asarray(tokens[seqs[:, None], t.clip(0, seq_len - 1)]).astype(np.int64)
    lengths = inside.sum(1)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat_ids = ids[inside]
    flat_acts = top["windows"][features, ranks][inside].astype(np.float32)

    uniq, inverse = np.unique(flat_ids, return_inverse=True)
    as_json = pa.array(strings.as_json(uniq))
    token_ids = ids[:, spec.window_before]  # the unclipped window is centred on the peak
    peak_index = np.minimum(pos, spec.window_before)  # positions clipped off the row start
    windows = [w.tolist() for w in np.split(flat_ids, offsets[1:-1])]
    return pa.table(
        {
            "feature": pa.array(features.astype(np.int64)),
            "activation": pa.array(top["values"][features, ranks].astype(np.float32)),
            "token": pa.array(strings(token_ids)),
            "context": pa.array(decode_many(tokenizer, windows)),
            "context_tokens": _json_lists(as_json.take(pa.array(inverse)), offsets),
            "token_activations": _json_lists(pc.cast(pa.array(flat_acts), pa.string()), offsets),
            "layer": pa.array(np.full(len(features), layer, dtype=np.int64)),
            "rank": pa.array(ranks.astype(np.int64)),
            "peak_index": pa.array(peak_index.astype(np.int64)),
            "token_id": pa.array(token_ids.astype(np.int64)),
            "sequence": pa.array(seqs.astype(np.int64)),
            "position": pa.array(pos.astype(np.int64)),
        },
        schema=examples_schema(),
    )


def write_examples(
    path: Path,
    top: TopExamples,
    tokens: np.ndarray,
    tokenizer,
    layer: int,
    metadata: dict,
) -> int:
    """max_activations.parquet: sorted by feature then activation desc, zstd, one row group
    per ROW_GROUP_FEATURES features (built and written group by group). Returns rows."""
    import pyarrow.parquet as pq

    spec = top.spec
    cpu = {
        name: getattr(top, name).cpu().numpy()
        for name in ("values", "sequences", "positions", "windows")
    }
    strings = TokenStrings(tokenizer)
    schema = examples_schema().with_metadata({"loupe": json.dumps(metadata, sort_keys=True)})
    written = 0
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(
            tmp,
            schema,
            compression="zstd",
            write_page_index=True,
            sorting_columns=[
                pq.SortingColumn(0),
                pq.SortingColumn(1, descending=True),
            ],
        ) as writer:
            for first in range(0, top.num_latents, ROW_GROUP_FEATURES):
                kept = cpu["sequences"][first : first + ROW_GROUP_FEATURES] >= 0
                features, ranks = np.nonzero(kept)  # row-major: feature, then rank
                if not len(features):
                    continue
                table = example_table(
                    cpu, features + first, ranks, tokens, strings, tokenizer, spec, layer
                )
                writer.write_table(table, row_group_size=len(table))
                written += len(table)
    return written


def sample_layer(
    settings: dict,
    layer: int,
    sae_dir: Path,
    tokens_path: Path,
    manifest_path: Path,
    examples_path: Path,
    stats_path: Path,
    threads: int = 1,
) -> dict:
    """Stream the sample split through layers 0..layer and the SAE; write both parquet files."""
    spec = MaxactSpec.from_settings(settings)
    if layer not in settings["model"].get("layers", [layer]):
        raise LoupeError(f"layer {layer} is not in model.layers {settings['model']['layers']}")
    tokens = open_split(tokens_path)
    special = read_special_ids(manifest_path)
    device = resolve_device(settings["device"])
    if device.type == "cpu":
        torch.set_num_threads(max(1, threads))
    sae = load_sae(sae_dir, device)
    hookpoint = hookpoint_of(settings, layer)
    model_cfg = settings["model"]
    model = load_text_model(model_cfg["name"], device, model_cfg.get("revision"))
    if sae.d_in != hidden_size(model):
        raise LoupeError(
            f"SAE in {sae_dir} has d_in {sae.d_in}, but {model_cfg['name']} has hidden size"
            f" {hidden_size(model)}: it was trained on another model"
        )
    truncate_after(model, hookpoint)
    tokenizer = load_tokenizer(tokenizer_name(settings), model_cfg.get("revision"))

    rows, seq = tokens.shape
    log.info(
        "layer %d: %s rows x %d tokens, %d features, top %d, window -%d/+%d, on %s",
        layer,
        f"{rows:,}",
        seq,
        sae.num_latents,
        spec.top_n,
        spec.window_before,
        spec.window_after,
        device,
    )
    t0 = time.perf_counter()
    top, stats = stream(model, sae, hookpoint, tokens, spec, special, desc=f"maxact layer {layer}")
    elapsed = time.perf_counter() - t0

    metadata = {
        "layer": layer,
        "hookpoint": hookpoint,
        "num_latents": sae.num_latents,
        "k": sae.cfg.k,
        "top_n": spec.top_n,
        "window_before": spec.window_before,
        "window_after": spec.window_after,
        "sample_rows": rows,
        "ctx_len": seq,
        "tokens": stats.tokens,
        "special_token_ids": special,
    }
    counts = write_stats(stats_path, top, stats, metadata)
    written = write_examples(examples_path, top, tokens, tokenizer, layer, metadata)
    summary = {
        "layer": layer,
        "tokens": rows * seq,
        "counted_tokens": stats.tokens,
        "seconds": round(elapsed, 2),
        "tokens_per_s": rows * seq / max(elapsed, 1e-9),
        "dead_features": counts["dead"],
        "features": sae.num_latents,
        "examples": written,
    }
    log.info(
        "layer %d: %s tokens (%s non-special) in %.1fs (%.0f tokens/s); %d of %d features dead;"
        " %s examples written",
        layer,
        f"{summary['tokens']:,}",
        f"{stats.tokens:,}",
        elapsed,
        summary["tokens_per_s"],
        counts["dead"],
        sae.num_latents,
        f"{written:,}",
    )
    return summary
