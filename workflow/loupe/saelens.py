"""SAELens-native copies of the suite's SAEs and its SAELens registry entry.

SAELens (sae-lens 6.54.12) loads any Hub repo by id with its default loader, which reads
`<folder>/cfg.json`, `sae_weights.safetensors` and optionally `sparsity.safetensors`
(sae_lens/constants.py). Its sparsify converter misreads sparsify's folders (width from
`num_latents`, `W_dec` transposed, `apply_b_dec_to_input` from `normalize_decoder`), so staging
writes each layer once more in SAELens' own layout: then `SAE.from_pretrained(release=<repo id>,
sae_id=<folder>)` and `SAE.load_from_disk(<folder>)` build the TopK SAE sparsify trained.

Needs no sae-lens at staging time: the files are plain JSON and safetensors; tests load them
with the real package."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .layout import SAE_CFG, SAE_WEIGHTS, Layout
from .tokens import is_hub_id

# SAELens' file names (sae_lens/constants.py: SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME,
# SPARSITY_FILENAME); its cfg.json has the same name as sparsify's.
SAELENS_CFG = SAE_CFG
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SPARSITY = "sparsity.safetensors"
SAELENS_VERSION = "6.54.12"  # the release the layout was read from and is tested with
# SAELens' log feature sparsity: log10(density + eps) (sae_lens/training/sae_trainer.py).
LOG_SPARSITY_EPS = 1e-10


@dataclass(frozen=True)
class SuiteFacts:
    """What SAELens' cfg.json and registry entry say about the suite beyond the weights."""

    model_name: str  # the Hugging Face model id
    context_size: int  # tokens per training row
    dataset_path: str | None
    exclude_tokens: tuple[int, ...]  # token ids masked out of training
    neuronpedia_model: str  # Neuronpedia's model id, e.g. gemma-4-e2b
    neuronpedia_set: str  # the source set id: each layer's source is `<layer>-<set>`


def suite_facts(config: Config, num_latents: int) -> SuiteFacts:
    """The suite's SuiteFacts from the config; Neuronpedia's ids derived where not given."""
    hub = config.hub
    width = f"{num_latents // 1000}k" if num_latents >= 1000 else str(num_latents)
    return SuiteFacts(
        model_name=config.model.name,
        context_size=config.tokens.ctx_len,
        dataset_path=config.dataset.hub_id or config.dataset.path,
        exclude_tokens=tuple(config.train.exclude_tokens),
        neuronpedia_model=hub.neuronpedia_model or config.model.name.split("/")[-1].lower(),
        neuronpedia_set=hub.neuronpedia_set or f"{release_name(config)}-res-{width}",
    )


def release_name(config: Config) -> str:
    """The suite's release name in SAELens' registry: the repo's name, lower-cased."""
    return config.hub.repo.split("/")[-1].lower()


def neuronpedia_id(facts: SuiteFacts, layer: int) -> str:
    """The layer's Neuronpedia id as SAELens' registry writes it: `<model>/<layer>-<set>`."""
    return f"{facts.neuronpedia_model}/{source_id(facts, layer)}"


def source_id(facts: SuiteFacts, layer: int) -> str:
    """Neuronpedia's source id of a layer (its `layer` column): `<layer>-<set>`."""
    return f"{layer}-{facts.neuronpedia_set}"


def saelens_cfg(sparsify_cfg: dict, layer: int, hookpoint: str, dtype: str, facts: SuiteFacts):
    """cfg.json in SAELens 6's TopK layout for one sparsify SAE (its cfg.json, num_latents
    filled in). sparsify subtracts b_dec before encoding, whatever normalize_decoder says."""
    if sparsify_cfg.get("activation", "topk") != "topk" or sparsify_cfg.get("transcode"):
        raise ValueError("SAELens copies are written for sparsify's TopK SAEs only")
    return {
        "architecture": "topk",
        "d_in": sparsify_cfg["d_in"],
        "d_sae": sparsify_cfg["num_latents"],
        "k": sparsify_cfg["k"],
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": None,  # trained with sparsify, not SAELens
            "model_name": facts.model_name,
            # TransformerLens' name of the residual stream after block `layer`; hf_hook_name:
            # the module whose output it is, named as loupe names it (relative to AutoModel).
            "hook_name": f"blocks.{layer}.hook_resid_post",
            "hf_hook_name": hookpoint,
            "hook_head_index": None,
            "prepend_bos": True,
            "context_size": facts.context_size,
            "dataset_path": facts.dataset_path,
            "exclude_special_tokens": list(facts.exclude_tokens) or False,
            "neuronpedia_id": neuronpedia_id(facts, layer),
        },
    }


def saelens_state(sparsify_state: dict) -> dict:
    """SAELens' TopK weights from sparsify's: W_enc [d_in, d_sae] is sparsify's
    encoder.weight [d_sae, d_in] transposed; W_dec [d_sae, d_in] is stored alike by both."""
    return {
        "W_enc": sparsify_state["encoder.weight"].T.contiguous(),
        "b_enc": sparsify_state["encoder.bias"],
        "W_dec": sparsify_state["W_dec"],
        "b_dec": sparsify_state["b_dec"],
    }


def log_sparsity(stats: Path, num_latents: int):
    """[num_latents] float32: log10 of each feature's density in feature_stats (SAELens'
    sparsity.safetensors); features missing from the file count as never firing."""
    import numpy as np
    import polars as pl

    df = pl.read_parquet(stats, columns=["feature", "density"])
    density = np.zeros(num_latents, dtype=np.float64)
    density[df["feature"].to_numpy()] = df["density"].to_numpy()
    return np.log10(density + LOG_SPARSITY_EPS).astype(np.float32)


def write_saelens_folder(
    sae_dir: Path, stats: Path, out: Path, layer: int, hookpoint: str, facts: SuiteFacts
) -> None:
    """One layer's SAELens folder in `out` from its sparsify folder (cfg.json with the real
    num_latents, sae.safetensors) and feature_stats parquet."""
    import torch
    from safetensors.torch import load_file, save_file

    cfg = json.loads((Path(sae_dir) / SAE_CFG).read_text())
    state = load_file(Path(sae_dir) / SAE_WEIGHTS)
    num_latents = state["encoder.bias"].shape[0]
    cfg["num_latents"] = num_latents
    dtype = str(state["W_dec"].dtype).removeprefix("torch.")
    out.mkdir(parents=True, exist_ok=True)
    save_file(saelens_state(state), out / SAELENS_WEIGHTS)
    sparsity = torch.from_numpy(log_sparsity(stats, num_latents))
    save_file({"sparsity": sparsity}, out / SAELENS_SPARSITY)
    text = json.dumps(saelens_cfg(cfg, layer, hookpoint, dtype, facts), indent=2)
    (out / SAELENS_CFG).write_text(text + "\n")


def registry_entry(
    release: str,
    repo: str,
    layout: Layout,
    layers: list[int],
    metrics: list[dict],
    facts: SuiteFacts,
    links: dict[str, str],
) -> dict:
    """The suite's entry of SAELens' pretrained_saes.yaml: `{release: {...}}`, one `saes` row
    per layer (`l0` and `variance_explained`: metrics.csv's `l0` and `explained_variance`)."""
    by_layer = {int(float(row["layer"])): row for row in metrics}
    rows = []
    for layer in layers:
        row = {
            "id": layout.saelens_dir(layer),
            "path": layout.saelens_dir(layer),
            "neuronpedia": neuronpedia_id(facts, layer),
        }
        measured = by_layer.get(layer, {})
        for key, column in (("l0", "l0"), ("variance_explained", "explained_variance")):
            if measured.get(column) not in (None, ""):
                row[key] = round(float(measured[column]), 4)
        rows.append(row)
    return {
        release: {
            "conversion_func": None,  # SAELens' own loader: the folders are in its layout
            "links": links,
            "model": facts.model_name,
            "repo_id": repo,
            "saes": rows,
        }
    }


def registry_yaml(entry: dict) -> str:
    import yaml

    return yaml.safe_dump(entry, sort_keys=False, allow_unicode=True)


def sae_shape(weights: Path) -> tuple[int, int]:
    """(d_in, num_latents) of a sparsify sae.safetensors, read from its header."""
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as f:
        return f.get_slice("b_dec").get_shape()[0], f.get_slice("encoder.bias").get_shape()[0]


def model_link(name: str) -> str | None:
    """The model's Hub page, if `name` is a Hub id (owner/name) rather than a local folder."""
    if is_hub_id(name):
        return f"https://huggingface.co/{name}"
    return None


def stage_saelens(
    config: Config, root: Path, layers: list[tuple[int, Path, Path]], metrics: list[dict]
) -> None:
    """Write every layer's SAELens folder and the registry entry into the staged repo at
    `root`; `layers`: (layer, sparsify SAE folder, feature_stats parquet) each."""

    layout = Layout.of(config)
    facts = suite_facts(config, sae_shape(Path(layers[0][1]) / SAE_WEIGHTS)[1])
    for layer, sae_dir, stats in layers:
        out = root / layout.saelens_dir(layer)
        write_saelens_folder(sae_dir, stats, out, layer, layout.hookpoint(layer), facts)
    links = {"publication": f"https://huggingface.co/{config.hub.repo}"}
    if link := model_link(config.model.name):
        links["model"] = link
    entry = registry_entry(
        release_name(config),
        config.hub.repo,
        layout,
        [layer for layer, _, _ in layers],
        metrics,
        facts,
        links,
    )
    (root / layout.saelens_registry).write_text(registry_yaml(entry))
