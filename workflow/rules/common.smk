import json
import os
import sys
from types import SimpleNamespace

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

min_version("9.21")

# The loupe package sits beside the rules (workflow/loupe): Snakemake imports it from there,
# and every job runs it from there (PYTHONPATH, set below), so a conda env (--sdm conda) needs
# only the package's dependencies, not an install of loupe itself.
PACKAGE_ROOT = os.path.join(workflow.basedir, "workflow")
sys.path.insert(0, PACKAGE_ROOT)

from loupe.config import (  # noqa: E402
    Config,
    check_train_settings,
    check_yaml,
    stage_settings,
)
from loupe.errors import LoupeError  # noqa: E402
from loupe.jobs import layers_of  # noqa: E402
from loupe.tokens import check_hub_ids, check_sources, store_key  # noqa: E402

# The workflow's config.yaml, read here rather than in the Snakefile: Snakemake's own message for
# a YAML mistake names neither the file nor the line. (Files given with --configfile are read
# by Snakemake's command line before any of this runs: their YAML mistakes get its message.)
try:
    check_yaml("config.yaml")
except LoupeError as e:
    raise WorkflowError(str(e)) from None


configfile: "config.yaml"


# Validated once (one line naming the key on error); the schema's defaults filled in. The local
# inputs are checked here, before any job: Snakemake deletes a job's old outputs before it
# starts, so a typo found inside the tokenize job would already have cost the token files.
# CONFIG is the typed config (what the package's functions take), built once.
try:
    CONFIG = Config.from_dict(config)
    config.update(CONFIG.to_dict())
    BUILT = [p for p in (config.get("demo") or {}).values() if isinstance(p, str)]
    check_sources(CONFIG, built=set(BUILT))
    check_train_settings(CONFIG)
except LoupeError as e:
    raise WorkflowError(str(e)) from None


onstart:
    # Hub ids offline only when jobs are about to run: a dry run plans without the cache.
    try:
        check_hub_ids(CONFIG, built=set(BUILT))
    except LoupeError as e:
        raise WorkflowError(str(e)) from None


# The token splits live in a folder named for their identity, the key of their store
# (loupe.tokens.store_key, the hash of the settings that make them): other settings give other
# paths, and so rerun their readers, while returning to earlier settings finds that folder's
# files still there (Snakemake deletes only the outputs of jobs it runs, and a failed
# tokenize's are its own key's) and plans nothing. Readers take the splits as ancient(): they
# are hard links into the store (results/tokens/.store/<key>/), whose mtime moves whenever
# Snakemake touches a link after a job, so mtimes say nothing about the tokens.
TOKENS_KEY = store_key(CONFIG)
LAYERS = config["model"]["layers"]
TOKENS_ROOT = "results/tokens"
TOKENS = f"{TOKENS_ROOT}/{TOKENS_KEY}"
LAYER_DIR = "results/layer_{layer}"
SAE_FILE = f"{LAYER_DIR}/sae.safetensors"
SUMMARY = "results/summary"
HUB = "results/hub"
ENV = "../../envs/loupe.yaml"

# Every job gets the whole config as JSON in LOUPE_CONFIG, read from the environment rather
# than params: the environment never triggers a rerun, so execution-only keys (device, batch
# sizes, logging) reach the job without rerunning anything. Local jobs inherit it; a cluster
# job parses this file again on its node and sets it there; `envvars:` declares the channel,
# so remote executors pass it on too.
os.environ.update(
    LOUPE_CONFIG=json.dumps(config, sort_keys=True),
    PYTHONPATH=os.pathsep.join(
        filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")])
    ),
)


envvars:
    "LOUPE_CONFIG",


def settings_for(stage):
    """The output-changing config keys `stage` reads (loupe.config.STAGE_READS) as one JSON
    string: the rule's params, so Snakemake reruns it exactly when one of them changes. The
    params are the rerun key only: the job reads its config from LOUPE_CONFIG (the whole
    config), so a key a stage reads must be listed in STAGE_READS or changing it never reruns
    the stage (tests/test_stage_reads.py checks each stage). A function, so the hookpoint
    template's `{layer}` is not taken for a wildcard."""
    text = json.dumps(stage_settings(config, stage), sort_keys=True)
    return lambda wildcards: text


def checked_layer(wildcards):
    layer = int(wildcards.layer)
    if layer not in LAYERS:
        raise WorkflowError(
            f"layer {layer} is not configured (model.layers: {LAYERS[0]}..{LAYERS[-1]}, {len(LAYERS)} layers)"
        )
    return layer


def trained_layers(output):
    """The layers a training job trains: those of its sae.safetensors outputs, each checked."""
    return [
        checked_layer(SimpleNamespace(layer=layer))
        for layer in layers_of(output.sae, SAE_FILE)
    ]


def built_by_workflow(path):
    """[path] if a rule of this workflow makes it (the demo model/corpus), else [] (a hub id
    or a file the user provides is never a DAG input, so planning needs no network)."""
    return [path] if path in BUILT else []


def model_inputs(wildcards=None):
    names = [
        config["model"]["name"],
        config["model"]["tokenizer"] or config["model"]["name"],
    ]
    return sorted({p for n in names for p in built_by_workflow(n)})


def adjacent_layer(template, offset, judged_by_digest=False):
    """An input function: `template` (e.g. rule train's SAE or digest) for layer
    {layer}+offset, or nothing where that layer is not in model.layers (feature neighbours
    across layers). judged_by_digest: ancient(), its digest (another input) reruns the job,
    as for the SAE in maxact.smk."""

    def inputs(wildcards):
        other = int(wildcards.layer) + offset
        if other not in LAYERS:
            return []
        path = template.format(layer=other)
        return [ancient(path) if judged_by_digest else path]

    return inputs


def transfer_model_inputs(wildcards=None):
    """The evaluate.transfer_models this workflow builds (the demo's second model)."""
    return sorted(
        {p for m in config["evaluate"]["transfer_models"] for p in built_by_workflow(m)}
    )


def get_final_output():
    """What `snakemake` builds by default: every layer's results, the summary, the staged repo."""
    per_layer = [
        rules.train.output.sae,
        *rules.maxact.output,
        rules.evaluate.output.metrics,
        rules.neighbours.output.neighbours,
        rules.explain.output.explanations,
    ]
    return [
        rules.tokenize.output.manifest,
        *expand(per_layer, layer=LAYERS),
        *rules.summary.output,
        *rules.tradeoffs.output,
        *rules.explanation_scores.output,
        rules.stage.output.repo,
    ]
