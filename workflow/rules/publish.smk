# Stage 'publish': `stage` assembles the hub repo in results/hub/ (default target); `upload`
# publishes it (never by default: `snakemake upload`). Both are cheap, so they run locally.

HUB = "results/hub"


# What staging reads: every section the card and config.json state, but only the hub keys that
# change the staged files (a dry-run or visibility switch must not re-stage, which re-hashes
# every file). Passed through a lambda, like settings(), so `{layer}` is no wildcard.
STAGE_SETTINGS = json.dumps(
    {
        **{s: config.get(s) for s in ("model", "dataset", "tokens", "sae", "train", "maxact", "evaluate")},
        "hub": {k: (config.get("hub") or {}).get(k) for k in ("repo", "prefix", "license", "language", "authors")},
    },
    sort_keys=True,
)


localrules:
    stage,
    upload,


rule stage:
    input:
        sae=expand(rules.train.output.sae, layer=LAYERS),
        cfg=expand(rules.train.output.cfg, layer=LAYERS),
        examples=expand(rules.maxact.output.examples, layer=LAYERS),
        stats=expand(rules.maxact.output.stats, layer=LAYERS),
        summary=rules.summary.output,
        tokens=rules.tokenize.output.manifest,
    output:
        repo=directory(HUB),
    params:
        settings=lambda wildcards: STAGE_SETTINGS,
    log:
        "results/logs/stage.log",
    threads: 4
    conda:
        ENV
    shell:
        "python -m loupe --log {log} stage --settings {params.settings:q} --threads {threads}"
        " --sae {input.sae:q} --examples {input.examples:q} --stats {input.stats:q}"
        " --summary {input.summary:q} --tokens-manifest {input.tokens} --out-dir {output.repo}"


rule upload:
    input:
        repo=rules.stage.output.repo,
    output:
        # A dry run writes its plan, never a receipt: a receipt means a verified upload.
        receipt=(
            "results/upload_dry_run.json"
            if (config.get("hub") or {}).get("dry_run")
            else "results/upload.json"
        ),
    params:
        settings=settings("hub"),
    log:
        "results/logs/upload.log",
    conda:
        ENV
    shell:
        "python -m loupe --log {log} upload --settings {params.settings:q} --staged {input.repo}"
        " --out {output.receipt}"


TARGETS.append(rules.stage.output.repo)
