# Stage 'publish': `stage` assembles the hub repo in results/hub/ (default target); `upload`
# publishes it and `upload_dry_run` lists what it would send (never by default: name them).
# All three are cheap, so they run locally.


localrules:
    stage,
    upload,
    upload_dry_run,
    browse,


rule stage:
    input:
        # ancient: judged by content (see maxact.smk): the weights by their digests, the
        # token manifest by params (the tokens settings are among stage's)
        sae=ancient(expand(rules.train.output.sae, layer=LAYERS)),
        digest=expand(rules.train.output.digest, layer=LAYERS),
        cfg=expand(rules.train.output.cfg, layer=LAYERS),
        examples=expand(rules.maxact.output.examples, layer=LAYERS),
        intervals=expand(rules.maxact.output.intervals, layer=LAYERS),
        stats=expand(rules.maxact.output.stats, layer=LAYERS),
        logits=expand(rules.maxact.output.logits, layer=LAYERS),
        neighbours=expand(rules.neighbours.output.neighbours, layer=LAYERS),
        summary=rules.summary.output,
        manifest=ancient(str(rules.tokenize.output.manifest)),
    output:
        repo=directory(HUB),
    log:
        "results/logs/stage.log",
    conda:
        ENV
    threads: 4
    params:
        settings=settings_for("stage"),
    shell:
        "python -m loupe --log {log} stage --threads {threads}"
        " --sae {input.sae:q} --examples {input.examples:q} --intervals {input.intervals:q}"
        " --stats {input.stats:q} --logits {input.logits:q} --neighbours {input.neighbours:q}"
        " --summary {input.summary:q} --manifest {input.manifest} --repo {output.repo}"


rule upload:
    input:
        repo=rules.stage.output.repo,
    output:
        receipt="results/upload.json",
    log:
        "results/logs/upload.log",
    conda:
        ENV
    params:
        settings=settings_for("upload"),
    shell:
        "python -m loupe --log {log} upload --repo {input.repo}"
        " --receipt {output.receipt}"


# Sends nothing, so it can be rerun at will: its plan is also printed in its log.
rule upload_dry_run:
    input:
        repo=rules.stage.output.repo,
    output:
        plan="results/upload_dry_run.json",
    log:
        "results/logs/upload_dry_run.log",
    conda:
        ENV
    params:
        settings=settings_for("upload"),
    shell:
        "python -m loupe --log {log} upload-dry-run --repo {input.repo}"
        " --plan {output.plan}"


# Serves results/hub/ on 127.0.0.1 until Ctrl-C (the page reads the parquet files itself).
rule browse:
    input:
        repo=rules.stage.output.repo,
    log:
        "results/logs/browse.log",
    conda:
        ENV
    shell:
        "python -m loupe browse --repo {input.repo} 2>&1 | tee {log}"
