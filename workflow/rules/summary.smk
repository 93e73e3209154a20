# The suite at a glance, and the description of `snakemake --report report.html`.


report: "../report/workflow.rst"


localrules:
    summary,
    tradeoffs,
    explanation_scores,


rule summary:
    input:
        evals=expand(rules.evaluate.output.metrics, layer=LAYERS),
        stats=expand(rules.maxact.output.stats, layer=LAYERS),
        train_metrics=expand(rules.train.output.metrics, layer=LAYERS),
        spliced=rules.spliced.output.spliced,  # its prefixes join metrics.csv
    output:
        metrics=report(
            f"{SUMMARY}/metrics.csv",
            caption="../report/metrics.rst",
            category="Summary",
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
    log:
        f"{SUMMARY}/summary.log",
    conda:
        ENV
    params:
        settings=settings_for("summary"),
    shell:
        "python -m loupe --log {log} summary"
        " --evals {input.evals} --stats {input.stats} --train-metrics {input.train_metrics}"
        " --metrics {output.metrics} --fvu {output.fvu} --delta-ce {output.delta_ce}"
        " --dead {output.dead} --density {output.density} --curves {output.curves}"
        " --spliced {input.spliced}"


# The sparsity ladder and the all-layer splice (logic in workflow/loupe/tradeoffs.py).
rule tradeoffs:
    input:
        evals=expand(rules.evaluate.output.metrics, layer=LAYERS),
        spliced=rules.spliced.output.spliced,
    output:
        ladder_csv=report(
            f"{SUMMARY}/ladder.csv",
            caption="../report/ladder_csv.rst",
            category="Summary",
        ),
        ladder_plot=report(
            f"{SUMMARY}/sparsity_ladder.png",
            caption="../report/sparsity_ladder.rst",
            category="Per-layer quality",
        ),
        spliced_csv=report(
            f"{SUMMARY}/spliced.csv",
            caption="../report/spliced_csv.rst",
            category="Summary",
        ),
        spliced_plot=report(
            f"{SUMMARY}/spliced_by_depth.png",
            caption="../report/spliced_by_depth.rst",
            category="Whole suite",
        ),
        transfer_csv=report(
            f"{SUMMARY}/transfer.csv",
            caption="../report/transfer_csv.rst",
            category="Summary",
        ),
        transfer_plot=report(
            f"{SUMMARY}/transfer_by_layer.png",
            caption="../report/transfer_by_layer.rst",
            category="Per-layer quality",
        ),
    log:
        f"{SUMMARY}/tradeoffs.log",
    conda:
        ENV
    params:
        settings=settings_for("summary"),
    shell:
        "python -m loupe --log {log} tradeoffs --evals {input.evals} --spliced {input.spliced}"
        " --ladder-csv {output.ladder_csv} --ladder-plot {output.ladder_plot}"
        " --spliced-csv {output.spliced_csv} --spliced-plot {output.spliced_plot}"
        " --transfer-csv {output.transfer_csv} --transfer-plot {output.transfer_plot}"


# How good the explanations are, per layer (logic in workflow/loupe/explanation_scores.py).
rule explanation_scores:
    input:
        explanations=expand(rules.explain.output.explanations, layer=LAYERS),
        stats=expand(rules.maxact.output.stats, layer=LAYERS),
    output:
        scores_csv=report(
            f"{SUMMARY}/explanation_scores.csv",
            caption="../report/explanation_scores_csv.rst",
            category="Summary",
        ),
        scores_plot=report(
            f"{SUMMARY}/explanation_scores_by_layer.png",
            caption="../report/explanation_scores_by_layer.rst",
            category="Features",
        ),
    log:
        f"{SUMMARY}/explanation_scores.log",
    conda:
        ENV
    params:
        settings=settings_for("explanation_scores"),
    shell:
        "python -m loupe --log {log} explanation-scores"
        " --explanations {input.explanations} --stats {input.stats}"
        " --scores-csv {output.scores_csv} --scores-plot {output.scores_plot}"
