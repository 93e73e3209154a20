"""The typed config: the schema and the dataclasses name the same keys both ways, the schema is
the only place a default is written, and each stage's params carry exactly the output-changing
keys it reads."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, demo_config

from loupe import config as cfg
from loupe.errors import LoupeError


def schema_sections(schema: dict) -> dict[str, dict]:
    """Every object in the schema, nested ones included, by its config key."""
    out = {}
    for name, sub in schema["properties"].items():
        if "properties" in sub:
            out[name] = sub
            out |= schema_sections(sub)
    return out


def test_schema_and_dataclasses_name_the_same_keys_both_ways():
    schema = cfg.load_schema()
    top = {f.name for f in dataclasses.fields(cfg.Config)}
    assert top == set(schema["properties"])
    for name, section in schema_sections(schema).items():
        cls = cfg.SECTIONS.get(name, cfg.RedPajamaConfig)
        assert {f.name for f in dataclasses.fields(cls)} == set(section["properties"]), name
        # Only the schema writes defaults: no dataclass field has one of its own.
        assert all(
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            for f in dataclasses.fields(cls)
        ), name
    assert set(cfg.SECTIONS) == set(schema_sections(schema)) - {"redpajama"}
    assert {f.name for f in dataclasses.fields(cfg.RedPajamaConfig)} == set(
        schema_sections(schema)["redpajama"]["properties"]
    )


def test_sparsify_sections_use_sparsifys_field_names():
    sparsify = pytest.importorskip("sparsify")
    sae_fields = {f.name for f in dataclasses.fields(sparsify.SparseCoderConfig)}
    assert {f.name for f in dataclasses.fields(cfg.SaeConfig)} <= sae_fields
    train_fields = {f.name for f in dataclasses.fields(sparsify.TrainConfig)}
    assert set(cfg.TrainConfig.SPARSIFY_FIELDS) <= train_fields
    # loupe's own train keys are exactly the ones sparsify does not have.
    own = {f.name for f in dataclasses.fields(cfg.TrainConfig)} - train_fields
    assert own == {"log_every", "shuffle_seed", "layers_per_job", "layer_groups"}


def test_every_key_is_documented_and_classified_once():
    schema = cfg.load_schema()
    keys = cfg.schema_keys(schema)
    execution_only = {k for k, affects in keys.items() if not affects}
    assert execution_only == {
        "device",
        "tokens.doc_batch_size",
        "train.save_every",
        "train.log_every",
        "train.log_to_wandb",
        "maxact.batch_size",
        "evaluate.batch_size",
        "evaluate.logit_chunk",
        "neighbours.chunk",
        "hub.private",
        "train.layers_per_job",
        "train.layer_groups",
        "dataset.redpajama.base_url",
        "dataset.redpajama.missing_list_url",
        "explain.base_url",
        "explain.api_key_env",
        "explain.concurrency",
        "explain.timeout",
        "explain.retries",
    }
    for name, section in schema_sections(schema).items():
        for key, leaf in section["properties"].items():
            assert leaf.get("description"), f"{name}.{key} has no description"


def test_stage_reads_name_real_keys_and_cover_every_output_key():
    keys = cfg.schema_keys()
    read = set()
    for stage, items in cfg.STAGE_READS.items():
        for item in items:
            named = {k for k in keys if k == item or k.startswith(f"{item}.")}
            assert named, f"{stage} reads unknown {item}"
            read |= named
    unread = {k for k, affects in keys.items() if affects and k not in read}
    # demo.corpus/model/transfer_model/explainer_model are file paths: rules get them as
    # outputs, not params.
    assert unread == {"demo.corpus", "demo.model", "demo.transfer_model", "demo.explainer_model"}


def test_stage_settings_hold_only_output_keys_a_stage_reads():
    data = demo_config()
    train = cfg.stage_settings(data, "train")
    assert set(train) == {"model", "sae", "train"}
    assert "save_every" not in train["train"] and "log_every" not in train["train"]
    assert "layers" not in train["model"]  # adding a layer retrains no other layer
    assert "device" not in train
    tokenize = cfg.stage_settings(data, "tokenize")
    assert "hookpoint" not in tokenize["model"]
    assert "doc_batch_size" not in tokenize["tokens"]
    assert set(tokenize["dataset"]) == {
        "path",
        "redpajama",
        "data_files",
        "name",
        "split",
        "text_column",
    }
    # A mirror of the same documents is no new data: where they come from is execution-only.
    assert set(tokenize["dataset"]["redpajama"]) == {
        "snapshots",
        "language",
        "partition",
        "shard_start",
        "shard_count",
        "open_files",
    }
    assert cfg.stage_settings(data, "summary") == {
        "model": {"name": data["model"]["name"], "layers": data["model"]["layers"]}
    }


def test_config_builds_once_with_defaults_from_the_schema():
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    del raw["maxact"]  # every default comes from the schema
    c = cfg.Config.from_dict(raw)
    assert c.maxact == cfg.MaxactConfig(
        top_n=20,
        window_before=32,
        window_after=8,
        intervals=10,
        per_interval=5,
        top_logits=10,
        batch_size=8,
        random_windows=1000,
    )
    assert c.model.hookpoint_of(17) == "language_model.layers.17"
    assert c.model.tokenizer_name == c.model.name == "google/gemma-4-E2B"
    assert c.tokens.rows() == {"train": 976563, "sample": 9766, "eval": 1024}
    assert c.demo is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.sae.k = 3
    assert cfg.Config.from_json(json.dumps(c.to_dict())) == c  # what jobs receive


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"sae": {"k": 0}}, "config error at sae/k: 0 is less than the minimum of 1"),
        ({"train": {"bogus": 1}}, "config error: unknown key train/bogus (known keys here:"),
        ({"hub": {"dry_run": True}}, "config error: unknown key hub/dry_run"),
        ({"model": {"dtype": "float16"}}, "config error at model/dtype: 'float16' is not one of"),
        (
            {"dataset": {"redpajama": {"snapshots": ["2023-14"], "shard_count": 2}}},
            "config error at dataset: give exactly one of path and redpajama",
        ),
        # The Hub's own rules, at start: the upload could not create these hours later.
        ({"hub": {"repo": "me/gemma..loupe"}}, "config error at hub/repo: Cannot have -- or .."),
        (
            {"hub": {"space": "me/browser!"}},
            "config error at hub/space: Repo id must use alphanumeric chars",
        ),
        ({"hub": {"repo": "me/loupe.git"}}, "config error at hub/repo: Repo_id cannot end by"),
    ],
)
def test_bad_config_gives_one_line_naming_the_key(patch, message):
    raw = demo_config()
    for section, values in patch.items():
        raw[section].update(values)
    with pytest.raises(LoupeError) as e:
        cfg.Config.from_dict(raw)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_config_module_imports_no_torch():
    # The Snakefile imports it to validate the config: it must stay light. A fresh interpreter,
    # since this one has imported torch already.
    code = "import sys, loupe.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
