"""The benchmark code imports and its cost model does the right arithmetic. The benchmarks
themselves run only on demand (`python benchmarks/run.py`), never in the test command."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import cost  # noqa: E402
from benchmarks.flops import ModelFlops, SaeFlops, attended_positions, real_sae  # noqa: E402
from benchmarks.timing import BatchClock  # noqa: E402

# Three layers of 1 TFLOP per token and an SAE encoder of 1 TFLOP per token, at 1 TFLOP/s:
# every term is a whole number of seconds per token.
MODEL = ModelFlops(ctx_len=1, base=0.0, layers=[1e12, 1e12, 1e12], lm_head=2e12)
SAE = SaeFlops(d_in=1, num_latents=500_000_000_000, k=1, multi_topk=False)
UNIT = cost.Rates(bf16=1.0, tf32=1.0)
BUILD = cost.Build(layers=3, train_tokens=3600, sample_tokens=3600, eval_tokens=3600)


def test_stage_ratios_to_the_paired_floor():
    from benchmarks.analysis import sae_factor, train_row

    # Floor on a 10-token batch: forward through 1 layer 1 s (4 layers 4 s), encoder 2 s.
    floor = {"forward": {"1": {"seconds": 1.0}, "4": {"seconds": 4.0}}, "encode": {"seconds": 2.0}}
    res = {
        "floor": {**floor, "tokens": 10},
        "tokens_per_batch": 10,
        "grad_acc_steps": 2,
        "step_s": [12.0, 14.0, 13.0],
        "accumulate_batch_s": [5.0, 6.0, 5.0],
        "optimizer_batch_s": [8.0, 8.0, 8.0],
        "peak_rss_mb": 100.0,
        "layers_run": 1,
    }
    row = train_row("s", "v", 0, res)
    assert row["tokens_per_s"] == pytest.approx(20 / 13)
    assert row["floor_tokens_per_s"] == pytest.approx(10 / 3)
    assert row["ratio"] == pytest.approx((13 / 20) / (3 / 10))
    assert row["ratio_batch"] == pytest.approx((5 / 10) / (3 / 10))
    assert sae_factor(res) == pytest.approx((5 - 1) / 2)
    # A full forward ran 4 layers: only the encoder floors beyond those count as SAE work.
    assert sae_factor({**res, "layers_run": 4, "accumulate_batch_s": [8.0]}) == pytest.approx(2)


def test_training_hours_per_strategy():
    f = cost.Factors(forward=1.0, sae=1.0)
    # Truncated, one job per layer: (1+1) + (2+1) + (3+1) = 9 s per token, 3600 tokens.
    assert cost.train_hours(MODEL, SAE, f, UNIT, BUILD) == pytest.approx(9.0)
    # Full forward every time: 3 x (3+1).
    assert cost.train_hours(MODEL, SAE, f, UNIT, BUILD, truncate=False) == pytest.approx(12.0)
    # One job for all three: one 3-layer forward and three SAEs.
    assert cost.train_hours(MODEL, SAE, f, UNIT, BUILD, group_size=3) == pytest.approx(6.0)
    # Groups of 2: layers [0, 1] (2 + 2) and [2] (3 + 1).
    assert cost.train_hours(MODEL, SAE, f, UNIT, BUILD, group_size=2) == pytest.approx(8.0)
    # The factors scale their own terms: doubling b adds one encoder per SAE.
    f2 = cost.Factors(forward=1.0, sae=2.0)
    assert cost.train_hours(MODEL, SAE, f2, UNIT, BUILD) == pytest.approx(12.0)


def test_optimizer_step_is_amortised_over_the_step():
    # One step costs 4 encoder matmuls of 2 tokens = 8 s; over 16 tokens, 0.5 s per token.
    f = cost.Factors(forward=0.0, sae=0.0, optimizer=4.0, step_batch_tokens=2)
    t = cost.seconds_per_token(0.0, 1, SAE, f, UNIT, tokens_per_step=16)
    assert t == pytest.approx(0.5)


def test_sampling_and_evaluation_hours():
    f = cost.Factors(forward=1.0, sae=1.0)
    assert cost.sample_hours(MODEL, SAE, f, UNIT, BUILD) == pytest.approx(9.0)
    # Per layer: 3 passes x (3 layers + 2 LM head) + 1 encoder = 16 s per token, 3 layers.
    assert cost.eval_hours(MODEL, SAE, f, UNIT, BUILD) == pytest.approx(48.0)


def test_groups_and_memory_limit():
    assert cost.groups(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert cost.largest_group(gpu_gb=80, model_gb=10, per_sae_gb=2.5, work_gb=8) == 24


def test_flop_formulas():
    assert attended_positions(4, None) == pytest.approx(2.5)  # 1+2+3+4 over 4
    assert attended_positions(4, 2) == pytest.approx(1.75)  # 1+2+2+2 over 4
    sae = real_sae()
    assert sae.num_latents == 49152
    assert sae.encode == 2 * 1536 * 49152
    assert sae.train == pytest.approx(3 * sae.forward)


def test_counted_layer_flops_match_the_layer_shapes():
    """The meta-tensor count of a small Gemma 4 equals its matmuls written out by hand."""
    from benchmarks.flops import count_e2b_flops

    d, inter, heads, hd, ghd, p, window, ctx = 64, 128, 2, 16, 32, 8, 4, 8
    text = dict(
        vocab_size=256,
        vocab_size_per_layer_input=256,
        hidden_size=d,
        intermediate_size=inter,
        num_hidden_layers=3,
        num_kv_shared_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=1,
        head_dim=hd,
        global_head_dim=ghd,
        hidden_size_per_layer_input=p,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention", "full_attention"],
        use_double_wide_mlp=True,
    )
    flops = count_e2b_flops(ctx_len=ctx, text=text)
    sliding = (
        2 * d * heads * hd * 2  # q and o projections
        + 2 * d * hd * 2  # k and v (one KV head)
        + 3 * 2 * d * inter  # gated MLP
        + 2 * 2 * d * p  # per-layer input gate and projection
        + 4 * heads * hd * attended_positions(ctx, window)
    )
    assert flops.layers[0] == pytest.approx(sliding)
    # The KV-shared last layer computes no k/v and has the double-wide MLP.
    shared = 2 * d * heads * ghd * 2 + 3 * 2 * d * 2 * inter + 2 * 2 * d * p
    shared += 4 * heads * ghd * attended_positions(ctx, None)
    assert flops.layers[2] == pytest.approx(shared)
    assert flops.prefix(0) < flops.prefix(1) < flops.full
    assert flops.lm_head == 2 * d * 256


def test_batch_clock_splits_steps():
    clock = BatchClock(batch_size=2)
    clock.marks = [0.0, 1.0, 3.0, 4.0, 6.0, 7.0, 9.0]  # accumulate 1 s, optimizer batch 2 s
    steps = clock.steps(grad_acc_steps=2, warmup_steps=1)
    assert steps == {
        "step_s": [3.0, 3.0],
        "accumulate_batch_s": [1.0, 1.0],
        "optimizer_batch_s": [2.0, 2.0],
    }
