# loupe: one sparse autoencoder per decoder layer, sampled, evaluated and published.
# Stages live in workflow/rules/ (one .smk each); all logic lives in the `loupe` package
# (workflow/loupe/), which every rule calls through `python -m loupe <stage>`.


include: "workflow/rules/common.smk"


wildcard_constraints:
    layer=r"\d+",


include: "workflow/rules/demo.smk"
include: "workflow/rules/tokenize.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/maxact.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/neighbours.smk"
include: "workflow/rules/summary.smk"
include: "workflow/rules/publish.smk"
include: "workflow/rules/neuronpedia.smk"
include: "workflow/rules/explain.smk"


localrules:
    all,
    explanations,
    explain_dry_run,


rule all:
    default_target: True
    input:
        get_final_output(),
