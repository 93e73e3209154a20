# The suite at a glance, and the description of `snakemake --report report.html`.
SUMMARY = "results/summary"


report: "../report/workflow.rst"


localrules:
    summary,


rule summary:
    input:
        evals=expand(rules.evaluate.output.eval, layer=LAYERS),
        stats=expand(rules.maxact.output.stats, layer=LAYERS),
        train=expand(rules.train.output.metrics, layer=LAYERS),
    output:
        metrics=report(
            f"{SUMMARY}/metrics.csv", caption="../report/metrics.rst", category="Summary"
        ),
        fvu=report(
            f"{SUMMARY}/fvu_by_layer.png",
            caption="../report/fvu_by_layer.rst",
            category="Per-layer quality",
        ),
        delta_ce=report(
            f"{SUMMARY}/delta_ce_by_layer.png",
            caption="../report/delta_ce_by_layer.rst",
            category="Per-layer quality",
        ),
        dead=report(
            f"{SUMMARY}/dead_fraction_by_layer.png",
            caption="../report/dead_fraction_by_layer.rst",
            category="Features",
        ),
        density=report(
            f"{SUMMARY}/density_histograms.png",
            caption="../report/density_histograms.rst",
            category="Features",
        ),
        curves=report(
            f"{SUMMARY}/training_curves.png",
            caption="../report/training_curves.rst",
            category="Training",
        ),
    params:
        settings=settings("model", layers=True),
        layers=LAYERS,
    log:
        f"{SUMMARY}/summary.log",
    conda:
        ENV
    shell:
        "python -m loupe --log {log} summary --settings {params.settings:q}"
        " --layers {params.layers} --evals {input.evals} --stats {input.stats}"
        " --train-metrics {input.train} --metrics {output.metrics} --fvu {output.fvu}"
        " --delta-ce {output.delta_ce} --dead {output.dead} --density {output.density}"
        " --curves {output.curves}"


TARGETS.extend(rules.summary.output)
