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
# Sizing of a job (GPU memory, host memory, time): README, Layer groups; the formulas are
# loupe.jobs.

from loupe.config import layer_groups
from loupe.jobs import (
    group_rule_name,
    listed,
    member_files,
    site_resources,
    site_threads,
    train_resources,
)

CHECKPOINTS = "results/checkpoints"
# A site's profile names rule train (its partition, account, threads), never a group's rule:
# each group's rule takes rule train's entry in its own resources and threads.
TRAIN_SITE_RESOURCES = site_resources(
    workflow.resource_settings.overwrite_resources, "train"
)
TRAIN_SITE_THREADS = site_threads(workflow.resource_settings.overwrite_threads, "train")
try:
    TRAIN_GROUPS = layer_groups(CONFIG)
except LoupeError as e:
    raise WorkflowError(str(e)) from None


# Rule train, then one rule per group of several layers (a group of one is rule train's).
for group in [None] + [g for g in TRAIN_GROUPS if len(g) > 1]:
    name = "train" if group is None else group_rule_name(group)

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
        threads: TRAIN_SITE_THREADS or 8
        resources:
            **train_resources(group, CONFIG.tokens.train_tokens, TRAIN_SITE_RESOURCES),
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
