rule evaluate:
    input:
        sae=rules.train.output.sae,
        cfg=rules.train.output.cfg,
        tokens=rules.tokenize.output.eval,
        manifest=rules.tokenize.output.manifest,
        stats=rules.maxact.output.stats,
        model=model_inputs,
    output:
        eval=f"{LAYER_DIR}/eval.json",
    params:
        layer=checked_layer,
        settings=settings("model", "device", "sae", "evaluate"),
        sae_dir=lambda wildcards, input: os.path.dirname(input.sae),
    log:
        f"{LAYER_DIR}/evaluate.log",
    threads: 8
    resources:
        gpu=1,
        mem_mb=32000,
        runtime=120,
    conda:
        ENV
    shell:
        "python -m loupe --log {log} evaluate --settings {params.settings:q} --threads {threads}"
        " --layer {params.layer} --sae-dir {params.sae_dir} --tokens {input.tokens}"
        " --manifest {input.manifest} --stats {input.stats} --out {output.eval}"


TARGETS.extend(expand(rules.evaluate.output.eval, layer=LAYERS))
