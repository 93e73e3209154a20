#!/usr/bin/env python
"""What explaining and scoring a feature costs in tokens, counted from the real prompts of a
demo suite's layers (loupe.explain's dry run: delphi's prompts on the layers' own examples), and
what `explain.features: all` with `score_features: 1000` would cost for gemma-loupe: tokens,
H100-hours with an 8B explainer under vLLM, and the price at an API. Method, assumptions and
limits: benchmarks/README.md ("Explanations").

    snakemake --profile profiles/demo               # a demo suite in results/
    python benchmarks/explain_cost.py --results results

The example sizes are config.yaml's (the demo keeps its windows, top_n and example counts), so
the per-feature counts are gemma-loupe's, counted with the demo's tokenizer (see the README for
what that changes). Writes benchmarks/results/explain-cost.{json,md} and prints the markdown."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))

from loupe import explain  # noqa: E402
from loupe.config import Config  # noqa: E402
from loupe.tokens import load_tokenizer  # noqa: E402

# gemma-loupe: 35 layers x 49,152 latents (every one counted live: an upper bound).
SUITE_LAYERS, SUITE_LATENTS, SUITE_SCORED = 35, 49_152, 1000
# An 8B model on one H100 under vLLM. Prompt tokens: 2 FLOPs per parameter per token at the
# 300 TFLOP/s bf16 the README's training projection assumes sustained (= 18,750 tokens/s, the
# issue's ~19k). Completion tokens: MLPerf Inference v5.1, Red Hat's vLLM submission of Llama
# 3.1 8B on one H100, 5,777 tokens/s offline (FP8), rounded down to 5,000 for bf16.
PROMPT_TOKENS_PER_S = 300e12 / (2 * 8e9)
COMPLETION_TOKENS_PER_S = 5_000.0
# An API's price per million tokens for an 8B instruct model (assumed: a typical listed price
# for Llama 3.1 8B; no prompt-cache discount).
PRICE_PROMPT, PRICE_COMPLETION = 0.05, 0.08
# The goal: no more than the suite's training (README: about 20 H100-hours, layers_per_job 12).
TRAINING_H100_HOURS = 20.0
KEYS = ("requests", "prompt_tokens", "uncached_prompt_tokens", "completion_tokens")


def suite_config() -> Config:
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    return Config.from_dict(raw)


def count_layer(explain_config, layer_dir: Path, tokenizer) -> dict:
    """The dry run's counts of one layer, explaining only and explaining + scoring all."""
    files = [
        layer_dir / f"{n}.parquet"
        for n in ("max_activations", "interval_examples", "feature_stats", "random_windows")
    ]
    plan = explain.plan_layer(explain_config, *files)
    only = dataclasses.replace(explain_config, score_features=0)
    explained = explain.dry_run_layer(only, explain.plan_layer(only, *files), tokenizer)
    both = explain.dry_run_layer(explain_config, plan, tokenizer)
    return {"explain": explained, "both": both}


def per_feature(layers: list[dict]) -> dict:
    features = sum(r["explain"]["features"] for r in layers)
    scored = sum(r["both"]["scored"] for r in layers)
    out = {"explain": {}, "score": {}, "features": features, "scored": scored}
    for key in KEYS:
        e = sum(r["explain"][key] for r in layers)
        b = sum(r["both"][key] for r in layers)
        out["explain"][key] = e / features
        out["score"][key] = (b - e) / scored if scored else 0.0
    return out


def project(pf: dict) -> dict:
    explained, scored = SUITE_LAYERS * SUITE_LATENTS, SUITE_LAYERS * SUITE_SCORED
    tokens = {
        key: pf["explain"][key] * explained + pf["score"][key] * scored
        for key in ("prompt_tokens", "uncached_prompt_tokens", "completion_tokens")
    }
    prefill_h = tokens["uncached_prompt_tokens"] / PROMPT_TOKENS_PER_S / 3600
    decode_h = tokens["completion_tokens"] / COMPLETION_TOKENS_PER_S / 3600
    no_cache_h = tokens["prompt_tokens"] / PROMPT_TOKENS_PER_S / 3600
    api = (
        tokens["prompt_tokens"] * PRICE_PROMPT + tokens["completion_tokens"] * PRICE_COMPLETION
    ) / 1e6
    hours = prefill_h + decode_h
    return {
        "features_explained": explained,
        "features_scored": scored,
        **tokens,
        "h100_hours_prefill": prefill_h,
        "h100_hours_decode": decode_h,
        "h100_hours": hours,
        "h100_hours_without_prefix_cache": no_cache_h + decode_h,
        "api_usd": api,
        "goal_h100_hours": TRAINING_H100_HOURS,
        "goal_met": hours <= TRAINING_H100_HOURS,
        "stopping_term": "prefill" if prefill_h >= decode_h else "decode",
    }


def markdown(result: dict) -> str:
    pf, pr = result["per_feature"], result["projection"]
    lines = [
        f"Explanation cost, counted from the real prompts of {pf['features']:,} features"
        f" ({pf['scored']:,} scored) of a demo suite's {len(result['layers'])} layers"
        f" (`python benchmarks/explain_cost.py --results {result['results']}`; tokens counted"
        f" with {result['tokenizer']}'s tokenizer).",
        "",
        "| per feature | requests | prompt tokens | uncached prompt tokens | completion tokens |",
        "|---|---|---|---|---|",
    ]
    for kind, label in (("explain", "to explain"), ("score", "to score (detection + fuzzing)")):
        r = pf[kind]
        lines.append(
            f"| {label} | {r['requests']:.2f} | {r['prompt_tokens']:,.0f}"
            f" | {r['uncached_prompt_tokens']:,.0f} | {r['completion_tokens']:,.0f} |"
        )
    lines += [
        "",
        f"gemma-loupe, `features: all` ({pr['features_explained']:,} features) and"
        f" `score_features: {SUITE_SCORED}` ({pr['features_scored']:,} scored):",
        "",
        "| | value |",
        "|---|---|",
        f"| prompt tokens | {pr['prompt_tokens'] / 1e9:.2f} B |",
        f"| of them uncached (outside the prefix shared by every request of a kind) | {pr['uncached_prompt_tokens'] / 1e9:.2f} B |",
        f"| completion tokens | {pr['completion_tokens'] / 1e9:.3f} B |",
        f"| H100-hours, prefill (uncached prompt tokens at {PROMPT_TOKENS_PER_S:,.0f}/s) | {pr['h100_hours_prefill']:.1f} |",
        f"| H100-hours, decode (completion tokens at {COMPLETION_TOKENS_PER_S:,.0f}/s) | {pr['h100_hours_decode']:.1f} |",
        f"| H100-hours, 8B explainer under vLLM with prefix caching | {pr['h100_hours']:.1f} |",
        f"| H100-hours without prefix caching | {pr['h100_hours_without_prefix_cache']:.1f} |",
        f"| API at ${PRICE_PROMPT}/M prompt, ${PRICE_COMPLETION}/M completion tokens | ${pr['api_usd']:,.0f} |",
        f"| goal: at most the training's {TRAINING_H100_HOURS:.0f} H100-hours | {'met' if pr['goal_met'] else 'not met'} ({pr['stopping_term']} is the larger term) |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--results", type=Path, required=True, help="a demo run's results/ folder")
    p.add_argument(
        "--tokenizer", default=None, help="default: the demo model's, in results/demo/model"
    )
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--name", default="explain-cost")
    args = p.parse_args(argv)
    explain_config = suite_config().explain
    name = args.tokenizer or str(args.results / "demo" / "model")
    tokenizer = load_tokenizer(name, None)
    layer_dirs = sorted(args.results.glob("layer_*"), key=lambda d: int(d.name.split("_")[1]))
    layers = [count_layer(explain_config, d, tokenizer) for d in layer_dirs]
    result = {
        "results": str(args.results),
        "tokenizer": name,
        "explain_settings": dataclasses.asdict(explain_config),
        "layers": layers,
        "per_feature": per_feature(layers),
    }
    result["projection"] = project(result["per_feature"])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out_dir / f"{args.name}.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
