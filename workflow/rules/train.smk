# Training: one job per group of layers (loupe.config.layer_groups: train.layers_per_job or
# train.layer_groups), each training its members' SAEs on one shared forward pass and writing
# each member's usual files in results/layer_N/, so every rule downstream stays per layer.
#
# Rule `train` (wildcard {layer}) trains one layer alone: every layer with layers_per_job 1, a
# group of one otherwise (and it names a layer outside model.layers). Each group of several
# layers gets a rule of its own, e.g. `train_layers_3_to_5`, whose outputs are its members'
# files: Snakemake prefers a rule without wildcards, so asking for
# results/layer_4/sae.safetensors trains layer 4's group.
#
# Grouping is an execution setting: changing it reruns nothing that is done. Every training
# rule has the same shell command, the same inputs and the same params apart from those
# derived from its outputs (the layers, their folders, the checkpoint folder), which
# Snakemake's params trigger does not compare. A group with a member to (re)train retrains all
# of its members: one job writes all of their files.
#
# Sizing of a job training n layers, the deepest layer d (Gemma 4 E2B at the gemma-loupe
# width; profiles/slurm/profile.yaml has the derivation):
#   GPU memory: the bf16 model cut after layer d (at most 9.3 GB), 1.7-1.8 GB per SAE in
#     training (measured: fp32 weights, gradients, ScheduleFree state), about 3 GB for one SAE
#     step's activations (sparsify steps each SAE in its layer's hook, one after the other):
#     9.3 + 3 + 1.8 n GB. The GPU is the site's choice (gpu_model, constraint); choose
#     train.layers_per_job by it (README, Layer groups): 12 for 40 GB, 18 for 48 GB or more.
#   mem_mb (host): 47 GB (the 10 GB model load, CUDA and torch, page cache for the token
#     file) + 1 GB per SAE: each SAE's checkpoint files (1.8 GB) pass through host memory when
#     saved and resumed, one file at a time (an estimate, not measured): 48 GB for one layer.
#   runtime: the forward through layers 0..d (0.111 GFLOP per token per layer) and one SAE
#     step per member (0.46 GFLOP per token) over tokens.train_tokens, at 30% of an A100's bf16
#     peak (94 TFLOP/s), times 1.5; at least 1 h, at most 24 h, what GPU partitions commonly
#     allow: a longer job is cut and resumed from its checkpoint by the profile's retries.

import math
import re
from types import SimpleNamespace

from loupe.config import layer_groups

CHECKPOINTS = "results/checkpoints"
SAE_FILE = f"{LAYER_DIR}/sae.safetensors"
try:
    TRAIN_GROUPS = layer_groups(Config.from_dict(config))
except LoupeError as e:
    raise WorkflowError(str(e)) from None


def train_mem_mb(layers):
    """Host memory (MB) of a job training `layers` (the sizing above)."""
    return 47000 + 1000 * len(layers)


def train_runtime(layers):
    """Time limit (minutes) of a job training `layers` (the sizing above)."""
    gflop_per_token = 0.111 * (max(layers) + 1) + 0.46 * len(layers)
    hours = gflop_per_token * 1e9 * config["tokens"]["train_tokens"] / 94e12 / 3600
    return min(1440, max(60, math.ceil(1.5 * 60 * hours)))


def listed(files):
    """A rule's named output as a list: one file (rule train) or the members' files."""
    return [files] if isinstance(files, str) else list(files)


def trained_layers(output):
    """The layers a training job trains: those of its sae.safetensors outputs."""
    pattern = re.escape(SAE_FILE).replace(re.escape("{layer}"), r"(\d+)")
    layers = [int(re.fullmatch(pattern, path).group(1)) for path in listed(output.sae)]
    return [checked_layer(SimpleNamespace(layer=layer)) for layer in layers]


def member_files(template, group):
    """`template`'s files for the members of `group`; the template itself for rule train."""
    return template if group is None else expand(template, layer=group)


def train_rule_name(group):
    """train_layers_1_3 for [1, 3]; train_layers_23_to_34 for a run of consecutive layers."""
    if len(group) > 2 and group == list(range(group[0], group[-1] + 1)):
        return f"train_layers_{group[0]}_to_{group[-1]}"
    return "train_layers_" + "_".join(map(str, group))


def share_site_settings(name):
    """Give rule `name` the site settings given for rule train (a profile's set-resources,
    e.g. the SLURM partition, and set-threads): a group's rule is named here, not by the
    site. Snakemake reads them when the rule is defined."""
    site = workflow.resource_settings
    for given in (site._parsed_overwrite_resources, site._parsed_overwrite_threads):
        if "train" in given:
            given.setdefault(name, given["train"])


# Rule train, then one rule per group of several layers (a group of one is rule train's).
for group in [None] + [g for g in TRAIN_GROUPS if len(g) > 1]:
    name = "train" if group is None else train_rule_name(group)
    if group is not None:
        share_site_settings(name)

    rule:
        name:
            name
        input:
            # ancient: the token splits' identity is their folder (see common.smk, TOKENS_KEY)
            tokens=ancient(str(rules.tokenize.output.train)),
            manifest=ancient(str(rules.tokenize.output.manifest)),
            model=model_inputs,
        output:
            sae=member_files(SAE_FILE, group),
            cfg=member_files(f"{LAYER_DIR}/cfg.json", group),
            metrics=member_files(f"{LAYER_DIR}/train_metrics.jsonl", group),
            digest=member_files(f"{LAYER_DIR}/sae.sha256", group),
        log:
            member_files(f"{LAYER_DIR}/train.log", group),
        conda:
            ENV
        threads: 8
        resources:
            gpu=1,
            cpus_per_gpu=8,
            mem_mb=(
                (lambda wildcards: train_mem_mb([int(wildcards.layer)]))
                if group is None
                else train_mem_mb(group)
            ),
            runtime=(
                (lambda wildcards: train_runtime([int(wildcards.layer)]))
                if group is None
                else train_runtime(group)
            ),
        params:
            settings=settings_for("train"),
            layers=lambda wildcards, output: trained_layers(output),
            out_dir=lambda wildcards, output: [
                os.path.dirname(p) for p in listed(output.sae)
            ],
            # Not an output: it must survive a killed job so the rerun resumes from it. The
            # group's shallowest layer names it.
            checkpoint_dir=lambda wildcards, output: f"{CHECKPOINTS}/layer_{trained_layers(output)[0]}",
        # The group's log goes into each member's train.log (--log once per file).
        shell:
            "python -m loupe $(printf -- '--log %s ' {log}) train --threads {threads}"
            " --layers {params.layers} --tokens {input.tokens} --manifest {input.manifest}"
            " --out-dir {params.out_dir} --checkpoint-dir {params.checkpoint_dir}"
