import json
import os

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("9.21")


def _validate_config():
    # One line naming the offending key, instead of jsonschema's multi-line report.
    try:
        validate(config, workflow.source_path("../schemas/config.schema.yaml"))
    except WorkflowError as e:
        cause = e.__context__  # the jsonschema ValidationError that validate() caught
        if not hasattr(cause, "absolute_path"):
            raise
        key = "/".join(str(p) for p in cause.absolute_path)
        if cause.validator == "additionalProperties":
            known = cause.schema.get("properties", {})
            unknown = sorted(set(cause.instance) - set(known))
            raise WorkflowError(
                f"config error: unknown key {'/'.join(filter(None, [key, unknown[0]]))}"
                f" (known keys here: {', '.join(known)})"
            ) from None
        raise WorkflowError(f"config error at {key or '(top level)'}: {cause.message}") from None


_validate_config()

LAYERS = config["model"]["layers"]
TOKENS = "results/tokens"
LAYER_DIR = "results/layer_{layer}"
ENV = "../../envs/loupe.yaml"


def settings(*sections, layers=False):
    """The config sections a step depends on, as one JSON string (its params), so Snakemake
    reruns the rule exactly when one of them changes. `model.layers` is left out unless the
    step covers every layer: adding a layer must not retrain the others. A function, so the
    hookpoint template's `{layer}` is not taken for a wildcard."""
    chosen = {s: config.get(s) for s in sections}
    if "model" in chosen and not layers:
        chosen["model"] = {k: v for k, v in chosen["model"].items() if k != "layers"}
    text = json.dumps(chosen, sort_keys=True)
    return lambda wildcards: text


def checked_layer(wildcards):
    layer = int(wildcards.layer)
    if layer not in LAYERS:
        raise WorkflowError(
            f"layer {layer} is not configured (model.layers: {LAYERS[0]}..{LAYERS[-1]}, {len(LAYERS)} layers)"
        )
    return layer


def built_by_workflow(path):
    """[path] if a rule of this workflow makes it (the demo model/corpus), else [] (a hub id
    or a file the user provides is never a DAG input, so planning needs no network)."""
    demo = config.get("demo") or {}
    return [path] if path in (demo.get("model"), demo.get("corpus")) else []


def model_inputs(wildcards=None):
    names = [config["model"]["name"], config["model"].get("tokenizer") or config["model"]["name"]]
    return sorted({p for n in names for p in built_by_workflow(n)})


# What the default target builds; each stage's .smk adds its own final outputs.
TARGETS = [f"{TOKENS}/manifest.json"]
