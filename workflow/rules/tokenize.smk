rule tokenize:
    input:
        model=model_inputs,
        data=built_by_workflow(config["dataset"]["path"]),
    output:
        train=f"{TOKENS}/train.npy",
        sample=f"{TOKENS}/sample.npy",
        eval=f"{TOKENS}/eval.npy",
        manifest=f"{TOKENS}/manifest.json",
    log:
        f"{TOKENS}/tokenize.log",
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=8000,
        runtime=720,
    params:
        settings=settings_for("tokenize"),
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
        store=f"{TOKENS_ROOT}/.store",
    shell:
        "python -m loupe --log {log} tokenize --threads {threads}"
        " --out-dir {params.out_dir} --store {params.store}"
