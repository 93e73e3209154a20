#!/usr/bin/env python
"""How the explain stage's example counts and window lengths change the scores, and what they
cost in prompt tokens: loupe.explain's real stage (delphi's prompts, loupe's examples, its
scoring samples and parsing) run over a demo suite's layers against a deterministic explainer
on 127.0.0.1, for a ladder of settings side by side. Method and limits: benchmarks/README.md
("Explanations: example counts and windows").

    snakemake --profile profiles/demo               # a demo suite in results/
    python benchmarks/explain_examples.py --results results

The explainer is a stand-in for an LLM that reads the examples: it names the highlighted
phrase that most of the shown examples share ('contains "X"'), and answers the scorers by that
phrase (detection: the example's text holds X; fuzzing: the marked tokens hold X). So what is
measured is how well the examples shown pin a feature down and how precisely the held-out
samples estimate a score, not any model's skill. Window lengths are tried on copies of the
layer's files cut around each example's peak (random windows cut at the same place).
Writes benchmarks/results/explain-examples.{json,md} and prints the markdown."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))
sys.path.insert(0, str(REPO / "tests"))  # the deterministic endpoint the tests use

from explain_cost import suite_config  # noqa: E402
from explain_server import Server  # noqa: E402

from loupe import explain  # noqa: E402
from loupe.atomic import write_json  # noqa: E402
from loupe.tokens import load_tokenizer  # noqa: E402

FILES = ("max_activations", "interval_examples", "feature_stats", "random_windows")
# The settings tried, each against config.yaml's (explain_examples 10, score_examples 10, the
# maxact window 32 + 1 + 8): one knob moved at a time. A reference with many more scoring
# samples gives each feature's "true" score the smaller counts estimate.
EXPLAIN_EXAMPLES = (1, 3, 5, 10, 20)
SCORE_EXAMPLES = (3, 5, 10, 20)
REFERENCE_SCORE_EXAMPLES = 50
WINDOWS = ((32, 8), (16, 4), (8, 2), (4, 1))  # tokens before / after the peak


def answer(messages: list[dict]) -> str:
    """The deterministic explainer's reply to loupe's delphi prompts."""
    last = messages[-1]["content"]
    if "[EXPLANATION]" in messages[0]["content"]:
        lines = [ln for ln in last.splitlines() if ln and not ln.startswith("Activations:")]
        counts = collections.Counter(p for ln in lines for p in set(re.findall(r"<<(.*?)>>", ln)))
        phrase = counts.most_common(1)[0][0] if counts else ""
        return f'[EXPLANATION]: contains "{phrase}"'
    named = re.search(r'Latent explanation: contains "(.*)"', last)
    phrase = named.group(1) if named else "\x00"
    texts = re.findall(r"^Example \d+: (.*)$", last, re.MULTILINE)
    if "<<" in last.split("Example 0:", 1)[-1]:  # fuzzing: is the phrase what is marked?
        says = [any(phrase in m for m in re.findall(r"<<(.*?)>>", t)) for t in texts]
    else:
        says = [phrase in t for t in texts]
    return json.dumps([int(s) for s in says])


def cut_windows(layer_dir: Path, out: Path, before: int, after: int, full: tuple[int, int]):
    """Copies of the layer's files with every example cut to `before` tokens before its peak
    and `after` after it, and every random window to the same span of its tokens."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(layer_dir / "feature_stats.parquet", out / "feature_stats.parquet")
    for name in ("max_activations", "interval_examples"):
        table = pq.read_table(layer_dir / f"{name}.parquet")
        tokens, acts, peaks = [], [], []
        for t, a, p in zip(
            table.column("context_tokens").to_pylist(),
            table.column("token_activations").to_pylist(),
            table.column("peak_index").to_pylist(),
            strict=True,
        ):
            lo = max(0, p - before)
            tokens.append(json.loads(t)[lo : p + after + 1])
            acts.append(json.loads(a)[lo : p + after + 1])
            peaks.append(p - lo)
        for column, values in (
            ("context_tokens", [json.dumps(t) for t in tokens]),
            ("token_activations", [json.dumps(a) for a in acts]),
            ("context", ["".join(t) for t in tokens]),
            ("peak_index", peaks),
        ):
            i = table.schema.get_field_index(column)
            table = table.set_column(
                i, table.schema.field(i), pa.array(values, table.schema.field(i).type)
            )
        pq.write_table(table, out / f"{name}.parquet")
    table = pq.read_table(layer_dir / "random_windows.parquet")
    lo, hi = full[0] - before, full[0] + after + 1
    rows = table.num_rows
    texts = [json.loads(t)[lo:hi] for t in table.column("context_tokens").to_pylist()]
    codes = np.asarray(table.column("features").combine_chunks().flatten().flatten())
    values = np.asarray(table.column("activations").combine_chunks().flatten().flatten())
    k = codes.size // (rows * sum(full) + rows)
    codes = codes.reshape(rows, -1, k)[:, lo:hi]
    values = values.reshape(rows, -1, k)[:, lo:hi]
    pq.write_table(
        pa.table(
            {
                "context_tokens": [json.dumps(t) for t in texts],
                "features": codes.tolist(),
                "activations": values.tolist(),
            }
        ),
        out / "random_windows.parquet",
    )


def run(explain_config, layers: dict[int, list[Path]], work: Path, tokenizer) -> dict:
    """Every layer explained and scored with `explain_config`: the scores per (layer, feature) and the
    dry run's token counts per explained feature."""
    scores, counts = {}, collections.Counter()
    for layer, files in layers.items():
        record = work / f"record-{layer}.jsonl"
        record.unlink(missing_ok=True)
        out = work / f"explanations-{layer}.parquet"
        explain._explain_layer(explain_config, layer, tuple(files), record, out)
        import polars as pl

        for row in pl.read_parquet(out).iter_rows(named=True):
            scores[(layer, row["feature"])] = (row["detection"], row["fuzzing"], row["explanation"])
        plan = explain.plan_layer(explain_config, *files)
        counts.update(
            {
                f"all_{k}": v
                for k, v in explain.dry_run_layer(explain_config, plan, tokenizer).items()
            }
        )
        only = dataclasses.replace(explain_config, score_features=0)
        counts.update(explain.dry_run_layer(only, explain.plan_layer(only, *files), tokenizer))
    return {
        "scores": scores,
        # Explaining, per explained feature; scoring (both scorers), per scored feature.
        "explain_per_feature": {
            k: counts[k] / counts["features"] for k in ("prompt_tokens", "uncached_prompt_tokens")
        },
        "score_per_feature": {
            k: (counts[f"all_{k}"] - counts[k]) / counts["all_scored"]
            for k in ("prompt_tokens", "uncached_prompt_tokens")
        },
    }


def summarize(label: str, result: dict, reference: dict | None) -> dict:
    det = [v[0] for v in result["scores"].values() if v[0] is not None]
    fuz = [v[1] for v in result["scores"].values() if v[1] is not None]
    row = {
        "setting": label,
        "scored": len(det),
        "detection_mean": float(np.mean(det)) if det else None,
        "fuzzing_mean": float(np.mean(fuz)) if fuz else None,
        "explain_prompt_tokens": result["explain_per_feature"]["prompt_tokens"],
        "explain_uncached_tokens": result["explain_per_feature"]["uncached_prompt_tokens"],
        "score_prompt_tokens": result["score_per_feature"]["prompt_tokens"],
        "score_uncached_tokens": result["score_per_feature"]["uncached_prompt_tokens"],
    }
    if reference is not None:  # each feature's score against the reference's, same explanation
        errors = [
            abs(v[0] - reference["scores"][key][0])
            for key, v in result["scores"].items()
            if v[0] is not None
            and key in reference["scores"]
            and reference["scores"][key][0] is not None
            and v[2] == reference["scores"][key][2]
        ]
        row["detection_error_vs_reference"] = float(np.mean(errors)) if errors else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--features", type=int, default=100, help="explained per layer")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args()
    config = suite_config()
    layer_dirs = sorted(args.results.glob("layer_*"), key=lambda p: int(p.name.split("_")[1]))
    layers = {int(d.name.split("_")[1]): [d / f"{n}.parquet" for n in FILES] for d in layer_dirs}
    tokenizer = load_tokenizer(str(args.results / "demo/model"), None)
    full = (config.maxact.window_before, config.maxact.window_after)
    work = Path(tempfile.mkdtemp(prefix="loupe-explain-examples-"))
    rows = []
    server = Server(answer=answer)
    try:
        url = server.url
        base = dataclasses.replace(
            config.explain,
            base_url=url,
            features=args.features,
            score_features=args.features,
            concurrency=8,
        )

        def measure(label: str, explain_config, files=layers, reference=None) -> dict:
            result = run(explain_config, files, work, tokenizer)
            rows.append(summarize(label, result, reference))
            print(rows[-1], flush=True)
            return result

        reference = measure(
            f"score_examples={REFERENCE_SCORE_EXAMPLES} (reference)",
            dataclasses.replace(base, score_examples=REFERENCE_SCORE_EXAMPLES),
        )
        for n in SCORE_EXAMPLES:
            measure(
                f"score_examples={n}",
                dataclasses.replace(base, score_examples=n),
                reference=reference,
            )
        for n in EXPLAIN_EXAMPLES:
            measure(f"explain_examples={n}", dataclasses.replace(base, explain_examples=n))
        for before, after in WINDOWS:
            cut = {
                layer: [work / f"w{before}/{layer}/{n}.parquet" for n in FILES] for layer in layers
            }
            for layer, files in layers.items():
                cut_windows(files[0].parent, work / f"w{before}/{layer}", before, after, full)
            measure(f"window={before}+1+{after}", base, files=cut)
    finally:
        server.close()
    shutil.rmtree(work, ignore_errors=True)
    result = {
        "command": "python benchmarks/explain_examples.py --results results",
        "machine": f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "layers": list(layers),
        "features_per_layer": args.features,
        "defaults": {
            "explain_examples": config.explain.explain_examples,
            "score_examples": config.explain.score_examples,
            "window": f"{full[0]}+1+{full[1]}",
        },
        "rows": rows,
    }
    lines = [
        "# Explanations: example counts and windows",
        "",
        f"`{result['command']}` ({result['machine']}): {len(layers)} demo layers,"
        f" {args.features} features explained and scored per layer (stratified over density),"
        " a deterministic explainer (the shown examples' most shared highlighted phrase).",
        "",
        "| setting | scored | detection | fuzzing | detection error vs reference"
        " | explain: prompt (uncached) tokens per feature"
        " | score: prompt (uncached) tokens per scored feature |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = r.get("detection_error_vs_reference")
        lines.append(
            f"| {r['setting']} | {r['scored']:,} | {r['detection_mean']:.3f}"
            f" | {r['fuzzing_mean']:.3f} | {'' if err is None else f'{err:.3f}'}"
            f" | {r['explain_prompt_tokens']:,.0f} ({r['explain_uncached_tokens']:,.0f})"
            f" | {r['score_prompt_tokens']:,.0f} ({r['score_uncached_tokens']:,.0f}) |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "explain-examples.json", result)
    (args.out / "explain-examples.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
