"""Typed views of the config sections a stage receives (as the JSON its rule passes)."""

from __future__ import annotations

from dataclasses import fields

from .tokens import DatasetSpec, TokenSpec


def pick(cls, section: dict | None):
    """Build a dataclass from the keys it knows; the schema has already rejected the rest."""
    section = section or {}
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in section.items() if k in names})


def dataset_spec(settings: dict) -> DatasetSpec:
    return pick(DatasetSpec, settings["dataset"])


def token_spec(settings: dict) -> TokenSpec:
    return pick(TokenSpec, settings["tokens"])


def tokenizer_name(settings: dict) -> str:
    model = settings["model"]
    return model.get("tokenizer") or model["name"]


def hookpoint(settings: dict, layer: int) -> str:
    return settings["model"]["hookpoint"].format(layer=layer)


# sparsify TrainConfig fields taken from config `train:`; the section's other keys
# (log_every, shuffle_seed) are loupe's own.
TRAIN_CONFIG_FIELDS = (
    "batch_size",
    "grad_acc_steps",
    "micro_acc_steps",
    "optimizer",
    "lr",
    "lr_warmup_steps",
    "auxk_alpha",
    "dead_feature_threshold",
    "exclude_tokens",
    "init_seeds",
    "save_every",
    "log_to_wandb",
)
