# Max-activating examples: one streaming pass over the sample split per layer, keeping every
# feature's top examples, examples across its activation range, its firing statistics and an
# activation histogram, and a seeded pool of random windows with their sparse codes (the
# explanation scorers' non-activating contexts); then its top logits (logic in
# workflow/loupe/maxact.py).


rule maxact:
    input:
        # ancient: files judged by content, not mtime (see common.smk, TOKENS_KEY): the SAE
        # by its digest (a small file Snakemake compares by checksum), the splits by params.tokens
        sae=ancient(str(rules.train.output.sae)),
        digest=rules.train.output.digest,
        cfg=rules.train.output.cfg,
        tokens=ancient(str(rules.tokenize.output.sample)),
        manifest=ancient(str(rules.tokenize.output.manifest)),
        model=model_inputs,
    output:
        examples=f"{LAYER_DIR}/max_activations.parquet",
        intervals=f"{LAYER_DIR}/interval_examples.parquet",
        stats=f"{LAYER_DIR}/feature_stats.parquet",
        logits=f"{LAYER_DIR}/feature_logits.parquet",
        random_windows=f"{LAYER_DIR}/random_windows.parquet",
    log:
        f"{LAYER_DIR}/maxact.log",
    conda:
        ENV
    threads: 8
    resources:
        gpu=1,
        cpus_per_gpu=8,
        mem_mb=32000,
        runtime=360,
    params:
        layer=checked_layer,
        tokens=TOKENS_KEY,
        settings=settings_for("maxact"),
    shell:
        "python -m loupe --log {log} maxact --threads {threads}"
        " --layer {params.layer} --sae {input.sae} --tokens {input.tokens}"
        " --manifest {input.manifest} --examples {output.examples}"
        " --intervals {output.intervals} --stats {output.stats} --logits {output.logits}"
        " --random-windows {output.random_windows}"
