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
from loupe.examples import (
    ROW_GROUP_FEATURES,
    examples_schema,
    interval_examples_schema,
    stats_schema,
    writer_options,
)
from loupe.explain import PROMPT_VERSION, explanations_schema
from loupe.layout import PER_LAYER
from loupe.logits import feature_logits_schema
from loupe.neighbours import decoder_neighbours, neighbours_table, write_neighbours

GROUP_FEATURES = ROW_GROUP_FEATURES  # features per row group, as the pipeline writes them
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

# The published schemas, each column with its description, as the pipeline writes them.
EXAMPLE_FIELDS = list(examples_schema())
INTERVAL_FIELDS = list(interval_examples_schema())
STATS_FIELDS = list(stats_schema())
LOGIT_FIELDS = list(feature_logits_schema())


def write_groups(path: Path, fields: list, rows: list[dict], metadata: dict | None = None):
    """Rows sorted by feature, one row group per GROUP_FEATURES features, with the pipeline's
    writer options (zstd, page index, small pages)."""
    schema = pa.schema(fields)
    if metadata is not None:
        schema = schema.with_metadata({"loupe": json.dumps(metadata)})
    write_table_groups(path, pa.Table.from_pylist(rows, schema=schema))


def write_table_groups(path: Path, table: pa.Table) -> None:
    """A table sorted by feature as the pipeline writes it: a row group per GROUP_FEATURES."""
    path.parent.mkdir(parents=True, exist_ok=True)
    features = table.column("feature").to_numpy()
    with pq.ParquetWriter(path, table.schema, **writer_options(table.schema)) as writer:
        for first in range(0, int(features.max()) + 1 if len(features) else 0, GROUP_FEATURES):
            lo, hi = np.searchsorted(features, [first, first + GROUP_FEATURES])
            if hi > lo:
                writer.write_table(table.slice(lo, hi - lo), row_group_size=hi - lo)


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


def build_wide_repo(
    root: Path, num_latents: int = 49_152, examples: int = 4, width: int = 32, seed: int = 0
) -> dict:
    """A staged repo of one layer at gemma-loupe's width (49,152 features: 48 row groups of
    1,024 as the pipeline writes them, 768 of 64 before), its columns built at once with numpy
    so it takes seconds: max_activations (`examples` rows per feature), feature_stats and
    feature_logits (10 promoted and 10 suppressed tokens per feature). Returns its suite.json."""
    rng = np.random.default_rng(seed)
    layer, vocab = 3, np.array(VOCAB, dtype=object)
    n = num_latents * examples
    ids = rng.integers(0, len(VOCAB), (n, width))
    peak = ids[:, width // 2]
    acts = np.round(rng.random((n, width)).astype(np.float32) * 5, 3)
    columns = {
        "feature": np.repeat(np.arange(num_latents), examples),
        "activation": acts[:, width // 2],
        "token": vocab[peak].tolist(),
        "context": ["".join(vocab[r]) for r in ids],
        "context_tokens": [json.dumps(list(vocab[r]), ensure_ascii=False) for r in ids],
        "token_activations": [json.dumps(a.tolist()) for a in acts],
        "layer": np.full(n, layer),
        "rank": np.tile(np.arange(examples), num_latents),
        "peak_index": np.full(n, width // 2),
        "token_id": peak,
        "sequence": rng.integers(0, 5000, n),
        "position": rng.integers(0, 1024, n),
    }
    paths = {
        kind: root / PREFIX / folder / f"layer_{layer}.parquet"
        for kind, folder in PER_LAYER.items()
    }
    meta = {"loupe": json.dumps({"layer": layer})}
    write_table_groups(paths["examples"], pa.table(columns, pa.schema(EXAMPLE_FIELDS, meta)))
    edges = np.linspace(0.0, 5.0, 17)
    hist = rng.integers(0, 50, (num_latents, len(edges) - 1))
    stats = {
        "feature": np.arange(num_latents),
        "fire_count": hist.sum(1),
        "density": hist.sum(1) / 200_000,
        "max_activation": np.full(num_latents, 5.0, np.float32),
        "mean_activation": np.full(num_latents, 1.0, np.float32),
        "examples": np.full(num_latents, examples),
        "tokens": np.full(num_latents, 200_000),
        "histogram": list(hist),
    }
    meta = {"loupe": json.dumps({"layer": layer, "histogram_edges": edges.tolist()})}
    write_table_groups(paths["stats"], pa.table(stats, pa.schema(STATS_FIELDS, meta)))
    rows = num_latents * 20
    token_ids = rng.integers(0, len(VOCAB), rows)
    logits = {
        "feature": np.repeat(np.arange(num_latents), 20),
        "sign": np.tile(np.repeat(["negative", "positive"], 10), num_latents),
        "rank": np.tile(np.arange(10), 2 * num_latents),
        "token_id": token_ids,
        "token": vocab[token_ids].tolist(),
        "value": rng.standard_normal(rows).astype(np.float32),
    }
    meta = {"loupe": json.dumps({"layer": layer})}
    write_table_groups(paths["logits"], pa.table(logits, pa.schema(LOGIT_FIELDS, meta)))
    return install_browser(root, PREFIX, [layer], num_latents, MODEL)


# Words the synthetic explanations are made of: each feature's names two of them.
TOPICS = ["code", "rivers", "cities", "music", "punctuation", "numbers", "emotion", "animals"]


def explanation_rows(layer: int, num_latents: int, seed: int = 0) -> list[dict]:
    """The explain stage's rows for every other feature of a layer: an explanation naming two
    TOPICS; detection and fuzzing scores on most (None: not scored); every 11th request
    failed (no explanation, no scores), as loupe.explain writes them."""
    rng = np.random.default_rng([seed, layer, 21])
    rows = []
    for f in range(0, num_latents, 2):
        a, b = rng.choice(len(TOPICS), 2, replace=False)
        failed = f % 11 == 4
        scored = not failed and f % 7 != 2
        rows.append(
            {
                "feature": f,
                "explanation": None if failed else f"Mentions of {TOPICS[a]} next to {TOPICS[b]}",
                "detection": float(rng.random()) if scored else None,
                "fuzzing": float(rng.random()) if scored else None,
                "explainer": "tiny-explainer",
                "n_examples": 0 if failed else 4,
                "prompt_tokens": 0 if failed else 812,
                "completion_tokens": 0 if failed else 14,
                "status": "failed" if failed else "ok",
                "layer": layer,
                "prompt_version": PROMPT_VERSION,
                "delphi": "0.1.3",
            }
        )
    return rows


def write_explanations(root: Path, layer: int, rows: list[dict]) -> Path:
    """explanations/layer_N.parquet as the explain stage writes it (its schema, one zstd
    table: loupe.explain._explain_layer); returns its path."""
    path = root / PREFIX / PER_LAYER["explanations"] / f"layer_{layer}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=explanations_schema())
    pq.write_table(table, path, compression="zstd")
    return path
