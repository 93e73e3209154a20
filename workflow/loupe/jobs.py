"""A training job as the workflow declares it (workflow/rules/train.smk): its rule's name, its
members' files and layers, and what it asks a scheduler for (its size, and a site's settings
for rule train), as plain functions the rules call and the tests check. The derivation of the
sizes is in the README (Layer groups); the formulas are only here.

This module imports no torch and no Snakemake: the Snakefile imports it when it defines the
rules, and hands it Snakemake's objects (outputs, wildcards, a profile's settings)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

# Host memory: the ~10 GB model load, CUDA and torch, page cache for the token file; then each
# SAE's checkpoint files (1.8 GB) pass through host memory one file at a time when saved.
HOST_BASE_MB = 47000
HOST_PER_SAE_MB = 1000
# Time: the forward through layers 0..d and one SAE step per member, per token (Gemma 4 E2B
# at the gemma-loupe width), at 30% of an A100's bf16 peak, times 1.5 for slack; at least
# 1 h, at most 24 h (what GPU partitions commonly allow: longer jobs resume from checkpoints).
GFLOP_PER_TOKEN_PER_LAYER = 0.111
GFLOP_PER_TOKEN_PER_SAE = 0.46
SUSTAINED_FLOP_PER_S = 94e12
MIN_MINUTES, MAX_MINUTES = 60, 1440


def train_mem_mb(layers: list[int]) -> int:
    """Host memory (MB) of a job training the SAEs of `layers`."""
    return HOST_BASE_MB + HOST_PER_SAE_MB * len(layers)


def train_runtime(layers: list[int], train_tokens: int) -> int:
    """Time limit (minutes) of a job training the SAEs of `layers` on `train_tokens` tokens."""
    gflop_per_token = GFLOP_PER_TOKEN_PER_LAYER * (max(layers) + 1) + GFLOP_PER_TOKEN_PER_SAE * len(
        layers
    )
    hours = gflop_per_token * 1e9 * train_tokens / SUSTAINED_FLOP_PER_S / 3600
    return min(MAX_MINUTES, max(MIN_MINUTES, math.ceil(1.5 * 60 * hours)))


def group_rule_name(group: list[int]) -> str:
    """The rule of a group of several layers: train_layers_1_3 for [1, 3];
    train_layers_23_to_34 for a run of consecutive layers."""
    if len(group) > 2 and group == list(range(group[0], group[-1] + 1)):
        return f"train_layers_{group[0]}_to_{group[-1]}"
    return "train_layers_" + "_".join(map(str, group))


def listed(files: str | list[str]) -> list[str]:
    """A rule's named output as a list: one file (rule train) or a group's members' files."""
    return [files] if isinstance(files, str) else list(files)


def member_files(template: str, group: list[int] | None) -> str | list[str]:
    """`template`'s files for the members of `group`, in the group's order; for rule train
    (group None) the template itself, its {layer} a wildcard."""
    return template if group is None else [template.format(layer=layer) for layer in group]


def layers_of(sae_files: str | list[str], template: str) -> list[int]:
    """The layers of a training job's SAE files (`template` with {layer} filled): the layers
    it trains, in its outputs' order."""
    pattern = re.escape(template).replace(re.escape("{layer}"), r"(\d+)")
    return [int(re.fullmatch(pattern, path).group(1)) for path in listed(sae_files)]


def site_value(value: Any) -> Any:
    """A profile's setting as given: Snakemake keeps --set-resources and --set-threads values
    as its Resource objects (the value is their .raw); a plain value stays as it is."""
    return getattr(value, "raw", value)


def site_resources(overwrite_resources: Mapping[str, Mapping], rule: str) -> dict[str, Any]:
    """The resources a site's profile sets for `rule` (set-resources), as plain values."""
    given = overwrite_resources.get(rule) or {}
    return {key: site_value(value) for key, value in dict(given).items()}


def site_threads(overwrite_threads: Mapping[str, Any], rule: str) -> int | None:
    """The threads a site's profile sets for `rule` (set-threads); None where it sets none."""
    return site_value(overwrite_threads.get(rule))


def train_resources(
    group: list[int] | None, train_tokens: int, site: Mapping[str, Any]
) -> dict[str, int | str | Callable]:
    """The resources of rule train (group None: sized per layer, by its {layer} wildcard) or
    of a group's rule: its size, then `site`, the site's settings for rule train (a profile
    names rule train, never a group's rule, whose GPU jobs would otherwise go to the default
    partition; Snakemake applies them to rule train itself)."""
    if group is None:
        return dict(
            gpu=1,
            cpus_per_gpu=8,
            mem_mb=lambda wildcards: train_mem_mb([int(wildcards.layer)]),
            runtime=lambda wildcards: train_runtime([int(wildcards.layer)], train_tokens),
        )
    own = dict(
        gpu=1,
        cpus_per_gpu=8,
        mem_mb=train_mem_mb(group),
        runtime=train_runtime(group, train_tokens),
    )
    return {**own, **site}
