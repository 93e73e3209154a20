# The embedded offline demo: a corpus of Python's own documentation and a tiny random
# Gemma 4 model trained-tokenizer pair. Only active when the config has a `demo:` section.

if config.get("demo"):

    rule demo_corpus:
        output:
            corpus=config["demo"]["corpus"],
        log:
            "results/logs/demo_corpus.log",
        conda:
            ENV
        resources:
            mem_mb=4000,
            runtime=60,
        params:
            settings=settings_for("demo_corpus"),
        shell:
            "python -m loupe --log {log} demo-corpus --corpus {output.corpus}"

    rule demo_model:
        input:
            corpus=rules.demo_corpus.output.corpus,
        output:
            model=directory(config["demo"]["model"]),
        log:
            "results/logs/demo_model.log",
        conda:
            ENV
        resources:
            mem_mb=4000,
            runtime=60,
        shell:
            "python -m loupe --log {log} demo-model --corpus {input.corpus}"
            " --model {output.model}"


if (config.get("demo") or {}).get("transfer_model"):

    rule demo_transfer_model:
        input:
            corpus=rules.demo_corpus.output.corpus,
            model=rules.demo_model.output.model,
        output:
            transfer_model=directory(config["demo"]["transfer_model"]),
        log:
            "results/logs/demo_transfer_model.log",
        conda:
            ENV
        resources:
            mem_mb=4000,
            runtime=60,
        shell:
            "python -m loupe --log {log} demo-transfer-model --corpus {input.corpus}"
            " --model {input.model} --transfer-model {output.transfer_model}"
