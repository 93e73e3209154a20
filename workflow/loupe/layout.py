"""Names of every published file and where each lives in the hub repo: written once here,
imported everywhere else. A leaf module: it imports nothing of the package."""

from __future__ import annotations

from dataclasses import dataclass

# An SAE folder, in sparsify's on-disk format.
SAE_CFG = "cfg.json"
SAE_WEIGHTS = "sae.safetensors"
# Beside the SAE in results/layer_N/ (not published in the SAE folder).
TRAIN_METRICS = "train_metrics.jsonl"
SAE_DIGEST = "sae.sha256"  # the weights' sha256: their content key in the DAG (train.sae_digest)
# The repo root.
CARD = "README.md"
RUN_CONFIG = "config.json"
REPO_MANIFEST = "manifest.json"
NOTEBOOK = "quickstart.ipynb"
BROWSER = "browser"
# Under the prefix: each layer once more in SAELens' layout (loupe.saelens), and the suite's
# entry for SAELens' registry beside them.
SAELENS = "saelens"
SAELENS_REGISTRY = "pretrained_saes.yaml"
# The suite's per-layer parquet files: kind -> folder (under the prefix), each
# `{folder}/layer_N.parquet`. max_activations/ is the seed's published layout.
PER_LAYER = {
    "examples": "max_activations",
    "intervals": "interval_examples",
    "stats": "feature_stats",
    "logits": "feature_logits",
    "neighbours": "feature_neighbours",
    "explanations": "explanations",
}

# The evaluations suites are compared by (the tradeoffs rule's outputs): each table sits beside
# metrics.csv under the prefix, each plot in the plots folder with the summary's.
LADDER_CSV, LADDER_PLOT = "ladder.csv", "sparsity_ladder.png"
TRANSFER_CSV, TRANSFER_PLOT = "transfer.csv", "transfer_by_layer.png"
SPLICED_CSV, SPLICED_PLOT = "spliced.csv", "spliced_by_depth.png"
# The flow rule's table (workflow/rules/neighbours.smk writes it under this name).
FLOW_TABLE = "feature_flow.csv"


@dataclass(frozen=True)
class Layout:
    """Where each artifact lives in the repo. The SAE folders are sparsify's hookpoint names
    under the suite's prefix; everything else of the suite sits beside them in the prefix, so
    several suites can share a repo."""

    prefix: str
    hookpoint_template: str

    @classmethod
    def of(cls, config) -> Layout:
        """The layout of the suite a loupe Config describes: hub.prefix, model.hookpoint."""
        return cls(config.hub.prefix, config.model.hookpoint)

    def hookpoint(self, layer: int) -> str:
        return self.hookpoint_template.format(layer=layer)

    def sae_dir(self, layer: int) -> str:
        return f"{self.prefix}/{self.hookpoint(layer)}"

    def per_layer(self, kind: str, layer: int) -> str:
        """Layer `layer`'s parquet file of `kind` (a PER_LAYER key)."""
        return per_layer_file(self.prefix, kind, layer)

    def examples(self, layer: int) -> str:
        return self.per_layer("examples", layer)

    def stats(self, layer: int) -> str:
        return self.per_layer("stats", layer)

    def saelens_dir(self, layer: int) -> str:
        """Layer `layer` in SAELens' layout: the `sae_id` SAE.from_pretrained takes."""
        return f"{self.prefix}/{SAELENS}/{self.hookpoint(layer)}"

    @property
    def saelens_registry(self) -> str:
        return f"{self.prefix}/{SAELENS}/{SAELENS_REGISTRY}"

    @property
    def metrics(self) -> str:
        return f"{self.prefix}/metrics.csv"

    def table(self, name: str) -> str:
        """A suite-wide table beside metrics.csv (LADDER_CSV, TRANSFER_CSV, SPLICED_CSV, FLOW_TABLE)."""
        return f"{self.prefix}/{name}"

    @property
    def plots(self) -> str:
        return f"{self.prefix}/plots"

    @property
    def run_config(self) -> str:
        # SAELens' sparsify loader reads config.json from the folder above the SAE folders.
        return f"{self.prefix}/{RUN_CONFIG}"


def per_layer_file(prefix: str, kind: str, layer: int) -> str:
    """Layer `layer`'s parquet file of `kind` (a PER_LAYER key) under `prefix`: all a reader
    of a staged repo needs, without the config (loupe.browse)."""
    return f"{prefix}/{PER_LAYER[kind]}/layer_{layer}.parquet"


def example_layer(layers: list[int]) -> int:
    """The layer the quick start shows: the middle one (17 of gemma-loupe's 0..34)."""
    return sorted(layers)[len(layers) // 2]
