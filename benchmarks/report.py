"""The markdown report of one run: measured table, side-by-side figures, projection."""

from __future__ import annotations


def _num(x, fmt: str | None = None) -> str:
    """Numbers for a table: thousands separators, 3 significant digits below 100."""
    if x is None:
        return ""
    if fmt:
        return fmt.format(x)
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _runs(xs: list[float]) -> str:
    if len(xs) > 5:
        return f"{len(xs)} runs, {min(xs):.2g} to {max(xs):.2g}"
    return " / ".join(f"{x:.2g}" for x in xs)


def table(rows: list[dict]) -> str:
    cols = (
        "stage",
        "shape",
        "variant",
        "layer",
        "tokens/s",
        "floor tokens/s",
        "x floor",
        "x floor w/o opt. step",
        "peak RSS MB",
        "runs (s)",
        "note",
    )
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        note = r.get("note", "")
        if "write_s" in r:
            note = f"parquet write {r['write_s']:.1f}s"
        cells = [
            r["stage"],
            r["shape"],
            r.get("variant", ""),
            _num(r.get("layer"), "{}"),
            _num(r.get("tokens_per_s")),
            _num(r.get("floor_tokens_per_s")),
            _num(r.get("ratio"), "{:.2f}"),
            _num(r.get("ratio_batch"), "{:.2f}"),
            _num(r.get("peak_rss_mb")),
            _runs(r.get("runs_s", [])),
            note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def projection_md(p: dict) -> str:
    rates, build, mem = p["rates_tflops"], p["build"], p["memory_gb"]
    f = p["forward_gflops_per_token"]
    s = p["sae_mflops_per_token"]
    lines = [
        f"Build: {build['layers']} layers, each trained on {build['train_tokens']:.3g} tokens "
        f"({build['tokens_per_step']:,} per optimizer step), sampled on "
        f"{build['sample_tokens']:.3g} and evaluated on {build['eval_tokens']:,.0f}.  ",
        f"Assumed sustained rates on one H100: {rates['bf16']:.0f} TFLOP/s for the bf16 model "
        f"forward, {rates['tf32']:.0f} TFLOP/s for the fp32 SAE (TF32 matmuls), about 30% of "
        "the H100 SXM's dense peaks.  ",
        f"Counted FLOPs per token (E2B text tower at ctx 1024, causal and sliding-window "
        f"attention): full forward {f['full']:.2f} GFLOP (through layer 17: "
        f"{f['layer_17_prefix']:.2f}), LM head {f['lm_head']:.2f}; SAE encoder "
        f"{s['encode']:.0f} MFLOP, forward {s['forward']:.0f}, training by the 3x rule "
        f"{s['train_3x']:.0f}.  ",
        "Truncation speeds up one layer's training job "
        + ", ".join(f"{v:.2f}x at layer {k}" for k, v in p["truncation_speedup"].items())
        + " (vs the full forward).",
        "",
        "| stage | how | GPU-hours | whole build, GPU-hours |",
        "|---|---|---|---|",
    ]
    for k, v in p["train_gpu_hours"].items():
        lines.append(f"| train | {k} | {v:,.0f} | {p['total_gpu_hours'][k]:,.0f} |")
    lines += [
        f"| max-activation sampling | one layer per job, truncated | "
        f"{p['sample_gpu_hours']:,.1f} | |",
        f"| evaluate | one layer per job: clean, spliced and ablated full forwards with logits "
        f"(floor), SAE as in sampling | {p['eval_gpu_hours']:,.1f} | |",
        "",
        f"Tokenization is CPU work: {p['tokenize_cpu_hours']:,.1f} CPU-hours at the measured "
        "rate (one thread, the demo's BPE tokenizer, not Gemma's).  ",
        f"Memory of a layer group: the model {mem['model']:.1f} GB (bf16, embeddings included) "
        f"+ {mem['per_sae_train']:.2f} GB per SAE in training (measured: weights, gradients, "
        f"optimizer state in fp32) + {mem['work']:.0f} GB working set (assumed): at most "
        f"{p['largest_group']} SAEs per job on an {mem['gpu']:.0f} GB H100.",
    ]
    return "\n".join(lines)


def render(meta: dict, rows: list[dict], derived: dict, projection: dict) -> str:
    main = derived["main_shape"]
    d = derived["shapes"][main]
    fa = d["factors"]
    sf = d["sample_factors"]
    trunc = "; ".join(
        f"layer {layer}: {t['speedup']:.2f}x tokens/s, {t['measured_s']:.2f}s less per batch "
        f"(floors: {t['floor_s']:.2f}s)"
        for layer, t in d["truncation"].items()
    )
    shared = ""
    if meta.get("shared"):
        shared = " The machine was shared with other work while measuring (load above)" + (
            ": CPU-time figures count this process's work only, though caches and memory"
            " bandwidth were shared."
            if meta.get("clock") == "cpu"
            else ": wall-clock figures include waiting for the cores."
        )
    out = [
        f"# loupe benchmarks: {meta['date']} on {meta['host']}",
        "",
        f"Command: `{meta['command']}` ({meta['wall_s'] / 60:.0f} min).  ",
        f"Machine: {meta['cpu']}, {meta['cores']} cores, {meta['memory_gb']:.0f} GB; "
        f"{meta['threads']} thread(s) per measurement; device {meta['device']}; "
        f"torch {meta['torch']}, transformers {meta['transformers']}, "
        f"eai-sparsify {meta['sparsify']}.  ",
        f"Load average (1/5/15 min) before: {meta['load_before']}, after: "
        f"{meta['load_after']}.{shared}",
        "",
        (
            "Times are CPU seconds of the measuring process (one thread): they count the work "
            "done whatever share of the cores other jobs take. "
            if meta.get("clock") == "cpu"
            else "Times are wall-clock seconds. "
        )
        + "Medians of 3 runs after a warm-up: optimizer steps (training), batches (sampling), "
        "whole runs (tokenization). Each measurement runs in its own process, which also times "
        "its floor right after it on the same batch: the forward through the layers the hooked "
        "layer needs, plus the SAE encoder matmul. `x floor` = the stage's time per token over "
        "the floor's. Training steps here hold 2 batches, so the optimizer step weighs far "
        "more than in a real 16k-token step: `x floor w/o opt. step` leaves it out. Peak RSS "
        "is each process's own high-water mark.",
        "",
        table(rows),
        "",
        "## Side by side and what follows",
        "",
        f"- Shape `{main}`, layer {d['shallow_layer']}: loupe's training code runs "
        f"{d['loupe_over_sparsify_plain']:.2f}x the tokens/s of sparsify's Trainer used "
        "plainly (same model, tokens, layer, TrainConfig; full forward, one hookpoint).",
        f"- Truncated vs full forward ({main}): {trunc}. With only "
        f"{d['layers']} layers the SAE dominates a batch; on the real 35-layer model the "
        "forward does, which the projection below counts.",
        f"- SAE work per batch: b = {fa['sae']:.2f} encoder-matmul floors beyond the forward "
        f"(median over the loupe runs; each run within "
        + ", ".join(f"{x:+.0%}" for x in d["residuals"])
        + f" of forward + b x encoder); one optimizer step = {fa['optimizer']:.1f} encoder "
        f"floors of {fa['step_batch_tokens']} tokens. Sampling: b = {sf['sae']:.2f}; its "
        "parquet files took "
        + " and ".join(f"{v:.1f}s" for v in d["sample_write_s"].values())
        + " to write at the two sample sizes (they grow with features x top_n, not tokens).",
        f"- Layer groups: training all {d['layers']} layers' SAEs on one forward (sparsify with "
        f"every hookpoint) instead of one job per layer needs "
        f"{1 / d['separate_over_grouped']:.2f}x the time (floors and b); the grouped run "
        f"measured {d['grouped_measured_over_model']:.2f}x that model. Each extra SAE costs "
        f"{d['per_sae_train_mb']:,.0f} MB.",
        "",
        "## Projected cost of the full gemma-loupe build on one H100",
        "",
        *(
            ["**Quick run: its shapes are too small for this projection to mean anything.**", ""]
            if meta.get("quick")
            else []
        ),
        projection_md(projection),
    ]
    return "\n".join(out) + "\n"
