# The embedded offline demo: a corpus of Python's own documentation and a tiny random
# Gemma 4 model trained-tokenizer pair. Only active when the config has a `demo:` section.

if config.get("demo"):

    rule demo_corpus:
        output:
            corpus=config["demo"]["corpus"],
        params:
            min_bytes=config["demo"].get("min_corpus_bytes", 3_000_000),
        log:
            "results/logs/demo_corpus.log",
        conda:
            ENV
        shell:
            "python -m loupe --log {log} demo-corpus --out {output.corpus} --min-bytes {params.min_bytes}"

    rule demo_model:
        input:
            corpus=rules.demo_corpus.output.corpus,
        output:
            model=directory(config["demo"]["model"]),
        log:
            "results/logs/demo_model.log",
        conda:
            ENV
        shell:
            "python -m loupe --log {log} demo-model --corpus {input.corpus} --out {output.model}"
