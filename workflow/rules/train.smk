rule train:
    input:
        tokens=rules.tokenize.output.train,
        model=model_inputs,
    output:
        sae=f"{LAYER_DIR}/sae.safetensors",
        cfg=f"{LAYER_DIR}/cfg.json",
        metrics=f"{LAYER_DIR}/train_metrics.jsonl",
    params:
        layer=checked_layer,
        settings=settings("model", "device", "sae", "train"),
        # Not an output: it must survive a killed job so the rerun resumes from it.
        checkpoints="results/checkpoints/layer_{layer}",
        out_dir=lambda wildcards, output: os.path.dirname(output.sae),
    log:
        f"{LAYER_DIR}/train.log",
    threads: 8
    resources:
        gpu=1,
        mem_mb=48000,
        runtime=1440,
    conda:
        ENV
    shell:
        "python -m loupe --log {log} train --settings {params.settings:q} --threads {threads}"
        " --layer {params.layer} --tokens {input.tokens} --out-dir {params.out_dir}"
        " --checkpoint-dir {params.checkpoints}"


TARGETS.extend(expand(rules.train.output.sae, layer=LAYERS))
