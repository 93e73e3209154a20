# Max-activating examples: one streaming pass over the sample split per layer, keeping the top
# examples of every feature and its firing statistics (logic in workflow/loupe/maxact.py).

rule maxact:
    input:
        sae=rules.train.output.sae,
        cfg=rules.train.output.cfg,
        sample=rules.tokenize.output.sample,
        manifest=rules.tokenize.output.manifest,
        model=model_inputs,
    output:
        examples=f"{LAYER_DIR}/max_activations.parquet",
        stats=f"{LAYER_DIR}/feature_stats.parquet",
    params:
        layer=checked_layer,
        settings=settings("model", "device", "maxact"),
        sae_dir=lambda wildcards, input: os.path.dirname(input.sae),
    log:
        f"{LAYER_DIR}/maxact.log",
    threads: 8
    resources:
        gpu=1,
        mem_mb=32000,
        runtime=360,
    conda:
        ENV
    shell:
        "python -m loupe --log {log} maxact --settings {params.settings:q} --threads {threads}"
        " --layer {params.layer} --sae-dir {params.sae_dir} --tokens {input.sample}"
        " --manifest {input.manifest} --examples {output.examples} --stats {output.stats}"


TARGETS.extend(expand(rules.maxact.output.examples, layer=LAYERS))
TARGETS.extend(expand(rules.maxact.output.stats, layer=LAYERS))
