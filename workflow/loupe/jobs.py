"""What the workflow asks a scheduler for a training job (its rule's name and its size), as
plain functions the rules call and the tests check. The derivation of the sizes is in the
README (Layer groups); the formulas are only here.

This module imports no torch: the Snakefile imports it when it defines the rules."""

from __future__ import annotations

import math

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
