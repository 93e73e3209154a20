"""From raw measurements to the table rows, the overhead factors and the projection.

Every stage row is compared with the floor its own process timed right after it (same
batch, same machine load): the model forward through the layers the hooked layer needs plus
the SAE encoder matmul."""

from __future__ import annotations

from dataclasses import asdict

from . import cost
from .flops import ModelFlops, SaeFlops
from .timing import median


def _floor(res: dict, layers: int) -> tuple[float, float, int]:
    """(forward seconds through `layers` layers, encoder seconds, tokens) per batch."""
    f = res["floor"]
    return f["forward"][str(layers)]["seconds"], f["encode"]["seconds"], f["tokens"]


def floor_rows(name: str, r: dict) -> list[dict]:
    f = r["floor"]
    rows = []
    for k, v in sorted(f["forward"].items(), key=lambda kv: int(kv[0])):
        rows.append(
            dict(
                stage="floor: model forward",
                shape=name,
                variant=f"{k} of {r['layers']} layers",
                tokens_per_s=f["tokens"] / v["seconds"],
                peak_rss_mb=f["peak_rss_mb"],
                runs_s=v["runs_s"],
            )
        )
    e = f["encode"]
    rows.append(
        dict(
            stage="floor: SAE encode matmul",
            shape=name,
            variant=f"{e['num_latents']:,} latents",
            tokens_per_s=f["tokens"] / e["seconds"],
            peak_rss_mb=f["peak_rss_mb"],
            runs_s=e["runs_s"],
        )
    )
    return rows


def train_row(name: str, variant: str, layer: int, res: dict) -> dict:
    """Tokens/s per optimizer step, and time per token over the floor: whole steps, and
    batches without the optimizer step (the share a real 16k-token step would see)."""
    fwd, enc, tokens = _floor(res, layer + 1)
    floor_per_token = (fwd + enc) / tokens
    step_tokens = res["tokens_per_batch"] * res["grad_acc_steps"]
    step_s = median(res["step_s"])
    acc_s = median(res["accumulate_batch_s"])
    return dict(
        stage="train",
        shape=name,
        variant=variant,
        layer=layer,
        tokens_per_s=step_tokens / step_s,
        floor_tokens_per_s=1 / floor_per_token,
        ratio=step_s / step_tokens / floor_per_token,
        ratio_batch=acc_s / res["tokens_per_batch"] / floor_per_token,
        peak_rss_mb=res["peak_rss_mb"],
        runs_s=res["step_s"],
    )


def sae_factor(res: dict) -> float:
    """Encoder floors per batch beyond the forward (a = 1: the forward inside a stage is the
    floor's computation, without autograd in both)."""
    fwd, enc, _ = _floor(res, res["layers_run"])
    return (median(res["accumulate_batch_s"]) - fwd) / enc


def shape_rows(name: str, r: dict) -> tuple[list[dict], dict]:
    """Table rows for one shape, and its derived figures (factors, comparisons, memory)."""
    n = r["layers"]
    rows = floor_rows(name, r)
    ours = r["ours"]
    for res in ours.values():
        kind = "truncated" if res["truncate"] else "full"
        rows.append(train_row(name, f"loupe, {kind} forward", res["layer"], res))
    b = median([sae_factor(res) for res in ours.values()])
    optimizer = median(
        [
            (median(res["optimizer_batch_s"]) - median(res["accumulate_batch_s"]))
            / _floor(res, res["layers_run"])[1]
            for res in ours.values()
        ]
    )
    residuals = []
    for res in ours.values():
        fwd, enc, _ = _floor(res, res["layers_run"])
        residuals.append(median(res["accumulate_batch_s"]) / (fwd + b * enc) - 1)

    # What truncation saved per batch, measured and as the floors predict it.
    truncation = {}
    for layer in sorted({res["layer"] for res in ours.values()}):
        t = ours[f"L{layer}-truncated"]
        f = ours[f"L{layer}-full"]
        truncation[layer] = {
            "measured_s": median(f["accumulate_batch_s"]) - median(t["accumulate_batch_s"]),
            "floor_s": _floor(f, n)[0] - _floor(t, layer + 1)[0],
            "speedup": median(f["step_s"]) / median(t["step_s"]),
        }

    one, every = r["sparsify_one"], r["sparsify_all"]
    shallow = one["layer"]
    one_row = train_row(name, "sparsify Trainer, plain (1 hookpoint)", shallow, one)
    all_row = train_row(name, f"sparsify Trainer, plain (all {n} hookpoints)", shallow, every)
    all_row.update(
        layer="all",
        floor_tokens_per_s=None,
        ratio=None,
        ratio_batch=None,
        note=f"{n} SAEs per token: {n * all_row['tokens_per_s']:.3g} layer-tokens/s",
    )
    rows += [one_row, all_row]
    ours_row = train_row(name, "", shallow, ours[f"L{shallow}-truncated"])

    # One job per layer vs one job for all layers, per token of every layer, in floor terms
    # of the standalone floor run (all prefixes); and the grouped run against its model.
    fl = r["floor"]
    fwd = {int(k): v["seconds"] for k, v in fl["forward"].items()}
    enc = fl["encode"]["seconds"]
    separate = sum(fwd[layer + 1] + b * enc for layer in range(n))
    grouped = fwd[n] + n * b * enc
    g_fwd, g_enc, _ = _floor(every, n)
    derived = {
        "factors": asdict(
            cost.Factors(
                forward=1.0, sae=b, optimizer=optimizer, step_batch_tokens=one["tokens_per_batch"]
            )
        ),
        "residuals": residuals,
        "truncation": truncation,
        "loupe_over_sparsify_plain": ours_row["tokens_per_s"] / one_row["tokens_per_s"],
        "per_sae_train_mb": (every["peak_rss_mb"] - one["peak_rss_mb"]) / max(1, n - 1),
        "separate_over_grouped": separate / grouped,
        "grouped_measured_over_model": median(every["accumulate_batch_s"])
        / (g_fwd + n * b * g_enc),
    }

    m = r["maxact"]
    layer = m["layer"]
    for size in ("small", "large"):
        res = m[size]
        fwd_s, enc_s, tokens = _floor(res, layer + 1)
        sec = median(res["batch_s"])
        per_token = sec / res["tokens_per_batch"]
        floor_per_token = (fwd_s + enc_s) / tokens
        rows.append(
            dict(
                stage="max-activation sampling",
                shape=name,
                variant=f"{res['pass_tokens']:,}-token sample",
                layer=layer,
                tokens_per_s=1 / per_token,
                floor_tokens_per_s=1 / floor_per_token,
                ratio=per_token / floor_per_token,
                peak_rss_mb=res["peak_rss_mb"],
                write_s=res["write_s"],
                runs_s=res["batch_s"],
            )
        )
        if size == "large":
            # The longer pass is nearer the steady state (early batches admit more examples).
            derived["sample_factors"] = asdict(
                cost.Factors(
                    forward=1.0, sae=(sec * tokens / res["tokens_per_batch"] - fwd_s) / enc_s
                )
            )
    derived["sample_write_s"] = {s: m[s]["write_s"] for s in ("small", "large")}
    return rows, derived


def tokenize_rows(t: dict) -> tuple[list[dict], dict]:
    large, small = t["large"], t["small"]
    sec = median(large["runs_s"])
    tokens = large["tokens"]
    floor = large["floor"]
    floor_tps = floor["tokens"] / floor["seconds"]
    rows = [
        dict(
            stage="tokenize",
            shape="demo tokenizer",
            variant=f"{tokens:,} tokens",
            tokens_per_s=tokens / sec,
            floor_tokens_per_s=floor_tps,
            ratio=floor_tps / (tokens / sec),
            peak_rss_mb=large["peak_rss_mb"],
            runs_s=large["runs_s"],
        ),
        dict(
            stage="tokenize",
            shape="demo tokenizer",
            variant=f"{small['tokens']:,} tokens",
            tokens_per_s=small["tokens"] / median(small["runs_s"]),
            peak_rss_mb=small["peak_rss_mb"],
            runs_s=small["runs_s"],
        ),
        dict(
            stage="floor: tokenizer alone",
            shape="demo tokenizer",
            variant=f"{floor['tokens']:,} tokens",
            tokens_per_s=floor_tps,
            runs_s=floor["runs_s"],
        ),
    ]
    return rows, {"tokens_per_s": tokens / sec}


def projection(
    model: ModelFlops,
    sae: SaeFlops,
    derived: dict,
    rates: cost.Rates,
    build: cost.Build,
    per_sae_gb: float,
    model_gb: float,
    tokenize_tps: float,
    gpu_gb: float = 80.0,
    work_gb: float = 8.0,
) -> dict:
    """GPU-hours of the full build per stage and training strategy."""
    train_f = cost.Factors(**derived["factors"])
    sample_f = cost.Factors(**derived["sample_factors"])
    biggest = cost.largest_group(gpu_gb, model_gb, per_sae_gb, work_gb)
    strategies = {
        "one layer per job, truncated forward (loupe)": dict(group_size=1),
        "one layer per job, full forward (sparsify plain, 1 hookpoint)": dict(
            group_size=1, truncate=False
        ),
    }
    for g in sorted({5, 7, min(biggest, build.layers)}):
        if 1 < g <= biggest:
            strategies[f"groups of {g} layers, truncated forward"] = dict(group_size=g)
    train = {
        k: cost.train_hours(model, sae, train_f, rates, build, **v) for k, v in strategies.items()
    }
    sample = cost.sample_hours(model, sae, sample_f, rates, build)
    evaluate = cost.eval_hours(model, sae, sample_f, rates, build)
    total_tokens = build.train_tokens + build.sample_tokens + build.eval_tokens
    # What truncation buys one layer's training job on the real model.
    truncation = {}
    for layer in (0, build.layers // 2, build.layers - 1):
        cut = cost.seconds_per_token(model.prefix(layer), 1, sae, train_f, rates)
        full = cost.seconds_per_token(model.full, 1, sae, train_f, rates)
        truncation[layer] = full / cut
    return {
        "truncation_speedup": truncation,
        "rates_tflops": asdict(rates),
        "build": asdict(build),
        "train_gpu_hours": train,
        "sample_gpu_hours": sample,
        "eval_gpu_hours": evaluate,
        "total_gpu_hours": {k: v + sample + evaluate for k, v in train.items()},
        "largest_group": biggest,
        "memory_gb": {
            "gpu": gpu_gb,
            "model": model_gb,
            "per_sae_train": per_sae_gb,
            "work": work_gb,
        },
        "tokenize_cpu_hours": total_tokens / tokenize_tps / 3600,
        "forward_gflops_per_token": {
            "base": model.base / 1e9,
            "full": model.full / 1e9,
            "layer_17_prefix": model.prefix(17) / 1e9,
            "lm_head": model.lm_head / 1e9,
        },
        "sae_mflops_per_token": {
            "encode": sae.encode / 1e6,
            "forward": sae.forward / 1e6,
            "train_3x": sae.train / 1e6,
        },
    }
