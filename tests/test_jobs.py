"""A training job's rule name and size (loupe.jobs), against numbers worked out by hand from
the derivation in the README (Layer groups)."""

from __future__ import annotations

import pytest

from loupe.jobs import group_rule_name, train_mem_mb, train_runtime


def test_host_memory_is_47_gb_plus_1_gb_per_sae():
    assert [train_mem_mb(list(range(n))) for n in (1, 12, 35)] == [48000, 59000, 82000]


@pytest.mark.parametrize(
    ("layers", "tokens", "minutes"),
    [
        # 1B tokens, layer 0 alone: (0.111 + 0.46) GFLOP/token / 94 TFLOP/s = 1.69 h; x 1.5.
        ([0], 10**9, 152),
        # Layer 34 alone: (0.111 x 35 + 0.46) GFLOP/token: 12.84 h x 1.5 = 1156 min.
        ([34], 10**9, 1156),
        # Layers 23-34: 0.111 x 35 + 0.46 x 12 = 9.4 GFLOP/token: 27.8 h, over 24 h: capped.
        (list(range(23, 35)), 10**9, 1440),
        # Layer 20 alone on 100M tokens: 2.79 GFLOP/token = 0.82 h x 1.5 = 75 min.
        ([20], 10**8, 75),
        # The demo's few tokens: the floor of 1 h.
        ([0, 1, 2], 262144, 60),
    ],
)
def test_runtime_is_the_flop_estimate_times_1_5_within_1_and_24_hours(layers, tokens, minutes):
    assert train_runtime(layers, tokens) == minutes


def test_group_rules_are_named_by_their_layers():
    assert group_rule_name([1, 3]) == "train_layers_1_3"
    assert group_rule_name([0, 5]) == "train_layers_0_5"
    assert group_rule_name([23, 24, 25]) == "train_layers_23_to_25"
