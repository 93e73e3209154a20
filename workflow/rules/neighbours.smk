# Feature neighbours: per layer, each feature's nearest features by decoder cosine in its own
# layer and its best matches in the SAEs of layers L-1 and L+1 where those are in model.layers
# (logic in workflow/loupe/neighbours.py). Reads only decoder weights: no model, no tokens.


rule neighbours:
    input:
        # ancient: the weights are judged by their digests (see maxact.smk)
        sae=ancient(str(rules.train.output.sae)),
        digest=rules.train.output.digest,
        prev_sae=adjacent_layer(rules.train.output.sae, -1, judged_by_digest=True),
        next_sae=adjacent_layer(rules.train.output.sae, +1, judged_by_digest=True),
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


# Feature flow, checked against the data: per adjacent layer pair, the median best-match cosine
# and how often matched features co-fire on the same tokens vs shuffled pairs, from every
# layer's random windows (the same windows in every layer: no new forward pass). Logic in
# workflow/loupe/flow.py. Cheap (reads the pools once), so it runs locally.
localrules:
    flow,


rule flow:
    input:
        neighbours=expand(rules.neighbours.output.neighbours, layer=LAYERS),
        random_windows=expand(rules.maxact.output.random_windows, layer=LAYERS),
        stats=expand(rules.maxact.output.stats, layer=LAYERS),
    output:
        table=report(
            f"{SUMMARY}/feature_flow.csv",
            caption="../report/feature_flow_csv.rst",
            category="Features",
        ),
        plot=report(
            f"{SUMMARY}/feature_flow_by_layer.png",
            caption="../report/feature_flow_by_layer.rst",
            category="Features",
        ),
    log:
        f"{SUMMARY}/flow.log",
    conda:
        ENV
    params:
        settings=settings_for("flow"),
    shell:
        "python -m loupe --log {log} flow --neighbours {input.neighbours}"
        " --random-windows {input.random_windows} --stats {input.stats}"
        " --table {output.table} --plot {output.plot}"
