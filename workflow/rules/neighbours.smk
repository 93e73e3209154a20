# Feature neighbours: per layer, each feature's nearest features by decoder cosine in its own
# layer and its best matches in the SAEs of layers L-1 and L+1 where those are in model.layers
# (logic in workflow/loupe/neighbours.py). Reads only decoder weights: no model, no tokens.


rule neighbours:
    input:
        # ancient: the weights are judged by their digests (see maxact.smk)
        sae=ancient(str(rules.train.output.sae)),
        digest=rules.train.output.digest,
        prev_sae=adjacent_layer(rules.train.output.sae, -1),
        next_sae=adjacent_layer(rules.train.output.sae, +1),
        prev_digest=adjacent_layer(rules.train.output.digest, -1),
        next_digest=adjacent_layer(rules.train.output.digest, +1),
    output:
        neighbours=f"{LAYER_DIR}/feature_neighbours.parquet",
    log:
        f"{LAYER_DIR}/neighbours.log",
    conda:
        ENV
    resources:
        gpu=1,
        cpus_per_gpu=8,
        mem_mb=16000,
        runtime=60,
    params:
        layer=checked_layer,
        settings=settings_for("neighbours"),
    shell:
        "python -m loupe --log {log} neighbours --layer {params.layer} --sae {input.sae}"
        " --prev-sae {input.prev_sae:q} --next-sae {input.next_sae:q}"
        " --neighbours {output.neighbours}"
