# Stage 'neuronpedia': the suite as a Neuronpedia export in results/neuronpedia/, in the layout
# and fields of Neuronpedia's own export, for a publisher to hand to Neuronpedia (README). Not
# uploaded and not built by default: name it (`snakemake neuronpedia`).

# Within-layer neighbours (topkCosSim*) and explanations, per layer in LAYERS order: an empty
# list leaves them out. To switch explanations on, point it at that stage's outputs.
NEURONPEDIA_NEIGHBOURS = expand(rules.neighbours.output.neighbours, layer=LAYERS)
NEURONPEDIA_EXPLANATIONS = []


rule neuronpedia:
    input:
        # ancient: the weights are judged by their digests (see maxact.smk)
        sae=ancient(expand(rules.train.output.sae, layer=LAYERS)),
        digest=expand(rules.train.output.digest, layer=LAYERS),
        examples=expand(rules.maxact.output.examples, layer=LAYERS),
        intervals=expand(rules.maxact.output.intervals, layer=LAYERS),
        stats=expand(rules.maxact.output.stats, layer=LAYERS),
        logits=expand(rules.maxact.output.logits, layer=LAYERS),
        neighbours=NEURONPEDIA_NEIGHBOURS,
        explanations=NEURONPEDIA_EXPLANATIONS,
    output:
        out_dir=directory("results/neuronpedia"),
    log:
        "results/logs/neuronpedia.log",
    conda:
        ENV
    params:
        settings=settings_for("neuronpedia"),
    shell:
        "python -m loupe --log {log} neuronpedia"
        " --sae {input.sae:q} --examples {input.examples:q} --intervals {input.intervals:q}"
        " --stats {input.stats:q} --logits {input.logits:q}"
        " --neighbours {input.neighbours:q} --explanations {input.explanations:q}"
        " --out-dir {output.out_dir}"
