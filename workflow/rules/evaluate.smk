rule evaluate:
    input:
        # ancient: files judged by content, not mtime (see common.smk, TOKENS_KEY): the SAE
        # by its digest (a small file Snakemake compares by checksum), the splits by params.tokens
        sae=ancient(str(rules.train.output.sae)),
        digest=rules.train.output.digest,
        cfg=rules.train.output.cfg,
        tokens=ancient(str(rules.tokenize.output.eval)),
        manifest=ancient(str(rules.tokenize.output.manifest)),
        stats=rules.maxact.output.stats,
        model=model_inputs,
        transfer_models=transfer_model_inputs,
    output:
        metrics=f"{LAYER_DIR}/eval.json",
    log:
        f"{LAYER_DIR}/evaluate.log",
    conda:
        ENV
    threads: 8
    resources:
        gpu=1,
        cpus_per_gpu=8,
        mem_mb=32000,
        runtime=120,
    params:
        layer=checked_layer,
        tokens=TOKENS_KEY,
        settings=settings_for("evaluate"),
    shell:
        "python -m loupe --log {log} evaluate --threads {threads}"
        " --layer {params.layer} --sae {input.sae} --tokens {input.tokens}"
        " --manifest {input.manifest} --stats {input.stats} --metrics {output.metrics}"


# All layers at once: every SAE spliced into one forward, and each prefix of the layers
# (logic in workflow/loupe/splice.py).
rule spliced:
    input:
        # ancient: judged by content, as in rule evaluate
        sae=ancient(expand(rules.train.output.sae, layer=LAYERS)),
        digest=expand(rules.train.output.digest, layer=LAYERS),
        tokens=ancient(str(rules.tokenize.output.eval)),
        manifest=ancient(str(rules.tokenize.output.manifest)),
        model=model_inputs,
    output:
        spliced=f"{SUMMARY}/spliced.json",
    log:
        f"{SUMMARY}/spliced.log",
    conda:
        ENV
    threads: 8
    resources:
        gpu=1,
        cpus_per_gpu=8,
        mem_mb=32000,
        runtime=240,
    params:
        tokens=TOKENS_KEY,
        settings=settings_for("spliced"),
    shell:
        "python -m loupe --log {log} splice --threads {threads}"
        " --sae {input.sae:q} --tokens {input.tokens}"
        " --manifest {input.manifest} --spliced {output.spliced}"
