"""A training job's rule name and size (loupe.jobs), against numbers worked out by hand from
the derivation in the README (Layer groups); its files, layers and site settings against
what Snakemake itself makes of them."""

from __future__ import annotations

import pytest

from loupe.jobs import (
    group_rule_name,
    layers_of,
    listed,
    member_files,
    site_resources,
    site_threads,
    train_mem_mb,
    train_resources,
    train_runtime,
)


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


# --- what train.smk declares with them ---------------------------------------------------------

SAE = "results/layer_{layer}/sae.safetensors"


def test_a_groups_files_are_its_members_in_its_order_as_snakemake_expands_them():
    from snakemake.io import expand

    log = "results/layer_{layer}/train.log"
    assert member_files(log, [4, 1]) == ["results/layer_4/train.log", "results/layer_1/train.log"]
    assert member_files(log, [4, 1]) == expand(log, layer=[4, 1])
    assert member_files(log, None) == log  # rule train: {layer} stays a wildcard


def test_a_jobs_layers_are_read_back_from_its_sae_files():
    assert layers_of(member_files(SAE, [12, 3, 34]), SAE) == [12, 3, 34]
    assert layers_of("results/layer_7/sae.safetensors", SAE) == [7]  # rule train's one file
    assert listed("results/layer_7/sae.safetensors") == ["results/layer_7/sae.safetensors"]


def test_site_settings_are_the_values_a_profile_gives_for_the_rule():
    from snakemake.cli import parse_set_resources, parse_set_threads

    # As Snakemake parses a profile's set-resources and set-threads.
    resources = parse_set_resources(
        ["train:slurm_partition=gpu-a100", "train:runtime=2h", "maxact:slurm_partition=cpu"]
    )
    assert site_resources(resources, "train") == {"slurm_partition": "gpu-a100", "runtime": 120}
    assert site_resources(resources, "tokenize") == {}
    assert site_resources({"train": {"slurm_account": "me"}}, "train") == {"slurm_account": "me"}
    threads = parse_set_threads(["train=4"])
    assert (site_threads(threads, "train"), site_threads(threads, "maxact")) == (4, None)


def test_rule_train_is_sized_by_its_layer_wildcard_and_leaves_site_settings_to_snakemake():
    from snakemake.iocontainers import Wildcards

    res = train_resources(None, 10**9, {"slurm_partition": "gpu-a100"})
    assert (res["gpu"], res["cpus_per_gpu"]) == (1, 8) and "slurm_partition" not in res
    layer_34 = Wildcards(fromdict={"layer": "34"})
    assert (res["mem_mb"](layer_34), res["runtime"](layer_34)) == (48000, 1156)


def test_a_groups_rule_is_sized_by_its_members_then_takes_rule_trains_site_settings():
    site = {"slurm_partition": "gpu-a100", "runtime": 2880}
    assert train_resources(list(range(23, 35)), 10**9, {}) == {
        "gpu": 1, "cpus_per_gpu": 8, "mem_mb": 59000, "runtime": 1440,
    }  # fmt: skip
    assert train_resources([1, 3], 262144, site) == {
        "gpu": 1, "cpus_per_gpu": 8, "mem_mb": 49000, "runtime": 2880,
        "slurm_partition": "gpu-a100",
    }  # fmt: skip
