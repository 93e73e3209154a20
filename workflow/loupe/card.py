"""The model card (the repo's README.md), generated from the config used and the staged files,
so every number it states is the one the run actually used or measured.

The body is a Jinja2 template (assets/card.md), its YAML front matter huggingface_hub's
ModelCardData, and the quick start's code a real python file (assets/quickstart.py, which ruff
checks) whose `# %% name` cells become the card's code blocks, its `NAME = value` constants
set to this suite's (`fill_constants`, the contract publish's notebook parameters follow)."""

from __future__ import annotations

import csv
import datetime
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__, number_format
from . import layout as file_names
from .config import Config
from .errors import LoupeError
from .examples import ROW_GROUP_FEATURES
from .layout import (
    FLOW_TABLE,
    LADDER_CSV,
    LADDER_PLOT,
    SAE_CFG,
    SAE_WEIGHTS,
    SPLICED_CSV,
    SPLICED_PLOT,
    TRANSFER_CSV,
    TRANSFER_PLOT,
    Layout,
    example_layer,
)
from .metrics import METRICS, ladder_column, transfer_column
from .number_format import fixed, measured
from .saelens import release_name
from .tokens import is_hub_id

if TYPE_CHECKING:
    from huggingface_hub import ModelCardData

ASSETS = Path(__file__).with_name("assets")
CARD_TEMPLATE = "card.md"  # in ASSETS
QUICKSTART = ASSETS / "quickstart.py"
RECIPES = ASSETS / "recipes"  # SAELens and delphi, rendered into the card beside the quick start

LANGUAGES = {
    "en": "English",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "it": "Italian",
    "zh": "Chinese",
}

TAGS = ["sparse-autoencoder", "sae", "interpretability", "mechanistic-interpretability", "sparsify"]


@dataclass
class CardFacts:
    """What the card reports that is measured rather than configured."""

    layers: list[int]
    sae: dict  # the staged cfg.json of the example layer (sparsify's SparseCoderConfig + d_in)
    num_latents: int
    sae_bytes: int  # one layer's sae.safetensors
    metrics: list[dict]
    example_columns: list[tuple[str, str, str]]  # name, type, description (the file's schema)
    example_rows: int  # summed over layers
    stats_columns: list[tuple[str, str, str]]
    plots: list[str]  # repo paths
    # The other per-feature files' columns ({PER_LAYER kind: columns}), from their schemas like
    # the two above; by default their writers' schemas (the staged files are written with them).
    columns: dict[str, list[tuple[str, str, str]]] = field(default_factory=lambda: writer_columns())
    tokens: dict = field(default_factory=dict)  # tokens/manifest.json's per-split token counts
    sources: dict | None = None  # tokens/manifest.json's sources: what RedPajama files were read
    histogram_bins: int = 0  # feature_stats' histogram columns
    saelens_registry: str = ""  # the staged SAELens registry entry (hub.saelens), as YAML
    # The staged tables of the ladder, transfer and splice (file name -> rows), those staged.
    tables: dict[str, list[dict]] = field(default_factory=dict)
    explanations: list[dict] = field(default_factory=list)  # loupe.explanation_scores rows
    # Per layer (feature_stats' `examples`): its features, those without examples (dead on the
    # sampled tokens) and those with fewer than maxact.top_n.
    coverage: list[dict] = field(default_factory=list)
    sizes: dict = field(default_factory=dict)  # repo_sizes of the staged files
    # The tokens manifest (tokenize's) where given: the sample split's rows, width and sha256.
    sample_split: dict = field(default_factory=dict)


# The per-feature files (PER_LAYER kinds) whose column tables the card shows beside the top
# examples' and the stats'.
COLUMN_TABLES = ("intervals", "logits", "neighbours")


def _columns_of(schema) -> list[tuple[str, str, str]]:
    """A pyarrow schema's columns: name, type, description (its field metadata)."""
    from .examples import column_descriptions

    described = column_descriptions(schema)
    return [(f.name, str(f.type), described[f.name]) for f in schema]


def _schema(path: Path) -> tuple[list[tuple[str, str, str]], int]:
    """A parquet file's columns (name, type, description from the file's schema) and rows."""
    import pyarrow.parquet as pq

    return _columns_of(pq.read_schema(path)), pq.read_metadata(path).num_rows


def staged_columns(root: Path, layout: Layout, layer: int) -> dict[str, list[tuple[str, str, str]]]:
    """The columns of each COLUMN_TABLES kind as layer `layer`'s staged file gives them, and
    the explanations' where they are staged."""
    kinds = COLUMN_TABLES + ("explanations",)
    paths = {kind: root / layout.per_layer(kind, layer) for kind in kinds}
    return {kind: _schema(path)[0] for kind, path in paths.items() if path.is_file()}


def writer_columns() -> dict[str, list[tuple[str, str, str]]]:
    """The columns of each COLUMN_TABLES kind as its writer's schema gives them."""
    from .examples import interval_examples_schema
    from .explain import explanations_schema
    from .logits import feature_logits_schema
    from .neighbours import neighbours_schema

    schemas = (interval_examples_schema, feature_logits_schema, neighbours_schema)
    columns = {k: _columns_of(s()) for k, s in zip(COLUMN_TABLES, schemas, strict=True)}
    return columns | {"explanations": _columns_of(explanations_schema())}


def metrics_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "layer" not in rows[0]:
        raise LoupeError(f"{path}: expected a CSV with a 'layer' column and one row per layer")
    return rows


def collect_facts(
    config: Config,
    layout: Layout,
    root: Path,
    tokens_manifest: Path | None = None,
    plots: list[str] | None = None,
) -> CardFacts:
    """Read the facts from a staged repo at `root`; `plots`: file names in the order to show
    them (default: every plot, by name)."""
    from safetensors import safe_open

    layers = list(config.model.layers)
    sae_dir = root / layout.sae_dir(example_layer(layers))
    sae = json.loads((sae_dir / SAE_CFG).read_text())
    with safe_open(sae_dir / SAE_WEIGHTS, framework="pt") as f:
        num_latents = f.get_slice("encoder.bias").get_shape()[0]
    example_columns, rows = _schema(root / layout.examples(layers[0]))
    example_rows = rows + sum(_schema(root / layout.examples(n))[1] for n in layers[1:])
    manifest = {}
    if tokens_manifest is not None and Path(tokens_manifest).is_file():
        manifest = json.loads(Path(tokens_manifest).read_text())
    tokens = manifest.get("tokens", {})
    top_n = config.maxact.top_n
    return CardFacts(
        layers=layers,
        sae=sae,
        num_latents=num_latents,
        sae_bytes=(sae_dir / SAE_WEIGHTS).stat().st_size,
        metrics=metrics_rows(root / layout.metrics),
        example_columns=example_columns,
        example_rows=example_rows,
        stats_columns=_schema(root / layout.stats(layers[0]))[0],
        columns=staged_columns(root, layout, layers[0]),
        plots=[
            f"{layout.plots}/{name}"
            for name in (plots or sorted(p.name for p in (root / layout.plots).glob("*.png")))
        ],
        tokens=tokens,
        sources=manifest.get("sources"),
        histogram_bins=_histogram_bins(root / layout.stats(layers[0])),
        saelens_registry=_text_if_present(root / layout.saelens_registry),
        tables={
            name: _csv_rows(root / layout.table(name))
            for name in (LADDER_CSV, TRANSFER_CSV, SPLICED_CSV, FLOW_TABLE)
            if (root / layout.table(name)).is_file()
        },
        explanations=_explanation_scores(root, layout, layers),
        coverage=[_coverage(root / layout.stats(n), n, top_n) for n in layers],
        sizes=repo_sizes(root, layout, layers),
        sample_split=(
            {
                "rows": manifest["rows"]["sample"],
                "ctx_len": manifest["ctx_len"],
                "sha256": manifest["sha256"]["sample"],
            }
            if "sha256" in manifest
            else {}
        ),
    )


def _coverage(stats: Path, layer: int, top_n: int) -> dict:
    """A layer's features: all, those without examples, those with fewer than `top_n`."""
    import pyarrow.parquet as pq

    kept = pq.read_table(stats, columns=["examples"])["examples"].to_numpy()
    return {
        "layer": layer,
        "features": len(kept),
        "none": int((kept == 0).sum()),
        "fewer": int(((kept > 0) & (kept < top_n)).sum()),
    }


def repo_sizes(root: Path, layout: Layout, layers: list[int]) -> dict:
    """Bytes of the files under `root`: per layer, its SAE folder (`sae`: what loading one
    layer downloads), its SAELens copy (`saelens`) and its parquet files (`data`), with their
    `total`; `shared`: every other file; `total`: all of them."""
    files = {
        p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()
    }

    def under(folder: str) -> int:
        return sum(size for path, size in files.items() if path.startswith(folder + "/"))

    per_layer = {}
    for n in layers:
        parts = {
            "sae": under(layout.sae_dir(n)),
            "saelens": under(layout.saelens_dir(n)),
            "data": sum(files.get(layout.per_layer(kind, n), 0) for kind in file_names.PER_LAYER),
        }
        per_layer[n] = {**parts, "total": sum(parts.values())}
    total = sum(files.values())
    return {
        "layers": per_layer,
        "shared": total - sum(p["total"] for p in per_layer.values()),
        "total": total,
    }


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _explanation_scores(root: Path, layout: Layout, layers: list[int]) -> list[dict]:
    """Per layer, the staged explanations' coverage and scores; [] where none are staged."""
    from .explanation_scores import scores_by_layer

    paths = [root / layout.per_layer("explanations", n) for n in layers]
    if not all(p.is_file() for p in paths):
        return []
    return scores_by_layer(layers, paths, [root / layout.stats(n) for n in layers])


def _explanation_rows(facts: CardFacts) -> list[list]:
    def score(row: dict, scorer: str) -> str:
        if not row[f"{scorer}_scored"]:
            return "-"
        quartiles = " / ".join(fixed(row[f"{scorer}_{q}"], 2) for q in ("q25", "median", "q75"))
        return f"{fixed(row[f'{scorer}_mean'], 3)} ({quartiles})"

    return [
        [
            r["layer"],
            f"{r['ok']:,} of {r['live']:,} ({r['coverage']:.1%})",
            f"{r['unparsed']:,} / {r['failed']:,}",
            f"{r['detection_scored']:,}",
            score(r, "detection"),
            score(r, "fuzzing"),
        ]
        for r in facts.explanations
    ]


def _text_if_present(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def _histogram_bins(stats: Path) -> int:
    """Bins of the feature_stats histogram: one more than its edges (in the file's metadata)."""
    import pyarrow.parquet as pq

    meta = json.loads(pq.read_schema(stats).metadata[b"loupe"])
    return len(meta["histogram_edges"]) + 1


def card_data(config: Config) -> ModelCardData:
    """The front matter the Hub reads (huggingface_hub.ModelCardData)."""
    from huggingface_hub import ModelCardData

    model, dataset, hub = config.model, config.dataset, config.hub
    return ModelCardData(
        license=hub.license,
        library_name="sparsify",
        tags=list(TAGS),
        base_model=model.name if is_hub_id(model.name) else None,
        datasets=[dataset.hub_id] if is_hub_id(dataset.hub_id) else None,
        language=[hub.language],
    )


# --- the quick start's code ----------------------------------------------------------------


def python_literal(value) -> str:
    """`value` as Python source: strings in double quotes (as ruff formats them), a range from
    0 as `range(n)`."""
    if isinstance(value, range) and value.step == 1:
        return f"range({value.stop})" if value.start == 0 else f"range({value.start}, {value.stop})"
    if isinstance(value, str):
        return json.dumps(value)  # JSON's string escapes are Python's too
    return repr(value)


def fill_constants(source: str, values: dict) -> str:
    """Python `source` with the value of each line `NAME = value` (at column 0, a trailing
    comment kept) named in `values` replaced by that value; every name must be there."""
    found = set()

    def fill(m: re.Match) -> str:
        found.add(m["name"])
        return f"{m['name']} = {python_literal(values[m['name']])}{m['comment'] or ''}"

    names = "|".join(map(re.escape, values))
    filled = re.sub(rf"^(?P<name>{names}) = .*?(?P<comment>\s+#.*)?$", fill, source, flags=re.M)
    if missing := sorted(set(values) - found):
        raise ValueError(f"no line `NAME = ...` for {missing}")
    return filled


def code_cells(source: str) -> dict[str, str]:
    """The `# %% name` cells of a python file by name, in order (what precedes the first
    cell, the file's own header, is left out)."""
    parts = re.split(r"^# %% (\w+)\n", source, flags=re.M)
    return {name: body.strip("\n") for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def quick_start(config: Config, layout: Layout, layers: list[int]) -> dict[str, str]:
    """The quick start's code blocks by name, with this suite's repo, layers and model; tests
    run them against the staged repo."""
    values = {
        "REPO": config.hub.repo,
        "PREFIX": layout.prefix,
        "LAYER_MODULE": layout.hookpoint_template,
        "LAYERS": range(len(layers)) if layers == list(range(len(layers))) else layers,
        "LAYER": example_layer(layers),
        "MODEL": config.model.name,
    }
    cells = code_cells(fill_constants(QUICKSTART.read_text(), values))
    values["SAE_ID"] = layout.saelens_dir(example_layer(layers))  # the SAELens recipes' layer
    # The SAELens and delphi recipes: the same constants, those each file has.
    for recipe in sorted(RECIPES.glob("*.py")):
        source = recipe.read_text()
        named = {k: v for k, v in values.items() if re.search(rf"^{k} = ", source, re.M)}
        cells |= code_cells(fill_constants(source, named))
    return cells


# --- the card ------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _sources(sources: dict) -> str:
    """The snapshots and shards the tokens came from, as the tokenize manifest records them."""
    read = ", ".join(
        f"{snapshot} shards {_ranges(shards)}" for snapshot, shards in sources["shards"].items()
    )
    return f"{len(sources['files'])} files: {read}" + (
        f" ({len(sources['skipped'])} skipped)" if sources.get("skipped") else ""
    )


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, n in enumerate(numbers):
        start = n if start is None else start
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(f"{start}-{n}" if n != start else f"{n}")
            start = None
    return ", ".join(out)


def _training_rows(config: Config, facts: CardFacts) -> list[tuple[str, str]]:
    """The training table: the staged SAE's shape, then the config's training settings."""
    sae, train, tokens, dataset = facts.sae, config.train, config.tokens, config.dataset
    trained = facts.tokens.get("train")
    rounded = trained and trained != tokens.train_tokens
    tok = number_format.tokens(tokens.train_tokens) + (
        f" ({trained:,} after rounding to whole rows)" if rounded else ""
    )
    excluded = train.exclude_tokens
    optimizer = train.optimizer + (" (ScheduleFree SignSGD)" if train.optimizer == "signum" else "")
    return [
        ("d_in", f"{sae['d_in']:,}"),
        ("latents", f"{facts.num_latents:,} (expansion factor {sae['expansion_factor']})"),
        ("activation", f"{sae['activation']}, k = {sae['k']}"),
        ("multi_topk", "on (auxiliary 4k reconstruction)" if sae["multi_topk"] else "off"),
        ("normalize_decoder", "on" if sae["normalize_decoder"] else "off"),
        ("auxk_alpha", measured(train.auxk_alpha)),
        (
            "excluded tokens",
            ", ".join(f"id {t}" for t in excluded) + " (masked out of training)"
            if excluded
            else "none",
        ),
        ("training tokens", f"{tok} per layer, {dataset.description or dataset.path}"),
        *([("documents read", _sources(facts.sources))] if facts.sources else []),
        ("context length", f"{tokens.ctx_len:,} tokens"),
        ("optimizer", optimizer),
        ("learning rate", f"{train.lr:g} (set explicitly)"),
        (
            "batch",
            f"{train.batch_size} sequences x {tokens.ctx_len:,} tokens,"
            f" grad_acc_steps = {train.grad_acc_steps}",
        ),
        ("dead feature threshold", f"{train.dead_feature_threshold:,} tokens"),
        ("init seed", ", ".join(str(s) for s in train.init_seeds)),
    ]


def _columns(columns: list[tuple[str, str, str]]) -> list[list[str]]:
    return [[f"`{name}`", kind, description] for name, kind, description in columns]


def _other_columns(facts: CardFacts) -> dict[str, list[list[str]]]:
    """The rows of facts.columns' tables; the intervals' holds only the columns that differ
    from the top examples' (the interval's own, and `rank`, counted within the interval)."""
    out = {kind: _columns(columns) for kind, columns in facts.columns.items()}
    out["intervals"] = _columns(
        [c for c in facts.columns["intervals"] if c not in facts.example_columns]
    )
    return out


def _citation(config: Config, name: str) -> str:
    hub, year = config.hub, datetime.date.today().year
    key = re.sub(r"\W+", "_", name).strip("_").lower()
    return "\n".join(
        [
            f"@misc{{{key}_{year},",
            f"  title        = {{{{{name}}}: sparse autoencoders for every layer of"
            f" {config.model.name}}},",
            f"  author       = {{{hub.authors or hub.repo.split('/')[0]}}},",
            f"  year         = {{{year}}},",
            f"  howpublished = {{\\url{{https://huggingface.co/{hub.repo}}}}},",
            "}",
        ]
    )


def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(ASSETS),
        undefined=jinja2.StrictUndefined,  # a misspelt name fails the render, not the card
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # Markdown, not HTML
    )
    env.filters.update(
        tokens=number_format.tokens, thousands="{:,}".format, size=number_format.size
    )
    env.globals["table"] = _table
    return env


def render_card(config: Config, facts: CardFacts) -> str:
    """README.md: YAML front matter the Hub reads, then the card in Markdown."""
    layout = Layout.of(config)
    model = config.model
    name = config.hub.repo.split("/")[-1]
    shown = [m for m in METRICS if m.name in facts.metrics[0]]
    rows = sorted(facts.metrics, key=lambda r: int(float(r["layer"])))
    eval_tokens = min(
        facts.tokens.get("eval", config.tokens.eval_tokens), config.evaluate.max_tokens
    )
    language = config.hub.language
    return (
        _environment()
        .get_template(CARD_TEMPLATE)
        .render(
            config=config,
            facts=facts,
            layout=layout,
            files=file_names,
            card_data=card_data(config).to_yaml(),
            name=name,
            model_link=(
                f"[{model.name}](https://huggingface.co/{model.name})"
                if is_hub_id(model.name)
                else f"`{model.name}`"
            ),
            code=quick_start(config, layout, facts.layers),
            example_layer=example_layer(facts.layers),
            saelens_release=release_name(config),
            training=_training_rows(config, facts),
            example_columns=_columns(facts.example_columns),
            stats_columns=_columns(facts.stats_columns),
            columns=_other_columns(facts),
            eval_tokens=eval_tokens,
            metrics=shown,
            metric_rows=[[r["layer"], *(measured(r[m.name]) for m in shown)] for r in rows],
            dense_threshold=f"{config.evaluate.dense_threshold:.0%}",
            histogram_bins=facts.histogram_bins,
            plots=[(Path(p).stem, p) for p in facts.plots if Path(p).name not in ADDITION_PLOTS],
            additions=evaluation_additions(config, facts, shown_plots(facts)),
            flow_rows=[
                [
                    f"{r['layer']} → {r['next_layer']}",
                    measured(r["median_cosine"]),
                    r["tokens"],
                    measured(r["coactivation"]),
                    measured(r["random_coactivation"]),
                    measured(r["lift"]),
                ]
                for r in facts.tables.get(FLOW_TABLE, [])
            ],
            language=LANGUAGES.get(language, f"`{language}`"),
            citation=_citation(config, name),
            explanation_rows=_explanation_rows(facts),
            coverage=_coverage_summary(facts, config.maxact.top_n),
            size_rows=_size_rows(config, facts),
            tokenize_settings=_yaml(config.settings_for("tokenize")),
            loupe_version=__version__,
            row_group_features=ROW_GROUP_FEATURES,
            explainers=sorted({r["explainer"] for r in facts.explanations} - {""}),
        )
    )


def _share(n: int, of: int) -> str:
    return f"{n:,} ({n / of:.1%})" if of else f"{n:,}"


def _coverage_summary(facts: CardFacts, top_n: int) -> dict:
    """The examples' coverage: per layer, features without examples and with fewer than
    `top_n`, and the totals over the suite."""
    rows = [
        [
            c["layer"],
            f"{c['features']:,}",
            _share(c["none"], c["features"]),
            _share(c["fewer"], c["features"]),
        ]
        for c in facts.coverage
    ]
    features = sum(c["features"] for c in facts.coverage)
    return {
        "rows": rows,
        "features": features,
        "none": _share(sum(c["none"] for c in facts.coverage), features),
        "fewer": _share(sum(c["fewer"] for c in facts.coverage), features),
    }


def _size_rows(config: Config, facts: CardFacts) -> list[list]:
    """Per layer: its SAE folder, its SAELens copy (where staged), its parquet files, in all."""
    return [
        [
            layer,
            number_format.size(s["sae"]),
            *([number_format.size(s["saelens"])] if config.hub.saelens else []),
            number_format.size(s["data"]),
            number_format.size(s["total"]),
        ]
        for layer, s in facts.sizes.get("layers", {}).items()
    ]


def _yaml(settings: dict) -> str:
    import yaml

    return yaml.safe_dump(settings, sort_keys=False, allow_unicode=True)


# --- the evaluations suites are compared by: the ladder, transfer, the whole suite spliced ---

ADDITION_PLOTS = (LADDER_PLOT, TRANSFER_PLOT, SPLICED_PLOT)  # shown in their own sections


def shown_plots(facts: CardFacts) -> dict[str, str]:
    """The staged plots by file name -> repo path."""
    return {Path(p).name: p for p in facts.plots}


def _layer(row: dict) -> int:
    return int(float(row["layer"]))


def _layers(layers: list[int]) -> str:
    """[7, 21] -> 'layers 7, 21'; [] -> 'no layer'."""
    if not layers:
        return "no layer"
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(map(str, layers))


def ladder_section(facts: CardFacts, plots: dict[str, str]) -> dict | None:
    """The ladder's table (FVU and delta-CE per layer at each k; columns named as in
    metrics.csv) and plot; None where ladder.csv was not staged, no rows where the ladder
    was empty."""
    if LADDER_CSV not in facts.tables:
        return None
    rows = facts.tables[LADDER_CSV]
    ks = sorted({int(r["k"]) for r in rows})
    cells = {(_layer(r), int(r["k"])): r for r in rows}
    keys = ("fvu", "delta_ce")
    header = ["layer", *(ladder_column(key, k) for key in keys for k in ks)]
    table = [
        [layer, *(measured(cells.get((layer, k), {}).get(key)) for key in keys for k in ks)]
        for layer in sorted({_layer(r) for r in rows})
    ]
    return {"ks": ks, "header": header, "rows": table, "plot": plots.get(LADDER_PLOT)}


def transfer_section(config: Config, facts: CardFacts, plots: dict[str, str]) -> dict | None:
    """Per layer, the base model's FVU, explained variance and delta-CE beside each transfer
    model's (columns named as in metrics.csv), each model's means over the layers and the
    layers where its explained variance is negative; None where transfer.csv was not staged."""
    if TRANSFER_CSV not in facts.tables:
        return None
    base = config.model.name
    rows = facts.tables[TRANSFER_CSV]
    models = [m for m in dict.fromkeys(r["model"] for r in rows) if m != base]
    cells = {(_layer(r), r["model"]): r for r in rows}
    keys = ("fvu", "explained_variance", "delta_ce")
    header = ["layer"]
    for key in keys:
        header += [key, *(transfer_column(key, m) for m in models)]
    layers = sorted({_layer(r) for r in rows})
    table = [
        [
            layer,
            *(
                measured(cells.get((layer, m), {}).get(key))
                for key in keys
                for m in (base, *models)
            ),
        ]
        for layer in layers
    ]

    def mean(model: str, key: str) -> str:
        values = [float(v) for n in layers if (v := cells.get((n, model), {}).get(key))]
        return measured(sum(values) / len(values)) if values else "n/a"

    summary = [
        {
            "model": m,
            **{key: mean(m, key) for key in keys},
            # FVU above 1: worse than the activations' mean; explained variance (1 - the
            # error's variance over theirs) ignores a constant offset, so it can stay positive.
            "above_one": _layers(
                [n for n in layers if (v := cells.get((n, m), {}).get("fvu")) and float(v) > 1]
            ),
            "negative": _layers(
                [
                    n
                    for n in layers
                    if (v := cells.get((n, m), {}).get("explained_variance")) and float(v) < 0
                ]
            ),
        }
        for m in (base, *models)
    ]
    return {
        "models": models,
        "header": header if models else [],
        "rows": table if models else [],
        "means": summary,
        "plot": plots.get(TRANSFER_PLOT) if models else None,
    }


def spliced_section(config: Config, facts: CardFacts, plots: dict[str, str]) -> dict | None:
    """Per prefix (the SAEs of the first layers up to L spliced in at once): CE, delta-CE and
    KL beside the sum of the per-layer delta-CEs up to L (metrics.csv); the whole suite's
    numbers; None where spliced.csv was not staged or is empty."""
    prefixes = facts.tables.get(SPLICED_CSV)
    if not prefixes:
        return None
    per_layer = {_layer(r): r.get("delta_ce") for r in facts.metrics}
    summed, table = 0.0, []
    for p in prefixes:
        d = per_layer.get(int(float(p["last_layer"])))
        summed = summed + float(d) if d not in (None, "") and summed is not None else None
        table.append(
            [
                p["last_layer"],
                p["spliced_layers"],
                measured(p["ce_loss_spliced"]),
                measured(p["delta_ce"]),
                measured(p["kl"]),
                measured(summed),
            ]
        )
    suite = prefixes[-1]
    clean = float(suite["ce_loss_spliced"]) - float(suite["delta_ce"])
    tokens = min(
        facts.tokens.get("eval", config.tokens.eval_tokens), config.evaluate.spliced_max_tokens
    )
    eval_tokens = min(
        facts.tokens.get("eval", config.tokens.eval_tokens), config.evaluate.max_tokens
    )
    return {
        "rows": table,
        "eval_tokens": eval_tokens,
        "layers": suite["spliced_layers"],
        "clean": measured(clean),
        "spliced": measured(suite["ce_loss_spliced"]),
        "delta_ce": measured(suite["delta_ce"]),
        "kl": measured(suite["kl"]),
        "summed": measured(summed),
        "tokens": tokens,
        "plot": plots.get(SPLICED_PLOT),
    }


def evaluation_additions(config: Config, facts: CardFacts, plots: dict[str, str]) -> dict:
    """The card's sections on the sparsity ladder, transfer and the whole suite spliced."""
    return {
        "ladder": ladder_section(facts, plots),
        "transfer": transfer_section(config, facts, plots),
        "spliced": spliced_section(config, facts, plots),
    }
