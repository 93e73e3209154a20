"""The cost model: GPU-hours of a full build from per-token FLOPs and measured overhead
factors. Pure functions, so the arithmetic is tested on its own.

A stage's time per token is modelled as  a * forward_flops / R_bf16 + b * encode_flops / R_tf32:
`a` and `b` are how many times its floors (the model forward, the SAE encoder matmul) the
stage costs, measured on the benchmark shapes (a = 1: the forward inside a stage is the
floor's own computation); R are sustained H100 rates (the model runs in bf16, the SAE in
fp32 with TF32 matmuls, as sparsify sets)."""

from __future__ import annotations

from dataclasses import dataclass

from .flops import ModelFlops, SaeFlops


@dataclass(frozen=True)
class Rates:
    """Sustained throughput assumed for one H100, TFLOP/s."""

    bf16: float = 300.0  # ~30% of the H100 SXM's 989 dense bf16 peak
    tf32: float = 150.0  # ~30% of its 495 dense TF32 peak


@dataclass(frozen=True)
class Factors:
    """A stage's time as multiples of its floors: forward (a) and encoder matmul (b)."""

    forward: float
    sae: float
    optimizer: float = 0.0  # one optimizer step, in encoder matmuls of `step_batch_tokens`
    step_batch_tokens: int = 0


@dataclass(frozen=True)
class Build:
    """What a full build processes (gemma-loupe: 35 layers x 1B tokens, 10M sampled)."""

    layers: int = 35
    train_tokens: float = 1e9
    sample_tokens: float = 1e7
    eval_tokens: float = 1048576
    tokens_per_step: int = 16384  # 4 sequences x 1024 tokens x grad_acc_steps 4


def seconds_per_token(
    forward_flops: float,
    encodes: float,
    sae: SaeFlops,
    f: Factors,
    rates: Rates,
    tokens_per_step: int | None = None,
) -> float:
    """GPU seconds per token of a stage running `forward_flops` of model forward and
    `encodes` SAEs; with tokens_per_step, the optimizer step amortised over it."""
    t = f.forward * forward_flops / (rates.bf16 * 1e12)
    t += encodes * f.sae * sae.encode / (rates.tf32 * 1e12)
    if tokens_per_step:
        step = f.optimizer * sae.encode * f.step_batch_tokens / (rates.tf32 * 1e12)
        t += encodes * step / tokens_per_step
    return t


def groups(layers: int, size: int) -> list[list[int]]:
    """Consecutive layer groups of `size` (the last may be smaller)."""
    return [list(range(i, min(i + size, layers))) for i in range(0, layers, size)]


def train_hours(
    model: ModelFlops,
    sae: SaeFlops,
    f: Factors,
    rates: Rates,
    build: Build,
    group_size: int = 1,
    truncate: bool = True,
) -> float:
    """GPU-hours to train every layer: one job per group of `group_size` layers, each job's
    forward cut after its last layer (or the full model with truncate=False)."""
    total = 0.0
    for group in groups(build.layers, group_size):
        forward = model.prefix(group[-1]) if truncate else model.full
        total += seconds_per_token(forward, len(group), sae, f, rates, build.tokens_per_step)
    return total * build.train_tokens / 3600


def sample_hours(model: ModelFlops, sae: SaeFlops, f: Factors, rates: Rates, build: Build) -> float:
    """GPU-hours of max-activation sampling, one job per layer on a truncated forward."""
    per_token = sum(
        seconds_per_token(model.prefix(layer), 1, sae, f, rates) for layer in range(build.layers)
    )
    return per_token * build.sample_tokens / 3600


def eval_hours(
    model: ModelFlops, sae: SaeFlops, f: Factors, rates: Rates, build: Build, passes: int = 3
) -> float:
    """GPU-hours of evaluation: per layer and token, `passes` full forwards with logits
    (loupe.evaluate runs clean, SAE-spliced and zero-ablated) plus the SAE once. Not
    benchmarked here: the forward is taken at its floor (a = 1)."""
    forward = passes * (model.full + model.lm_head)
    per_layer = seconds_per_token(forward, 1, sae, f, rates)
    return per_layer * build.layers * build.eval_tokens / 3600


def largest_group(gpu_gb: float, model_gb: float, per_sae_gb: float, work_gb: float) -> int:
    """Most SAEs one job can train at once within gpu_gb."""
    return max(0, int((gpu_gb - model_gb - work_gb) // per_sae_gb))
