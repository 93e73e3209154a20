# Feature explanations: an explainer LLM at an OpenAI-compatible endpoint (explain.base_url)
# names each feature from its top examples with delphi's prompt; delphi's detection and fuzzing
# scorers rate a sample (logic in workflow/loupe/explain.py). Not in the default target yet:
# it needs an endpoint (`snakemake explanations`). The record of answered requests is no
# output, so Snakemake never deletes it: a rerun sends only what was never answered.


rule explain:
    input:
        examples=rules.maxact.output.examples,
        intervals=rules.maxact.output.intervals,
        stats=rules.maxact.output.stats,
        random_windows=rules.maxact.output.random_windows,
    output:
        explanations=f"{LAYER_DIR}/explanations.parquet",
    log:
        f"{LAYER_DIR}/explain.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=1440,
    params:
        layer=checked_layer,
        record=lambda wildcards: f"{CHECKPOINTS}/layer_{wildcards.layer}/explain_requests.jsonl",
        settings=settings_for("explain"),
    shell:
        "python -m loupe --log {log} explain --layer {params.layer}"
        " --examples {input.examples} --intervals {input.intervals} --stats {input.stats}"
        " --random-windows {input.random_windows} --record {params.record}"
        " --explanations {output.explanations}"


rule explanations:
    input:
        expand(f"{LAYER_DIR}/explanations.parquet", layer=LAYERS),


# The cost before spending: `snakemake explain_dry_run` prints the prompt and completion tokens
# of the configured run per layer and in total, from the real prompts; it sends nothing.
rule explain_dry_run:
    input:
        examples=expand(rules.maxact.output.examples, layer=LAYERS),
        intervals=expand(rules.maxact.output.intervals, layer=LAYERS),
        stats=expand(rules.maxact.output.stats, layer=LAYERS),
        random_windows=expand(rules.maxact.output.random_windows, layer=LAYERS),
    log:
        "results/logs/explain_dry_run.log",
    conda:
        ENV
    params:
        layers=" ".join(map(str, LAYERS)),
    shell:
        # The table goes to the terminal (stdout), the log lines to the log.
        "python -m loupe explain-dry-run --layers {params.layers}"
        " --examples {input.examples} --intervals {input.intervals} --stats {input.stats}"
        " --random-windows {input.random_windows} 2> {log}"
