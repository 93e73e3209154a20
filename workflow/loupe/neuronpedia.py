"""The suite as a Neuronpedia export, written straight from loupe's parquet files.

Neuronpedia imports the files its own export writes (utils/neuronpedia-utils/neuronpedia_utils/
export-data.py and convert-saedashboard-to-neuronpedia-export.py in hijohnnylin/neuronpedia):
per source (one SAE: `<layer>-<source set>`), in `<model id>/<source id>/`, one row each of
`release.jsonl`, `model.jsonl`, `sourceset.jsonl`, `source.jsonl`, then
`features/batch-N.jsonl.gz` (1,024 features each, by index), `activations/batch-N.jsonl.gz`
(the activation records of the same features) and, when given, `explanations/batch-N.jsonl.gz`.
Each row carries the fields of its db model (neuronpedia_utils/db_models/*.py).

What loupe has no counterpart for stays at the db model's default: the full-vocabulary logit
histogram, neuron alignment, correlated neurons and features, decoder weight distribution,
steering vectors. Within-layer neighbours (topkCosSim*) and explanations come from the
feature-neighbours and explanations stages when their files are given, else stay empty."""

from __future__ import annotations

import datetime
import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_dir
from .config import Config
from .errors import LoupeError
from .layout import Layout
from .progress import progress
from .saelens import SuiteFacts, model_link, release_name, sae_shape, source_id, suite_facts

log = logging.getLogger(__name__)

BATCH_FEATURES = 1024  # features per batch file (export-data.py's FEATURES_EXPLANATIONS_BATCH_SIZE)
# Every row names a creator (creatorId/authorId are required in Neuronpedia's prisma schema):
# its default creator, the user its seed creates in every instance (apps/webapp/prisma/seed.ts,
# DEFAULT_CREATOR_USER_ID in apps/webapp/lib/env.ts), whose activations are public.
CREATOR_ID = "clkht01d40000jv08hvalcvly"
# Neighbours kept per feature: Neuronpedia's exports carry the top 25 cosine neighbours.
TOP_COS_SIM = 25
GZIP_LEVEL = 5  # as Neuronpedia's exports


@dataclass(frozen=True)
class LayerFiles:
    """One layer's inputs: loupe's parquet files, optional neighbours and explanations."""

    layer: int
    sae: Path  # sae.safetensors (its width)
    examples: Path
    intervals: Path
    stats: Path
    logits: Path
    neighbours: Path | None = None  # feature_neighbours.parquet (relation "same" is used)
    explanations: Path | None = None  # explanations.parquet


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


# --- the four one-row files ------------------------------------------------------------------


def release_row(config: Config, facts: SuiteFacts, created: str) -> dict:
    """release.jsonl (db_models/source_release.py: SourceRelease)."""
    name = release_name(config)
    owner = config.hub.authors or config.hub.repo.split("/")[0]
    return {
        "name": name,
        "description": f"{name}: sparse autoencoders for every layer of {facts.model_name}",
        "creatorName": owner,
        "creatorId": CREATOR_ID,
        "visibility": "PUBLIC",
        "isNewUi": False,
        "featured": False,
        "descriptionShort": name,
        "urls": [f"https://huggingface.co/{config.hub.repo}"],
        "creatorEmail": None,
        "creatorNameShort": owner,
        "defaultSourceSetName": facts.neuronpedia_set,
        "defaultSourceId": None,
        "defaultUmapSourceIds": [],
        "createdAt": created,
    }


def model_row(config: Config, facts: SuiteFacts, d_in: int, created: str) -> dict:
    """model.jsonl (db_models/model.py: Model)."""
    name = facts.neuronpedia_model
    return {
        "id": name,
        "instruct": name.endswith("-it"),
        "creatorId": CREATOR_ID,
        "displayNameShort": name,
        "displayName": facts.model_name,
        "tlensId": None,  # TransformerLens does not know Gemma 4
        "dimension": d_in,
        "visibility": "PUBLIC",
        "defaultSourceSetName": None,
        "defaultSourceId": None,
        "inferenceEnabled": False,
        "layers": len(config.model.layers),
        "neuronsPerLayer": 0,
        "createdAt": created,
        "owner": facts.model_name.split("/")[0] if "/" in facts.model_name else "",
        "updatedAt": created,
        "website": model_link(facts.model_name),
    }


def sourceset_row(config: Config, facts: SuiteFacts, num_latents: int, created: str) -> dict:
    """sourceset.jsonl (db_models/source_set.py: SourceSet)."""
    owner = config.hub.authors or config.hub.repo.split("/")[0]
    return {
        "modelId": facts.neuronpedia_model,
        "name": facts.neuronpedia_set,
        "creatorId": CREATOR_ID,
        "hasDashboards": True,
        "visibility": "PUBLIC",
        "description": f"Residual Stream - {num_latents:,} latents (TopK, sparsify)",
        "type": "",
        "creatorName": owner,
        "urls": [f"https://huggingface.co/{config.hub.repo}"],
        "creatorEmail": None,
        "releaseName": release_name(config),
        "defaultOfModelId": None,
        "defaultRange": 1,
        "defaultShowBreaks": True,
        "showDfa": False,
        "showCorrelated": False,
        "showHeadAttribution": False,
        "showUmap": False,
        "createdAt": created,
    }


def source_row(config: Config, facts: SuiteFacts, layer: int, created: str) -> dict:
    """source.jsonl (db_models/source.py: Source): the SAE's Hub folder, in SAELens' layout
    when staged (hub.saelens), else sparsify's."""
    layout = Layout.of(config)
    folder = layout.saelens_dir(layer) if config.hub.saelens else layout.sae_dir(layer)
    return {
        "id": source_id(facts, layer),
        "modelId": facts.neuronpedia_model,
        "setName": facts.neuronpedia_set,
        "creatorId": CREATOR_ID,
        "hasDashboards": True,
        "inferenceEnabled": False,
        "inferenceHosts": [],
        "saelensConfig": None,
        "saelensRelease": config.hub.repo if config.hub.saelens else None,
        "saelensSaeId": folder if config.hub.saelens else None,
        "hfRepoId": config.hub.repo,
        "hfFolderId": folder,
        "visibility": "PUBLIC",
        "defaultOfModelId": None,
        "hasUmap": False,
        "hasUmapLogSparsity": False,
        "hasUmapClusters": False,
        "num_prompts": config.tokens.rows()["sample"],  # the rows the examples come from
        "num_tokens_in_prompt": config.tokens.ctx_len,
        "dataset": facts.dataset_path,
        "notes": None,
        "createdAt": created,
    }


# --- features --------------------------------------------------------------------------------


def histogram_bars(counts: list[int], edges: list[float]) -> tuple[list[float], list[float]]:
    """feature_stats' histogram as Neuronpedia's bars (freq_hist_data_bar_values: where each
    bar sits, _heights: its count): an inner bin at its edges' geometric mean, the open bins
    below the first and from the last edge at those edges; leading and trailing empty bins
    dropped."""
    if len(counts) != len(edges) + 1:
        raise LoupeError(f"histogram of {len(counts)} bins for {len(edges)} edges")
    e = np.asarray(edges, dtype=np.float64)
    where = np.concatenate([[e[0]], np.sqrt(e[:-1] * e[1:]), [e[-1]]])
    nonzero = np.flatnonzero(np.asarray(counts))
    if not len(nonzero):
        return [], []
    lo, hi = nonzero[0], nonzero[-1] + 1
    return [float(v) for v in where[lo:hi]], [float(c) for c in counts[lo:hi]]


def _by_feature(df, key: str = "feature") -> dict[int, object]:
    """A polars frame split into one frame per feature."""
    return {int(k[0]): part for k, part in df.partition_by(key, as_dict=True).items()}


def feature_rows(files: LayerFiles, facts: SuiteFacts, num_latents: int, created: str):
    """features/*.jsonl rows of one layer (db_models/feature.py: Feature), by index."""
    import polars as pl
    import pyarrow.parquet as pq

    stats = pl.read_parquet(files.stats).sort("feature")
    edges = json.loads(pq.read_schema(files.stats).metadata[b"loupe"])["histogram_edges"]
    logits = _by_feature(pl.read_parquet(files.logits).sort("feature", "sign", "rank"))
    neighbours = read_neighbours(files.neighbours) if files.neighbours else {}
    by_feature = {int(r["feature"]): r for r in stats.iter_rows(named=True)}
    source = source_id(facts, files.layer)
    empty = pl.DataFrame(schema={"sign": pl.String, "token": pl.String, "value": pl.Float32})
    for feature in range(num_latents):
        s = by_feature.get(feature, {})
        lg = logits.get(feature, empty)
        pos = lg.filter(pl.col("sign") == "positive")
        neg = lg.filter(pl.col("sign") == "negative")
        values, heights = histogram_bars(s.get("histogram") or [0], edges if s else [])
        indices, cosines = neighbours.get(feature, ([], []))
        yield {
            "modelId": facts.neuronpedia_model,
            "layer": source,
            "index": str(feature),
            "creatorId": CREATOR_ID,
            "createdAt": created,
            "maxActApprox": float(s.get("max_activation") or 0.0),
            "hasVector": False,
            "vector": [],
            "vectorLabel": None,
            "vectorDefaultSteerStrength": 10,
            "hookName": None,
            "topkCosSimIndices": indices,
            "topkCosSimValues": cosines,
            "neuron_alignment_indices": [],
            "neuron_alignment_values": [],
            "neuron_alignment_l1": [],
            "correlated_neurons_indices": [],
            "correlated_neurons_pearson": [],
            "correlated_neurons_l1": [],
            "correlated_features_indices": [],
            "correlated_features_pearson": [],
            "correlated_features_l1": [],
            "neg_str": neg["token"].to_list(),
            "neg_values": [float(v) for v in neg["value"]],
            "pos_str": pos["token"].to_list(),
            "pos_values": [float(v) for v in pos["value"]],
            "frac_nonzero": float(s.get("density") or 0.0),
            "freq_hist_data_bar_heights": heights,
            "freq_hist_data_bar_values": values,
            "logits_hist_data_bar_heights": [],
            "logits_hist_data_bar_values": [],
            "decoder_weights_dist": [],
            "sourceSetName": facts.neuronpedia_set,
        }


def read_neighbours(path: Path) -> dict[int, tuple[list[int], list[float]]]:
    """Each feature's within-layer neighbours from feature_neighbours.parquet (relation
    "same"), best first: (topkCosSimIndices, topkCosSimValues), at most TOP_COS_SIM."""
    import polars as pl

    df = (
        pl.read_parquet(path, columns=["feature", "relation", "rank", "other_feature", "cosine"])
        .filter(pl.col("relation") == "same")
        .sort("feature", "rank")
    )
    return {
        feature: (
            [int(v) for v in part["other_feature"][:TOP_COS_SIM]],
            [float(v) for v in part["cosine"][:TOP_COS_SIM]],
        )
        for feature, part in _by_feature(df).items()
    }


# --- activations and explanations ------------------------------------------------------------


def activation_row(row: dict, facts: SuiteFacts, layer: int, kind: str, created: str) -> dict:
    """One activations/*.jsonl row (db_models/activation.py: Activation) from a row of
    max_activations (kind "top") or interval_examples (kind "interval": its interval's range
    and count as binMin, binMax, binContains)."""
    tokens = json.loads(row["context_tokens"])
    values = [float(v) for v in json.loads(row["token_activations"])]
    interval = kind == "interval"
    number = f"{row['interval']}-{row['rank']}" if interval else str(row["rank"])
    source = source_id(facts, layer)
    return {
        "id": f"{facts.neuronpedia_model}-{source}-{row['feature']}-{kind}-{number}",
        "tokens": tokens,
        "index": str(row["feature"]),
        "layer": source,
        "modelId": facts.neuronpedia_model,
        "maxValue": max(values),
        "maxValueTokenIndex": int(row["peak_index"]),
        "minValue": min(values),
        "values": values,
        "creatorId": CREATOR_ID,
        "dataSource": facts.dataset_path,
        "dataIndex": str(row["sequence"]),  # the row of loupe's sample split
        "dfaValues": [],
        "dfaTargetIndex": None,
        "dfaMaxValue": None,
        "createdAt": created,
        "lossValues": [],
        "logitContributions": None,
        "binMin": float(row["interval_low"]) if interval else None,
        "binMax": float(row["interval_high"]) if interval else None,
        "binContains": float(row["interval_count"]) if interval else None,
        "qualifyingTokenIndex": int(row["peak_index"]),
        "zIndices": None,
        "zValues": None,
    }


def explanation_rows(path: Path, facts: SuiteFacts, layer: int, created: str) -> list[dict]:
    """explanations/*.jsonl rows (db_models/explanation.py: Explanation) from
    explanations.parquet: its finished explanations (status "ok", or no status column)."""
    import polars as pl

    df = pl.read_parquet(path).sort("feature")
    if "status" in df.columns:
        df = df.filter(pl.col("status") == "ok")
    source = source_id(facts, layer)
    rows = []
    for r in df.iter_rows(named=True):
        if not r.get("explanation"):
            continue
        scores = {k: r[k] for k in ("detection", "fuzzing") if r.get(k) is not None}
        rows.append(
            {
                "id": f"{facts.neuronpedia_model}-{source}-{r['feature']}-explanation",
                "modelId": facts.neuronpedia_model,
                "layer": source,
                "index": str(r["feature"]),
                "description": r["explanation"],
                "authorId": CREATOR_ID,
                "embedding": None,
                "triggeredById": None,
                "typeName": "delphi",
                "explanationModelName": r.get("explainer"),
                "notes": json.dumps(scores) if scores else None,
                "createdAt": created,
            }
        )
    return rows


# --- writing ---------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows, compress: bool) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if compress:
        path.write_bytes(gzip.compress(text.encode(), compresslevel=GZIP_LEVEL, mtime=0))
    else:
        path.write_text(text)
    return text.count("\n")


def _batched(rows: list[dict], feature_of) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in rows:
        out.setdefault(int(feature_of(r)) // BATCH_FEATURES, []).append(r)
    return out


def export_layer(config: Config, files: LayerFiles, facts: SuiteFacts, out: Path, created: str):
    """One source's folder `out` (`<model id>/<source id>`); returns rows written per kind."""
    import polars as pl

    d_in, num_latents = sae_shape(files.sae)
    counts = {}
    features = list(feature_rows(files, facts, num_latents, created))
    for b, rows in _batched(features, lambda r: r["index"]).items():
        _write_jsonl(out / "features" / f"batch-{b}.jsonl.gz", rows, True)
    counts["features"] = len(features)

    activations = []
    for kind, path in (("top", files.examples), ("interval", files.intervals)):
        for r in pl.read_parquet(path).sort("feature").iter_rows(named=True):
            activations.append(activation_row(r, facts, files.layer, kind, created))
    for b, rows in _batched(activations, lambda r: r["index"]).items():
        _write_jsonl(out / "activations" / f"batch-{b}.jsonl.gz", rows, True)
    counts["activations"] = len(activations)

    if files.explanations is not None:
        explanations = explanation_rows(files.explanations, facts, files.layer, created)
        for b, rows in _batched(explanations, lambda r: r["index"]).items():
            _write_jsonl(out / "explanations" / f"batch-{b}.jsonl.gz", rows, True)
        counts["explanations"] = len(explanations)

    source = source_row(config, facts, files.layer, created)
    _write_jsonl(out / "release.jsonl", [release_row(config, facts, created)], False)
    _write_jsonl(out / "model.jsonl", [model_row(config, facts, d_in, created)], False)
    sourceset = sourceset_row(config, facts, num_latents, created)
    _write_jsonl(out / "sourceset.jsonl", [sourceset], False)
    _write_jsonl(out / "source.jsonl", [source], False)
    return counts


def _per_layer(name: str, paths: list[Path], layers: list[int]) -> list[Path | None]:
    """An optional per-layer input: none at all, or one per layer in model.layers order."""
    if not paths:
        return [None] * len(layers)
    if len(paths) != len(layers):
        raise LoupeError(f"{name}: {len(paths)} files for {len(layers)} layers {layers}")
    return [Path(p) for p in paths]


def export(
    config: Config,
    sae: list[Path],
    examples: list[Path],
    intervals: list[Path],
    stats: list[Path],
    logits: list[Path],
    out_dir: Path,
    neighbours: list[Path] | None = None,
    explanations: list[Path] | None = None,
) -> dict:
    """The whole suite's Neuronpedia export in `out_dir` (written whole or not at all): one
    `<model id>/<source id>/` folder per layer. Per-layer lists in model.layers order;
    `neighbours` and `explanations` may be empty."""
    layers = list(config.model.layers)
    required = {
        "sae": sae,
        "examples": examples,
        "intervals": intervals,
        "stats": stats,
        "logits": logits,
    }
    for name, paths in required.items():
        if len(paths) != len(layers):
            raise LoupeError(f"{name}: {len(paths)} files for {len(layers)} layers {layers}")
    given = zip(
        layers,
        sae,
        examples,
        intervals,
        stats,
        logits,
        _per_layer("neighbours", neighbours or [], layers),
        _per_layer("explanations", explanations or [], layers),
        strict=True,
    )
    facts = suite_facts(config, sae_shape(Path(sae[0]))[1])
    created = _now()
    summary = {}
    with atomic_dir(out_dir) as tmp:
        for layer, *paths in progress(iterable=list(given), desc="neuronpedia", unit="layer"):
            files = LayerFiles(layer, *(Path(p) if p is not None else None for p in paths))
            folder = f"{facts.neuronpedia_model}/{source_id(facts, layer)}"
            summary[folder] = export_layer(config, files, facts, tmp / folder, created)
    log.info("wrote the Neuronpedia export of %d sources to %s", len(summary), out_dir)
    return summary
