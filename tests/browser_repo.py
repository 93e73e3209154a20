"""A synthetic staged hub repo for the feature browser: the parquet kinds per layer, with
exactly the published layout and schemas, plus the installed page and its suite.json. The
neighbours files are the real stage's (loupe.neighbours) on random decoders, each layer's a
noisy permutation of the one before, so chains run through the stack.

Any real staged repo (results/hub after `loupe stage`) has the same shape, so tests written
against this one can be pointed at it instead."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loupe.browse import install_browser
from loupe.layout import PER_LAYER
from loupe.neighbours import decoder_neighbours, neighbours_table, write_neighbours

GROUP_FEATURES = 64  # features per row group, as the pipeline writes them
PREFIX = "sae-tiny-gemma-4-8x"
MODEL = "tiny-gemma-4"

# Token strings as a Gemma tokenizer decodes them one by one: leading spaces, newlines, tabs,
# punctuation, and U+FFFD for the halves of a multi-byte character split across tokens.
VOCAB = [
    " the",
    " of",
    " and",
    " to",
    " in",
    " a",
    " is",
    " that",
    " for",
    " it",
    " Paris",
    " London",
    " river",
    " cat",
    " dog",
    " house",
    " music",
    " code",
    " data",
    " function",
    " return",
    " import",
    " class",
    " def",
    " self",
    " value",
    " error",
    " happy",
    " sad",
    " quickly",
    " never",
    " always",
    " between",
    " under",
    " above",
    "ing",
    "ed",
    "ly",
    "tion",
    "ment",
    "ness",
    "able",
    "er",
    "est",
    "s",
    ",",
    ".",
    ":",
    ";",
    "!",
    "?",
    " (",
    ")",
    ' "',
    "'s",
    " -",
    "://",
    "==",
    "{",
    "}",
    "\n",
    "\n\n",
    "\t",
    "    ",
    " ",
    "\ufffd",
    " \ufffd",
    "\ufffd\ufffd",
    "é",
    " naïve",
    "The",
    "In",
    "It",
    "We",
    "This",
    "Hello",
    " 1",
    " 2",
    "19",
    "00",
    " 2024",
    "<bos>",
    " über",
    " café",
    " 東京",
    " 日本",
    " 🙂",
    " <",
    "/>",
    "--",
]

EXAMPLE_FIELDS = [
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
INTERVAL_FIELDS = [
    *EXAMPLE_FIELDS,
    ("interval", pa.int64()),
    ("interval_low", pa.float32()),
    ("interval_high", pa.float32()),
]
STATS_FIELDS = [
    ("feature", pa.int64()),
    ("fire_count", pa.int64()),
    ("density", pa.float64()),
    ("max_activation", pa.float32()),
    ("mean_activation", pa.float32()),
    ("examples", pa.int64()),
    ("tokens", pa.int64()),
    ("histogram", pa.list_(pa.int64())),
]
LOGIT_FIELDS = [
    ("feature", pa.int64()),
    ("sign", pa.string()),
    ("rank", pa.int64()),
    ("token_id", pa.int64()),
    ("token", pa.string()),
    ("value", pa.float32()),
]


def write_groups(path: Path, fields: list, rows: list[dict], metadata: dict | None = None):
    """Rows sorted by feature, zstd, one row group per GROUP_FEATURES features, page index."""
    schema = pa.schema(fields)
    if metadata is not None:
        schema = schema.with_metadata({"loupe": json.dumps(metadata)})
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, schema, compression="zstd", write_page_index=True) as writer:
        groups: dict[int, list[dict]] = {}
        for row in rows:
            groups.setdefault(row["feature"] // GROUP_FEATURES, []).append(row)
        for g in sorted(groups):
            table = pa.Table.from_pylist(groups[g], schema=schema)
            writer.write_table(table, row_group_size=len(table))


def _window(rng, feature: int, activation: float, layer: int, rank: int, width: int) -> dict:
    """One example: a context window of tokens with the feature's activation on each."""
    home = (feature * 7 + layer) % len(VOCAB)  # each feature's favourite peak token
    peak_id = home if rng.random() < 0.7 else int(rng.integers(len(VOCAB)))
    peak = int(rng.integers(0, 4)) if rng.random() < 0.15 else width // 2  # clipped at row start
    ids = [int(i) for i in rng.integers(0, len(VOCAB), width)]
    ids[peak] = peak_id
    acts = np.where(rng.random(width) < 0.3, rng.random(width) * activation * 0.6, 0.0)
    acts[peak] = activation
    tokens = [VOCAB[i] for i in ids]
    acts32 = [float(np.float32(a)) for a in acts]
    return {
        "feature": feature,
        "activation": float(np.float32(activation)),
        "token": VOCAB[peak_id],
        "context": "".join(tokens),
        "context_tokens": json.dumps(tokens, ensure_ascii=False),
        "token_activations": json.dumps(acts32),
        "layer": layer,
        "rank": rank,
        "peak_index": peak,
        "token_id": peak_id,
        "sequence": int(rng.integers(0, 5000)),
        "position": int(rng.integers(peak, 256)),
    }


def build_synthetic_repo(
    root: Path,
    layers: tuple[int, ...] = (0, 3),
    num_latents: int = 448,
    examples: int = 20,
    width: int = 24,
    seed: int = 0,
) -> dict:
    """Write a staged repo under root (several row groups per file) and install the browser
    page; returns its suite.json. Every 23rd feature is dead (no examples, no logits)."""
    rng = np.random.default_rng(seed)
    _write_neighbours(root, layers, num_latents, np.random.default_rng([seed, 1]))
    tokens_seen = 200_000
    for layer in layers:
        ex_rows, iv_rows, st_rows, lg_rows = [], [], [], []
        top = rng.uniform(0.5, 40.0, num_latents)
        # Both histogram conventions the page reads: odd layers as loupe.dashboard counts
        # (log-spaced edges between columns, an underflow and an overflow column), even
        # layers with bins + 1 edges bounding every column.
        open_ended = layer % 2 == 1
        if open_ended:
            edges = np.logspace(-4, 4, 8 * 20 + 1)
        else:
            edges = np.linspace(0.0, float(top.max()), 17)
        for f in range(num_latents):
            dead = f % 23 == 5
            if not dead:
                acts = np.sort(rng.uniform(0.3, 1.0, examples))[::-1] * top[f]
                acts[0] = top[f]
                ex_rows += [_window(rng, f, a, layer, r, width) for r, a in enumerate(acts)]
                for k in range(4):  # four activation intervals of three examples each
                    lo, hi = top[f] * k / 4, top[f] * (k + 1) / 4
                    number = 3 - k if open_ended else k  # either end may be interval 0
                    for r, a in enumerate(np.sort(rng.uniform(lo, hi, 3))[::-1]):
                        row = _window(rng, f, a, layer, r, width)
                        row.update(interval=number, interval_low=float(lo), interval_high=float(hi))
                        iv_rows.append(row)
                ids = rng.choice(len(VOCAB), 20, replace=False)
                values = np.sort(rng.uniform(0.1, 3.0, 20))[::-1]
                for sign, part, scale in (("negative", ids[10:], -1), ("positive", ids[:10], 1)):
                    lg_rows += [
                        {
                            "feature": f,
                            "sign": sign,
                            "rank": r,
                            "token_id": int(i),
                            "token": VOCAB[int(i)],
                            "value": float(scale * values[r]),
                        }
                        for r, i in enumerate(part)
                    ]
            fires = 0 if dead else int(rng.integers(1, 5000))
            spots = np.clip(rng.exponential(top[f] / 4, fires), 1e-6, top[f])
            if open_ended:
                columns = np.searchsorted(edges, spots, side="right")
                hist = np.bincount(columns, minlength=len(edges) + 1).astype(np.int64)
            else:
                hist = np.histogram(spots, bins=edges)[0].astype(np.int64)
            st_rows.append(
                {
                    "feature": f,
                    "fire_count": fires,
                    "density": fires / tokens_seen,
                    "max_activation": 0.0 if dead else float(top[f]),
                    "mean_activation": 0.0 if dead else float(top[f] / 3),
                    "examples": 0 if dead else examples,
                    "tokens": tokens_seen,
                    "histogram": hist.tolist(),
                }
            )
        meta = {"layer": layer, "histogram_edges": edges.tolist()}
        paths = {
            kind: root / PREFIX / folder / f"layer_{layer}.parquet"
            for kind, folder in PER_LAYER.items()
        }
        write_groups(paths["examples"], EXAMPLE_FIELDS, ex_rows, {"layer": layer})
        write_groups(paths["intervals"], INTERVAL_FIELDS, iv_rows, {"layer": layer})
        write_groups(paths["stats"], STATS_FIELDS, st_rows, meta)
        write_groups(paths["logits"], LOGIT_FIELDS, lg_rows, {"layer": layer})
    return install_browser(root, PREFIX, layers, num_latents, MODEL)


def _write_neighbours(root: Path, layers, num_latents: int, rng, d: int = 16) -> None:
    """feature_neighbours/layer_N.parquet of every layer, as the neighbours stage writes them:
    prev/next matches only where layer -+ 1 is among `layers`."""
    import torch

    decoders, W = {}, torch.from_numpy(rng.standard_normal((num_latents, d)))
    for layer in range(min(layers), max(layers) + 1):
        W = W[torch.from_numpy(rng.permutation(num_latents))] + 0.5 * torch.from_numpy(
            rng.standard_normal((num_latents, d))
        )
        decoders[layer] = W
    for layer in layers:
        adjacent = {
            relation: (other, decoders[other])
            for relation, other in (("prev", layer - 1), ("next", layer + 1))
            if other in layers
        }
        found = decoder_neighbours(decoders[layer], adjacent, layer, top_n=5, chunk=128)
        path = root / PREFIX / PER_LAYER["neighbours"] / f"layer_{layer}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_neighbours(path, neighbours_table(found), {"layer": layer})
