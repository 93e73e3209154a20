rule tokenize:
    input:
        model=model_inputs,
        data=built_by_workflow(config["dataset"]["path"]),
    output:
        train=f"{TOKENS}/train.npy",
        sample=f"{TOKENS}/sample.npy",
        eval=f"{TOKENS}/eval.npy",
        manifest=f"{TOKENS}/manifest.json",
    params:
        settings=settings("model", "dataset", "tokens"),
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
    log:
        f"{TOKENS}/tokenize.log",
    threads: 4
    resources:
        mem_mb=8000,
        runtime=720,
    conda:
        ENV
    shell:
        "python -m loupe --log {log} tokenize --settings {params.settings:q} --threads {threads}"
        " --out-dir {params.out_dir}"
