"""Reruns after a finished demo run: a config change plans exactly the steps whose results it
changes. Execution-only keys (device, batch sizes, logging, checkpoint cadence) plan nothing:
each used to rerun every layer's training or sampling."""

from __future__ import annotations

import pytest
from helpers import planned

from loupe.config import schema_keys

pytestmark = pytest.mark.e2e

LAYERS = 6  # the demo's

# A changed value for every execution-only key (the demo's own values differ).
EXECUTION_ONLY = {
    "device": "cpu",
    "tokens.doc_batch_size": 7,
    "train.save_every": 3,
    "train.log_every": 1,
    "train.log_to_wandb": True,
    "maxact.batch_size": 3,
    "evaluate.batch_size": 3,
    "evaluate.logit_chunk": 5,
    "hub.private": True,
    "train.layers_per_job": 3,
    "train.layer_groups": [[0, 1], [2, 3, 4, 5]],
    "neighbours.chunk": 7,
    "explain.base_url": "http://127.0.0.1:9/v1",
    "explain.api_key_env": "LOUPE_TEST_KEY",
    "explain.concurrency": 2,
    "explain.timeout": 5,
    "explain.retries": 1,
}


def nested(dotted: str, value) -> dict:
    section, _, key = dotted.partition(".")
    return {section: {key: value}} if key else {section: value}


def test_the_table_above_covers_every_execution_only_key():
    # The demo reads no RedPajama: those keys are checked in test_config instead.
    keys = {k for k, affects in schema_keys().items() if not affects}
    assert set(EXECUTION_ONLY) == {k for k in keys if not k.startswith("dataset.redpajama.")}


@pytest.mark.parametrize("key", sorted(EXECUTION_ONLY))
def test_an_execution_only_key_plans_nothing(demo_run, tmp_path, key):
    assert planned(demo_run, nested(key, EXECUTION_ONLY[key]), tmp_path) == {}


def test_sae_k_reruns_each_layers_chain_and_the_suite_steps_only(demo_run, tmp_path):
    assert planned(demo_run, {"sae": {"k": 4}}, tmp_path) == {
        "train": LAYERS,
        "maxact": LAYERS,
        "evaluate": LAYERS,
        "neighbours": LAYERS,
        "explain": LAYERS,
        "spliced": 1,
        "flow": 1,
        "summary": 1,
        "tradeoffs": 1,
        "explanation_scores": 1,
        "stage": 1,
    }


def test_hookpoint_does_not_retokenize(demo_run, tmp_path):
    jobs = planned(
        demo_run, {"model": {"hookpoint": "language_model.layers.{layer}.mlp"}}, tmp_path
    )
    assert "tokenize" not in jobs and jobs["train"] == LAYERS
