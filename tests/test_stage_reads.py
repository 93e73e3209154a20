"""STAGE_READS is the rerun key: a rule's params carry only the output-changing keys its stage
declares, while its job gets the whole config. Each stage function runs here on the small
fixtures with a config that records every key it reads; a read of an undeclared
output-changing key would make Snakemake miss reruns, and fails here."""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import pytest
from helpers import REPO, split_with_manifest, train_layer, typed

from loupe.config import STAGE_READS, Config, schema_keys, stage_settings

LAYER = 2
# Keys a stage reads only to check its arguments, never to make its result: a per-layer stage
# checks that its layer is in model.layers (adding a layer must not rerun the others).
CHECKS_ONLY = {"model.layers"}
PER_LAYER = {"train", "maxact", "evaluate", "neighbours", "explain"}
# Keys read on the way to one that is used, whose value never reaches the output (reviewed by
# hand; keep this short). neuronpedia: tokens.rows() computes every split's rows, the export
# uses the sample's; saelens.suite_facts carries train.exclude_tokens, the export never writes it.
READ_NOT_USED = {
    "neuronpedia": {"tokens.train_tokens", "tokens.eval_tokens", "train.exclude_tokens"}
}


def recording(obj, seen: set[str], prefix: str = ""):
    """A copy of config dataclass `obj` (and its sections) that adds to `seen` the dotted name
    of every key read from it."""
    names = {f.name for f in dataclasses.fields(obj)}
    real = obj

    class Recording(type(obj)):
        recording = True

        def __getattribute__(self, name):
            if name == "__dict__":  # vars(section): every key of it
                seen.update(f"{prefix}{n}" for n in names)
            value = object.__getattribute__(self, name)
            if name in names and not getattr(type(value), "recording", False):  # a section
                seen.add(f"{prefix}{name}")
            return value

        def settings_for(self, stage: str) -> dict:
            # Reads exactly the keys its result holds (to_dict would read every key).
            settings = stage_settings(real.to_dict(), stage)
            seen.update(_leaves(settings))
            return settings

    copy_ = object.__new__(Recording)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = recording(value, seen, f"{prefix}{f.name}.")
        object.__setattr__(copy_, f.name, value)
    return copy_


def _leaves(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in d.items():
        name = f"{prefix}{key}"
        out |= _leaves(value, f"{name}.") if isinstance(value, dict) else {name}
    return out


def undeclared(stage: str, read: set[str]) -> set[str]:
    """The keys in `read` that change outputs but `stage` does not declare in STAGE_READS."""
    keys = schema_keys()
    declared = STAGE_READS[stage]

    def execution_only(key):
        under = [k for k in keys if k == key or k.startswith(f"{key}.")]
        return bool(under) and not any(keys[k] for k in under)

    def covered(key):
        return any(key == r or key.startswith(f"{r}.") or r.startswith(f"{key}.") for r in declared)

    checks = (CHECKS_ONLY if stage in PER_LAYER else set()) | READ_NOT_USED.get(stage, set())
    return {k for k in read if not execution_only(k) and not covered(k) and k not in checks}


def test_the_check_flags_an_undeclared_key_and_passes_execution_only_ones():
    assert undeclared("summary", {"model.name", "sae.k", "device", "train.log_every"}) == {"sae.k"}


def test_the_recording_config_records_reads_through_methods_and_vars(settings):
    seen: set[str] = set()
    config = recording(typed(settings), seen)
    assert isinstance(config, Config)
    config.model.hookpoint_of(3)
    vars(config.sae)
    assert seen == {"model.hookpoint"} | {f"sae.{f.name}" for f in dataclasses.fields(config.sae)}


# Rules whose params carry another stage's keys: {rule's stage here: its STAGE_READS entry}.
DECLARED_AS = {"tradeoffs": "summary"}


@pytest.fixture(scope="module")
def reads(settings, token_dir, tmp_path_factory) -> dict[str, set[str]]:
    """Every stage run once, on one layer: {stage: the keys it read}."""
    from explain_server import Server

    from loupe.evaluate import evaluate_layer
    from loupe.explain import explain_layer
    from loupe.explanation_scores import summarize_explanations
    from loupe.flow import summarize_flow
    from loupe.maxact import sample_layer
    from loupe.neighbours import neighbours_layer
    from loupe.neuronpedia import export
    from loupe.splice import splice_job
    from loupe.stage import stage_repo
    from loupe.summary import summarize
    from loupe.tokens import tokenize
    from loupe.tradeoffs import summarize_tradeoffs
    from loupe.upload import dry_run

    root = tmp_path_factory.mktemp("reads")
    server = Server()
    s = copy.deepcopy(settings)
    s["model"]["layers"] = [LAYER]
    s["maxact"].update(top_n=8, batch_size=8)
    s["explain"].update(base_url=server.url, features=2, score_features=1, retries=0)
    base = typed(s)
    out: dict[str, set[str]] = {}

    def run(stage, fn, *args, **kwargs):
        out[stage] = set()
        return fn(recording(base, out[stage]), *args, **kwargs)

    manifest = token_dir / "manifest.json"
    layer = root / f"layer_{LAYER}"
    sae = layer / "sae.safetensors"
    small = split_with_manifest(token_dir, root / "small", 32)
    run("tokenize", tokenize, root / "tokens")
    run("train", train_layer, LAYER, small, layer, root / "ckpt")
    files = {k: layer / f"{k}.parquet" for k in ("examples", "intervals", "stats", "logits")}
    windows = layer / "random_windows.parquet"
    run("maxact", sample_layer, LAYER, sae, token_dir / "sample.npy", manifest, **files,
        random_windows=windows)  # fmt: skip
    try:
        run("explain", explain_layer, LAYER, files["examples"], files["intervals"],
            files["stats"], windows, root / "record.jsonl", layer / "explanations.parquet")  # fmt: skip
    finally:
        server.close()
    run("neighbours", neighbours_layer, LAYER, sae, layer / "feature_neighbours.parquet")
    run("flow", summarize_flow, [layer / "feature_neighbours.parquet"], [windows],
        [files["stats"]], root / "summary/feature_flow.csv", root / "summary/flow.png")  # fmt: skip
    run("evaluate", evaluate_layer, LAYER, sae, token_dir / "eval.npy", manifest, files["stats"],
        layer / "eval.json")  # fmt: skip
    spliced = root / "summary/spliced.json"
    run("spliced", splice_job, [sae], token_dir / "eval.npy", manifest, spliced)
    plots = {k: root / f"summary/{k}.png" for k in ("fvu", "delta_ce", "dead", "density", "curves")}
    run("summary", summarize, [layer / "eval.json"], [files["stats"]],
        [layer / "train_metrics.jsonl"], root / "summary/metrics.csv", **plots)  # fmt: skip
    tables = ("ladder_csv", "ladder_plot", "spliced_csv", "spliced_plot", "transfer_csv",
              "transfer_plot")  # fmt: skip
    run("tradeoffs", summarize_tradeoffs, [layer / "eval.json"], spliced,
        **{k: root / "summary" / k for k in tables})  # fmt: skip
    run("explanation_scores", summarize_explanations, [layer / "explanations.parquet"],
        [files["stats"]], root / "summary/explanation_scores.csv",
        root / "summary/explanation_scores.png")  # fmt: skip
    lists = {k: [v] for k, v in files.items()}
    neighbours = [layer / "feature_neighbours.parquet"]
    run("stage", stage_repo, [sae], **lists, neighbours=neighbours,
        summary=[root / "summary/metrics.csv", plots["fvu"]], repo=root / "hub",
        manifest=manifest)  # fmt: skip
    run("neuronpedia", export, [sae], **lists, out_dir=root / "neuronpedia",
        neighbours=neighbours, explanations=[layer / "explanations.parquet"])  # fmt: skip
    run("upload", dry_run, root / "hub", root / "plan.json")
    assert json.loads((root / "plan.json").read_text())["dry_run"] is True
    return out


STAGES = ["tokenize", "train", "maxact", "explain", "neighbours", "evaluate", "spliced"]
STAGES += ["summary", "flow", "tradeoffs", "explanation_scores", "stage", "neuronpedia", "upload"]
# The demo's builders, run only by the demo (e2e): its corpus reads demo.min_corpus_bytes, its
# models no key.
NOT_RUN_HERE = {"demo_corpus", "demo_model", "demo_transfer_model", "demo_explainer_model"}


def test_every_stage_with_reads_is_run_here():
    """A new stage gets a STAGE_READS entry and a run in `reads`, or this fails."""
    assert set(STAGES) - set(DECLARED_AS) == set(STAGE_READS) - NOT_RUN_HERE


# Rules that run loupe with no params: their stage reads no output-changing key (its STAGE_READS
# entry is empty), or they make nothing another rule reads (a dry run, the browser's server).
NO_SETTINGS = {"demo_model", "demo_transfer_model", "demo_explainer_model", "explain_dry_run"}
NO_SETTINGS |= {"browse"}


def test_every_rule_that_runs_loupe_carries_its_stages_settings():
    text = "\n".join(p.read_text() for p in sorted((REPO / "workflow/rules").glob("*.smk")))
    split = re.split(r"^\s*rule (\w+):", text, flags=re.M)
    rules = dict(zip(split[1::2], split[2::2], strict=True))
    carried = {name: re.findall(r'settings_for\("(\w+)"\)', body) for name, body in rules.items()}
    runs_loupe = {name for name, body in rules.items() if "python -m loupe" in body}
    assert {name for name in runs_loupe if not carried[name]} == NO_SETTINGS
    assert {stage for stages in carried.values() for stage in stages} <= set(STAGE_READS)
    assert all(STAGE_READS[name] == () for name in NO_SETTINGS if name in STAGE_READS)


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_reads_only_its_declared_output_keys(reads, stage):
    assert reads[stage], "the recording config saw no read: the check would pass vacuously"
    declared = DECLARED_AS.get(stage, stage)
    assert undeclared(declared, reads[stage]) == set(), sorted(reads[stage])
