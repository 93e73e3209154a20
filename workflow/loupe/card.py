"""The model card (the repo's README.md), generated from the config used and the staged files,
so every number it states is the one the run actually used or measured."""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .publish import NOTEBOOK, Layout, example_layer, layout_of, metrics_rows

# Metrics shown in the per-layer table, in this order, when summary's metrics.csv has them.
METRICS = {
    "fvu": "fraction of variance unexplained: squared error over the input's variance (lower is better)",
    "explained_variance": "1 - the error's variance over the input's variance",
    "cosine": "mean cosine similarity of reconstruction and input",
    "l0": "mean number of active features per token",
    "dead_fraction": "fraction of features that never fired on the sampled tokens",
    "dense_fraction": "fraction of features firing on more than {dense} of the sampled tokens",
    "ce_loss_clean": "next-token loss of the unmodified model",
    "ce_loss_spliced": "next-token loss with the layer's output replaced by the reconstruction",
    "delta_ce": "ce_loss_spliced - ce_loss_clean (lower is better)",
    "ce_loss_zero_ablation": "next-token loss with the layer's output set to zero",
    "ce_loss_score": "fraction of the zero-ablation loss increase the SAE recovers (1 is perfect)",
    "kl": "KL divergence of the spliced from the clean next-token distribution",
}

EXAMPLE_COLUMNS = {
    "feature": "feature (latent) index",
    "activation": "the feature's peak activation in this example",
    "token": "the token at the peak",
    "context": "the text of the window around the peak",
    "context_tokens": "JSON list of the window's token strings",
    "token_activations": "JSON list of the feature's activation at each window position",
    "layer": "decoder layer",
    "rank": "rank of the example within its feature (0 is the strongest)",
    "peak_index": "index of the peak in `context_tokens`",
    "token_id": "token id at the peak",
    "sequence": "row of the sampled token split the example comes from",
    "position": "position of the peak within that row",
}

STATS_COLUMNS = {
    "feature": "feature (latent) index",
    "fire_count": "sampled tokens on which the feature was active (among the top k, above 0)",
    "density": "fire_count / tokens",
    "max_activation": "largest activation seen",
    "mean_activation": "mean activation over the tokens where it fired",
    "examples": "max-activating examples kept for the feature",
    "tokens": "tokens counted (special tokens excluded)",
}

LANGUAGES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish", "zh": "Chinese"}

TAGS = ["sparse-autoencoder", "sae", "interpretability", "mechanistic-interpretability", "sparsify"]


@dataclass
class CardFacts:
    """What the card reports that is measured rather than configured."""

    layers: list[int]
    sae: dict  # the staged cfg.json of the example layer (sparsify's SparseCoderConfig + d_in)
    num_latents: int
    sae_bytes: int  # one layer's sae.safetensors
    metrics: list[dict]
    example_columns: list[tuple[str, str]]
    example_rows: int  # summed over layers
    stats_columns: list[tuple[str, str]]
    plots: list[str]  # repo paths
    tokens: dict = field(default_factory=dict)  # tokens/manifest.json's per-split token counts


def _schema(path: Path) -> tuple[list[tuple[str, str]], int]:
    import pyarrow.parquet as pq

    meta = pq.read_metadata(path)
    return [(f.name, str(f.type)) for f in meta.schema.to_arrow_schema()], meta.num_rows


def collect_facts(
    settings: dict,
    layout: Layout,
    root: Path,
    tokens_manifest: Path | None = None,
    plots: list[str] | None = None,
) -> CardFacts:
    """Read the facts from a staged repo at `root`; `plots`: file names in the order to show
    them (default: every plot, by name)."""
    from safetensors import safe_open

    layers = list(settings["model"]["layers"])
    sae_dir = root / layout.sae_dir(example_layer(layers))
    sae = json.loads((sae_dir / "cfg.json").read_text())
    with safe_open(sae_dir / "sae.safetensors", framework="pt") as f:
        num_latents = f.get_slice("encoder.bias").get_shape()[0]
    example_columns, rows = _schema(root / layout.examples(layers[0]))
    example_rows = rows + sum(_schema(root / layout.examples(n))[1] for n in layers[1:])
    tokens = {}
    if tokens_manifest is not None and Path(tokens_manifest).is_file():
        tokens = json.loads(Path(tokens_manifest).read_text()).get("tokens", {})
    return CardFacts(
        layers=layers,
        sae=sae,
        num_latents=num_latents,
        sae_bytes=(sae_dir / "sae.safetensors").stat().st_size,
        metrics=metrics_rows(root / layout.metrics),
        example_columns=example_columns,
        example_rows=example_rows,
        stats_columns=_schema(root / layout.stats(layers[0]))[0],
        plots=[
            f"{layout.plots}/{name}"
            for name in (plots or sorted(p.name for p in (root / layout.plots).glob("*.png")))
        ],
        tokens=tokens,
    )


def _is_hub_id(name: str | None) -> bool:
    """A hub id (owner/name), not a local folder: only those go into the card's metadata."""
    return bool(name and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists())


def front_matter(settings: dict) -> dict:
    hub, model, dataset = settings["hub"], settings["model"], settings["dataset"]
    meta = {"license": hub["license"], "library_name": "sparsify", "tags": list(TAGS)}
    if _is_hub_id(model["name"]):
        meta["base_model"] = model["name"]
    if _is_hub_id(dataset.get("hub_id")):
        meta["datasets"] = [dataset["hub_id"]]
    meta["language"] = [hub.get("language", "en")]
    return meta


def _n(x: float) -> str:
    """A token count as people say it: 1B, 10M, 262,144."""
    for unit, size in (("B", 10**9), ("M", 10**6)):
        if x >= size and x % (size // 10) == 0:
            return f"{x / size:g}{unit}"
    return f"{x:,}"


def _fmt(value: str) -> str:
    if value in (None, ""):
        return "n/a"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return str(int(v)) if v.is_integer() and abs(v) >= 1 else f"{v:.4g}"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


def _layers_expr(layers: list[int]) -> str:
    return f"range({len(layers)})" if layers == list(range(len(layers))) else str(layers)


def quick_start(settings: dict, layout: Layout, facts: CardFacts) -> str:
    """The quick start's code; tests run every python block of it against the staged repo."""
    repo, prefix = settings["hub"]["repo"], layout.prefix
    layer = example_layer(facts.layers)
    hookpoint = layout.hookpoint(layer)
    template = layout.hookpoint_template
    each = template.replace("{layer}", "{i}")
    pattern = template.replace("{layer}", "*")
    n = len(facts.layers)
    return f"""\
```bash
pip install eai-sparsify==1.3.3 polars
```

Load one layer's SAE (downloads only that layer's folder):

```python
import torch
from sparsify import SparseCoder

REPO = "{repo}"
PREFIX = "{prefix}"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

sae = SparseCoder.load_from_hub(REPO, hookpoint=f"{{PREFIX}}/{hookpoint}", device=DEVICE)
print(sae.cfg.k, sae.num_latents)
```

Load all {n} layers ({_mb(facts.sae_bytes * n)} in float32). In eai-sparsify 1.3.3,
`load_many(REPO, pattern=...)` on its own returns an empty dict; name the SAE folders with
`layers=` (the pattern limits the download to the SAE folders):

```python
hookpoints = [f"{{PREFIX}}/{each}" for i in {_layers_expr(facts.layers)}]
saes = SparseCoder.load_many(
    REPO, layers=hookpoints, pattern=f"{{PREFIX}}/{pattern}", device=DEVICE
)
assert len(saes) == {n}
```

Encode text: run the model, take the output of decoder layer {layer} with a forward hook, and
encode it:

```python
from transformers import AutoModel, AutoTokenizer

MODEL = "{settings["model"]["name"]}"
tokenizer = AutoTokenizer.from_pretrained(MODEL)
dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
model = AutoModel.from_pretrained(MODEL, dtype=dtype).to(DEVICE).eval()

ids = tokenizer("The Eiffel Tower is in Paris.", return_tensors="pt").input_ids
if ids[0, 0] != tokenizer.bos_token_id:  # training rows always start with BOS
    ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)

captured = []
layer = model.get_submodule("{hookpoint}")
hook = layer.register_forward_hook(
    lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output)
)
with torch.inference_mode():
    model(input_ids=ids.to(DEVICE))
    hook.remove()
    acts = captured[0][0, 1:].float()  # [seq, d_in]; BOS dropped (never seen in training)
    out = sae.encode(acts)  # top_acts, top_indices: [seq, k], unsorted

tokens = tokenizer.convert_ids_to_tokens(ids[0, 1:])
for token, values, features in zip(tokens, out.top_acts, out.top_indices, strict=True):
    order = values.argsort(descending=True)[:5]
    print(f"{{token!r:>16}}", [(int(features[o]), round(float(values[o]), 2)) for o in order])
```

Browse the max-activating examples of the strongest feature on that text:

```python
import json

import polars as pl
from huggingface_hub import hf_hub_download

path = hf_hub_download(REPO, f"{{PREFIX}}/max_activations/layer_{layer}.parquet")
examples = pl.read_parquet(path)
known = set(examples["feature"].unique().to_list())
ranked = out.top_indices.flatten()[out.top_acts.flatten().argsort(descending=True)].tolist()
feature = next(f for f in ranked if f in known)

for row in examples.filter(pl.col("feature") == feature).sort("rank").head(5).iter_rows(named=True):
    window, values = json.loads(row["context_tokens"]), json.loads(row["token_activations"])
    text = "".join(f"[{{t}}]" if v > 0 else t for t, v in zip(window, values, strict=True))
    print(f"{{row['activation']:8.2f}}  {{text!r}}")
```
"""


def _training_table(settings: dict, facts: CardFacts) -> str:
    sae, train, tokens, dataset = (
        facts.sae,
        settings["train"],
        settings["tokens"],
        settings["dataset"],
    )
    trained = facts.tokens.get("train")
    tok = _n(tokens["train_tokens"]) + (
        f" ({trained:,} after rounding to whole rows)"
        if trained and trained != tokens["train_tokens"]
        else ""
    )
    excluded = train.get("exclude_tokens") or []
    rows = [
        ("d_in", f"{sae['d_in']:,}"),
        (
            "latents",
            f"{facts.num_latents:,} (expansion factor {sae['expansion_factor']})",
        ),
        ("activation", f"{sae['activation']}, k = {sae['k']}"),
        ("multi_topk", "on (auxiliary 4k reconstruction)" if sae.get("multi_topk") else "off"),
        ("normalize_decoder", "on" if sae.get("normalize_decoder") else "off"),
        ("auxk_alpha", _fmt(train.get("auxk_alpha", 0.0))),
        (
            "excluded tokens",
            ", ".join(f"id {t}" for t in excluded) + " (masked out of training)"
            if excluded
            else "none",
        ),
        ("training tokens", f"{tok} per layer, {dataset.get('description') or dataset['path']}"),
        ("context length", f"{tokens['ctx_len']:,} tokens"),
        (
            "optimizer",
            train["optimizer"]
            + (" (ScheduleFree SignSGD)" if train["optimizer"] == "signum" else ""),
        ),
        ("learning rate", f"{train['lr']:g} (set explicitly)"),
        (
            "batch",
            f"{train['batch_size']} sequences x {tokens['ctx_len']:,} tokens,"
            f" grad_acc_steps = {train.get('grad_acc_steps', 1)}",
        ),
        ("dead feature threshold", f"{train.get('dead_feature_threshold', 10_000_000):,} tokens"),
        ("init seed", ", ".join(str(s) for s in train.get("init_seeds", [0]))),
    ]
    return _table(["setting", "value"], [list(r) for r in rows])


def _metrics_table(facts: CardFacts) -> tuple[str, list[str]]:
    shown = [m for m in METRICS if m in facts.metrics[0]]
    rows = sorted(facts.metrics, key=lambda r: int(float(r["layer"])))
    table = _table(["layer", *shown], [[r["layer"], *(_fmt(r[m]) for m in shown)] for r in rows])
    return table, shown


def _columns_table(columns: list[tuple[str, str]], described: dict) -> str:
    return _table(
        ["column", "type", "meaning"],
        [[f"`{name}`", kind, described.get(name, "")] for name, kind in columns],
    )


def render_card(settings: dict, facts: CardFacts) -> str:
    """README.md: YAML front matter the Hub reads, then the card in Markdown."""
    layout = layout_of(settings)
    hub, model, tokens, maxact = (
        settings["hub"],
        settings["model"],
        settings["tokens"],
        settings.get("maxact", {}),
    )
    name = hub["repo"].split("/")[-1]
    layers = facts.layers
    first, last = layers[0], layers[-1]
    hooks = layout.hookpoint_template.replace("{layer}", f"{{{first}..{last}}}")
    model_link = (
        f"[{model['name']}](https://huggingface.co/{model['name']})"
        if _is_hub_id(model["name"])
        else f"`{model['name']}`"
    )
    metrics_table, shown = _metrics_table(facts)
    evaluate = settings.get("evaluate", {})
    eval_tokens = min(
        facts.tokens.get("eval", tokens["eval_tokens"]),
        evaluate.get("max_tokens", tokens["eval_tokens"]),
    )
    dense = f"{evaluate.get('dense_threshold', 0.1):.0%}"
    language = LANGUAGES.get(hub.get("language", "en"), f"`{hub.get('language')}`")
    year = datetime.date.today().year
    author = hub.get("authors") or hub["repo"].split("/")[0]
    key = re.sub(r"\W+", "_", name).strip("_").lower()

    body = [
        "---",
        yaml.safe_dump(front_matter(settings), sort_keys=False).rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        f"{len(layers)} sparse autoencoders (SAEs), one per text decoder layer of {model_link}"
        f" (layers {first}-{last}), trained with EleutherAI's"
        " [sparsify](https://github.com/EleutherAI/sparsify) (`eai-sparsify` on PyPI) on the"
        f" residual stream after each block: `{hooks}` (module names relative to the model's"
        f" base model). Each SAE is a TopK autoencoder with {facts.num_latents:,} latents"
        f" (k = {facts.sae['k']}) over the {facts.sae['d_in']:,}-dimensional residual stream."
        " Max-activating examples are included for every feature of every layer.",
        "",
        "## What is in this repo",
        "",
        _table(
            ["path", "contents"],
            [
                [
                    f"`{layout.prefix}/{layout.hookpoint_template.replace('{layer}', 'N')}/`",
                    "`cfg.json` and `sae.safetensors` of layer N's SAE (sparsify's format)",
                ],
                [
                    f"`{layout.prefix}/max_activations/layer_N.parquet`",
                    f"top {maxact.get('top_n', 20)} examples per feature of layer N",
                ],
                [
                    f"`{layout.prefix}/feature_stats/layer_N.parquet`",
                    "per-feature statistics of layer N on the sampled tokens",
                ],
                [f"`{layout.metrics}`", "evaluation metrics, one row per layer"],
                [f"`{layout.plots}/`", "the plots below"],
                [
                    f"`{layout.run_config}`, `config.json`",
                    "the run's settings (sparsify's run-config keys, read by SAELens'"
                    " sparsify loader)",
                ],
                [f"`{NOTEBOOK}`", "load, encode text, inspect features, browse examples"],
                ["`manifest.json`", "every file with its size and sha256"],
            ],
        ),
        "",
        "## Quick start",
        "",
        quick_start(settings, layout, facts).rstrip(),
        "",
        f"[`{NOTEBOOK}`]({NOTEBOOK}) does the same step by step and highlights the activating"
        " tokens of each example.",
        "",
        "## Training",
        "",
        f"One SAE per layer, each trained separately on that layer's activations; the model is"
        f" frozen and only layers 0..L are computed for layer L. Settings (from the config this"
        f" repo was built with; `{layout.run_config}` has all of them):",
        "",
        _training_table(settings, facts),
        "",
        "## Max-activating examples",
        "",
        f"{_n(tokens['sample_tokens'])} tokens, disjoint from the training and evaluation tokens,"
        f" were run through every layer; for each feature the {maxact.get('top_n', 20)} strongest"
        f" activations are kept, each with a window of {maxact.get('window_before', 32)} tokens"
        f" before and {maxact.get('window_after', 8)} after the peak ({facts.example_rows:,}"
        " examples in all). Columns:",
        "",
        _columns_table(facts.example_columns, EXAMPLE_COLUMNS),
        "",
        f"Per-feature statistics over the same tokens, one row per feature (dead ones"
        f" included), in `{layout.prefix}/feature_stats/layer_N.parquet`:",
        "",
        _columns_table(facts.stats_columns, STATS_COLUMNS),
        "",
        "## Evaluation",
        "",
        f"On {_n(eval_tokens)} held-out tokens, disjoint from the training tokens (positions"
        " holding BOS, EOS or PAD are neither replaced nor scored):",
        "",
        metrics_table,
        "",
        *[f"- `{m}`: {METRICS[m].format(dense=dense)}" for m in shown],
        "",
        *[f"![{Path(p).stem}]({p})\n" for p in facts.plots],
        "## Limitations",
        "",
        "- Text only: the vision and audio towers (if the model has them) are not covered; the"
        " SAEs saw only activations of text tokens.",
        f"- {language} only: trained and sampled on {language} text; behaviour on other"
        " languages is untested.",
        "- The SAEs were never trained on the BOS position (its activations are outliers); do not"
        " read features off position 0.",
        "- Features are not labelled: the examples show where a feature fires, not what it means.",
        "",
        "## Citation",
        "",
        "```bibtex",
        f"@misc{{{key}_{year},",
        f"  title        = {{{{{name}}}: sparse autoencoders for every layer of {model['name']}}},",
        f"  author       = {{{author}}},",
        f"  year         = {{{year}}},",
        f"  howpublished = {{\\url{{https://huggingface.co/{hub['repo']}}}}},",
        "}",
        "```",
        "",
    ]
    return "\n".join(body)
