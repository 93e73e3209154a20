#!/usr/bin/env python
"""The flagship's sizes, rehearsed (issue 26): every stage after training, at gemma-loupe's
width, through the functions the rules call (workflow/loupe/cli.py's command table), on a
random E2B-width Gemma 4 (2 decoder layers, the real 262,144-token vocabulary) and a random
SAE of the real width (d_in 1536, 49,152 latents, k 100) for each of its two adjacent layers.

Per stage: wall and CPU seconds and peak RSS (each stage in a fresh process: VmHWM, and the
largest child it waited for, e.g. the notebook's kernel), the files it wrote; projected to the
35-layer build and, where a stage is a matmul of known FLOPs, to an H100. The staged repo's
size per layer and in total; the browser's bytes and requests for a first feature, the next
feature and a token search (headless chromium); the notebook's run; load_many's time and memory.

    python benchmarks/rehearse.py                 # full width: ~25 min on 2 shared cores, ~9 GB
    python benchmarks/rehearse.py --tokens 50176  # a larger sample split (default 16,384)
    python benchmarks/rehearse.py --quick         # the demo's width: checks the code paths
    python benchmarks/bench.py --rehearse         # the same as the first line

Writes benchmarks/results/rehearsal.json (every number) and .md (the tables); --quick writes
rehearsal-quick. Method, assumptions and limits: benchmarks/README.md ("The rehearsal")."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `benchmarks.bench`, wherever this runs from

from benchmarks.bench import FULL as BENCH_FULL  # noqa: E402
from loupe.demo import TinyModelSpec  # noqa: E402

E2B_WIDTH = BENCH_FULL.model

REAL_LAYERS = 35  # gemma-loupe's suite (config.yaml's model.layers)
REAL_VOCAB = 262_144


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    model: TinyModelSpec  # random weights: sizes and speed do not depend on their values
    sae: dict  # over config.yaml's sae section
    ctx_len: int
    sample_tokens: int  # the default of --tokens
    eval_tokens: int
    logit_slice: int  # maxact's top logits run on 1/logit_slice of the vocabulary, projected
    explain_features: int  # explained per layer (scored: score_features)
    score_features: int
    tokenizer_vocab: int = 2048  # the demo's BPE tokenizer: ids below the model's vocabulary


# bench.py's E2B-width model (hidden size, head layout, MLP, per-layer inputs, window) with
# E2B's 262,144-token vocabulary on 2 layers (the second full attention), no KV sharing.
FULL = Shape(
    "e2b-width",
    dataclasses.replace(
        E2B_WIDTH, vocab_size=REAL_VOCAB, num_hidden_layers=2, full_attention_every=2
    ),
    sae={},
    ctx_len=1024,
    sample_tokens=16_384,
    eval_tokens=2048,
    logit_slice=16,
    explain_features=64,
    score_features=16,
)
QUICK = Shape(
    "quick",
    TinyModelSpec(num_hidden_layers=2, num_kv_shared_layers=0, pretrain_steps=0),
    sae={"expansion_factor": 8, "k": 8},
    ctx_len=64,
    sample_tokens=4096,
    eval_tokens=1024,
    logit_slice=2,
    explain_features=8,
    score_features=4,
)
LAYERS = (0, 1)
STAGE = "stage (with the SAELens copy)"  # its result holds the staged repo's sizes


def plan(ctx: dict) -> list[tuple[str, str, dict]]:
    """(label, stage function of this module, kwargs) in the DAG's order."""
    per_layer = lambda name, label: [(f"{label}, layer {i}", name, {"layer": i}) for i in LAYERS]  # noqa: E731
    return [
        ("tokenize", "tokenize", {}),
        *per_layer("maxact", "maxact"),
        *per_layer("evaluate", "evaluate"),
        *per_layer("neighbours", "neighbours"),
        ("flow", "flow", {}),
        *per_layer("explain", "explain"),
        ("summary", "summary", {}),
        (STAGE, "stage", {}),
        ("load_many (both layers, local)", "load_many", {}),
        ("notebook (headless)", "notebook", {}),
        ("browser (headless chromium)", "browser", {}),
    ]


# --- paths and config ---------------------------------------------------------------------------


def paths(work: Path) -> dict[str, Path]:
    return {
        "corpus": work / "corpus.jsonl.gz",
        "model": work / "model",
        "tokens": work / "tokens",
        "summary": work / "summary",
        "hub": work / "hub",
    }


def sae_dir(ctx: dict, layer: int) -> Path:
    return Path(ctx["work"]) / "sae" / f"layer_{layer}"


def layer_file(ctx: dict, layer: int, name: str) -> Path:
    return Path(ctx["work"]) / f"layer_{layer}" / name


# The per-layer files maxact writes (the names rule maxact gives them).
MAXACT_FILES = {
    "examples": "max_activations.parquet",
    "intervals": "interval_examples.parquet",
    "stats": "feature_stats.parquet",
    "logits": "feature_logits.parquet",
    "random_windows": "random_windows.parquet",
}
SUMMARY_FILES = {
    "metrics": "metrics.csv",
    "fvu": "fvu_by_layer.png",
    "delta_ce": "delta_ce_by_layer.png",
    "dead": "dead_fraction_by_layer.png",
    "density": "density_histograms.png",
    "curves": "training_curves.png",
}
FLOW_FILES = {"table": "feature_flow.csv", "plot": "feature_flow.png"}


def raw_config(shape: Shape, work: Path, sample_tokens: int) -> dict:
    """config.yaml (gemma-loupe's settings: SAE, maxact, hub, neighbours) on the rehearsal's
    model, corpus and sizes; evaluation without the ladder and the transfer model (the chat
    model is not offline; bench.py --evaluation-additions measures both)."""
    import yaml

    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    p = paths(work)
    raw["model"].update(name=str(p["model"]), layers=list(LAYERS))
    raw["device"] = "cpu"
    raw["dataset"] = {"path": str(p["corpus"]), "text_column": "text"}
    rows = -(-sample_tokens // shape.ctx_len)
    raw["tokens"].update(
        ctx_len=shape.ctx_len,
        train_tokens=shape.ctx_len,
        sample_tokens=rows * shape.ctx_len,
        eval_tokens=shape.eval_tokens,
    )
    raw["sae"].update(shape.sae)
    raw["evaluate"].update(max_tokens=shape.eval_tokens, k_ladder=[], transfer_models=[])
    raw["explain"].update(
        model="rehearsal-explainer",
        features=shape.explain_features,
        score_features=shape.score_features,
    )
    return raw


def config_of(ctx: dict, **explain):
    from loupe.config import Config

    raw = json.loads(json.dumps(ctx["config"]))
    raw["explain"].update(explain)
    return Config.from_dict(raw)


# --- fixtures: the model and the SAEs -------------------------------------------------------


def fixtures(shape: Shape, work: Path) -> dict:
    """Corpus, model (random, with the demo's BPE tokenizer) and one random SAE per layer, in
    the work folder (kept while the shape is unchanged). Returns their sizes."""
    import torch
    from transformers import Gemma4ForConditionalGeneration

    from loupe.atomic import atomic_dir, atomic_path
    from loupe.demo import harvest_documents, tiny_gemma4_config, train_tokenizer
    from loupe.model import import_sparsify

    p = paths(work)
    work.mkdir(parents=True, exist_ok=True)
    if not p["corpus"].exists():
        with atomic_path(p["corpus"]) as tmp, gzip.open(tmp, "wt", encoding="utf-8") as f:
            for doc in harvest_documents():
                f.write(json.dumps(doc) + "\n")
    key = work / "shape.json"
    spec = json.dumps(dataclasses.asdict(shape), sort_keys=True)
    if not key.exists() or key.read_text() != spec:
        torch.manual_seed(0)
        tokenizer = train_tokenizer(p["corpus"], shape.tokenizer_vocab)
        model = Gemma4ForConditionalGeneration(tiny_gemma4_config(shape.model))
        with atomic_dir(p["model"]) as tmp:
            model.eval().save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        del model
        sparsify = import_sparsify()
        real = raw_config(shape, work, shape.sample_tokens)["sae"]
        cfg = sparsify.SparseCoderConfig(
            expansion_factor=real["expansion_factor"], k=real["k"], multi_topk=real["multi_topk"]
        )
        for layer in LAYERS:
            sae = sparsify.SparseCoder(shape.model.hidden_size, cfg, device="cpu")
            folder = work / "sae" / f"layer_{layer}"
            shutil.rmtree(folder, ignore_errors=True)
            sae.save_to_disk(folder)
            # The summary reads a training log; a random SAE has none.
            (folder / "train_metrics.jsonl").write_text("")
        key.write_text(spec)
    return {"model_mb": tree_mb(p["model"]), "sae_mb": tree_mb(work / "sae" / "layer_0")}


def tree_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


def sizes(files: dict) -> dict:
    return {name: Path(f).stat().st_size for name, f in files.items() if Path(f).is_file()}


# --- the stages, each run in a fresh process ----------------------------------------------------


def tokenize(ctx: dict) -> dict:
    from loupe.tokens import tokenize as tokenize_splits

    out = Path(ctx["work"]) / "tokens"
    shutil.rmtree(out, ignore_errors=True)
    manifest = tokenize_splits(config_of(ctx), out, ctx["threads"])
    return {"tokens": manifest["tokens"], "files": sizes({"sample": out / "sample.npy"})}


def maxact(ctx: dict, layer: int) -> dict:
    """loupe.maxact.sample_layer; its top logits (a [features, vocab] product) on the first
    1/logit_slice of the unembedding's rows, timed: the full product is linear in the
    vocabulary (bench.py's top logits measure that)."""
    import loupe.maxact as m

    slice_ = ctx["logit_slice"]
    timed = {}
    real_top_logits = m.top_logits

    def top_logits(W_dec, W_U, k):
        rows = W_U.shape[0] // slice_
        t0 = time.perf_counter()
        out = real_top_logits(W_dec, W_U[:rows], k=k)
        timed.update(seconds=time.perf_counter() - t0, vocab=rows, full_vocab=W_U.shape[0])
        return out

    m.top_logits = top_logits
    files = {k: layer_file(ctx, layer, v) for k, v in MAXACT_FILES.items()}
    files["examples"].parent.mkdir(parents=True, exist_ok=True)
    s = m.sample_layer(
        config_of(ctx),
        layer,
        sae_dir(ctx, layer),
        Path(ctx["work"]) / "tokens" / "sample.npy",
        Path(ctx["work"]) / "tokens" / "manifest.json",
        threads=ctx["threads"],
        **files,
    )
    logits_full_s = timed["seconds"] * timed["full_vocab"] / timed["vocab"]
    return {
        "tokens": s["tokens"],
        "pass_s": s["seconds"],
        "top_logits": {**timed, "projected_full_vocab_s": logits_full_s},
        "rows": {k: s.get(k) for k in ("examples", "interval_examples") if k in s},
        "files": sizes(files),
    }


def evaluate(ctx: dict, layer: int) -> dict:
    from loupe.evaluate import evaluate_layer

    out = layer_file(ctx, layer, "eval.json")
    r = evaluate_layer(
        config_of(ctx),
        layer,
        sae_dir(ctx, layer),
        Path(ctx["work"]) / "tokens" / "eval.npy",
        Path(ctx["work"]) / "tokens" / "manifest.json",
        layer_file(ctx, layer, MAXACT_FILES["stats"]),
        out,
        ctx["threads"],
    )
    return {
        "tokens": r["tokens"],
        "pass_s": r["seconds"],
        "fvu": r["fvu"],
        "files": sizes({"eval": out}),
    }


def neighbours(ctx: dict, layer: int) -> dict:
    from loupe.neighbours import neighbours_layer

    out = layer_file(ctx, layer, "feature_neighbours.parquet")
    adjacent = {"prev_sae": [layer - 1], "next_sae": [layer + 1]}
    r = neighbours_layer(
        config_of(ctx),
        layer,
        sae_dir(ctx, layer) / "sae.safetensors",
        out,
        **{
            k: [sae_dir(ctx, o) / "sae.safetensors" for o in v if o in LAYERS]
            for k, v in adjacent.items()
        },
    )
    products = 1 + sum(o in LAYERS for v in adjacent.values() for o in v)
    return {
        "rows": r["rows"],
        "products": products,
        "pass_s": r["seconds"],
        "files": sizes({"neighbours": out}),
    }


def flow(ctx: dict) -> dict:
    from loupe.flow import summarize_flow

    out = {k: Path(ctx["work"]) / "summary" / v for k, v in FLOW_FILES.items()}
    out["table"].parent.mkdir(parents=True, exist_ok=True)
    rows = summarize_flow(
        config_of(ctx),
        [layer_file(ctx, i, "feature_neighbours.parquet") for i in LAYERS],
        [layer_file(ctx, i, MAXACT_FILES["random_windows"]) for i in LAYERS],
        [layer_file(ctx, i, MAXACT_FILES["stats"]) for i in LAYERS],
        **out,
    )
    return {"pairs": len(rows), "files": sizes(out)}


def explain(ctx: dict, layer: int) -> dict:
    """loupe.explain.explain_layer against a deterministic OpenAI-compatible endpoint on
    127.0.0.1, in this process (tests/explain_server.py): what loupe itself costs per
    feature (prompts from the parquet files, requests, parsing, the record), not an LLM."""
    sys.path.insert(0, str(REPO / "tests"))
    from explain_server import Server

    from loupe.explain import explain_layer

    server = Server()
    try:
        out = layer_file(ctx, layer, "explanations.parquet")
        record = layer_file(ctx, layer, "explain_record.jsonl")
        record.unlink(missing_ok=True)
        config = config_of(ctx, base_url=server.url)
        r = explain_layer(
            config,
            layer,
            *(layer_file(ctx, layer, MAXACT_FILES[k]) for k in ("examples", "intervals", "stats")),
            layer_file(ctx, layer, MAXACT_FILES["random_windows"]),
            record,
            out,
        )
    finally:
        server.close()
    return {
        "features": config.explain.features,
        "scored": config.explain.score_features,
        "requests": server.requests,
        "result": {k: v for k, v in r.items() if isinstance(v, int | float)},
        "files": sizes({"explanations": out, "record": record}),
    }


def summary(ctx: dict) -> dict:
    from loupe.summary import summarize

    out = {k: Path(ctx["work"]) / "summary" / v for k, v in SUMMARY_FILES.items()}
    summarize(
        config_of(ctx),
        [layer_file(ctx, i, "eval.json") for i in LAYERS],
        [layer_file(ctx, i, MAXACT_FILES["stats"]) for i in LAYERS],
        [sae_dir(ctx, i) / "train_metrics.jsonl" for i in LAYERS],
        **out,
    )
    return {"files": sizes(out)}


def stage(ctx: dict) -> dict:
    from loupe.stage import stage_repo

    work = Path(ctx["work"])
    per_layer = lambda name: [layer_file(ctx, i, name) for i in LAYERS]  # noqa: E731
    summary_files = [work / "summary" / v for v in (*SUMMARY_FILES.values(), *FLOW_FILES.values())]
    stage_repo(
        config_of(ctx),
        [sae_dir(ctx, i) / "sae.safetensors" for i in LAYERS],
        *(per_layer(MAXACT_FILES[k]) for k in ("examples", "intervals", "stats", "logits")),
        per_layer("feature_neighbours.parquet"),
        summary_files,
        work / "hub",
        work / "tokens" / "manifest.json",
        ctx["threads"],
        explanations=per_layer("explanations.parquet"),
    )
    repo = repo_sizes(ctx)
    total = repo["shared"] + sum(sum(kinds.values()) for kinds in repo["per_layer"].values())
    return {"repo": repo, "files": {f"repo ({len(LAYERS)} layers)": total}}


def repo_sizes(ctx: dict) -> dict:
    """Bytes of the staged repo: per layer (its files) by kind, the rest shared."""
    import re

    root = Path(ctx["work"]) / "hub"
    layer_of = re.compile(r"(?:layer_|layers\.)(\d+)(?:\.parquet|/)")
    per_layer: dict[str, dict[str, int]] = {str(i): {} for i in LAYERS}
    shared = 0
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        found = layer_of.search(rel)
        if found is None:
            shared += f.stat().st_size
            continue
        parts = rel.split("/")
        kind = (
            "saelens " + parts[-1]
            if "/saelens/" in f"/{rel}"
            else parts[-2]
            if rel.endswith(".parquet")
            else parts[-1]
        )
        layer = per_layer.setdefault(found.group(1), {})
        layer[kind] = layer.get(kind, 0) + f.stat().st_size
    return {"per_layer": per_layer, "shared": shared}


def load_many(ctx: dict) -> dict:
    """sparsify's SparseCoder.load_many on the staged suite folder, both layers (the card's
    load_all cell, with a local folder for the repo)."""
    from loupe.layout import Layout
    from loupe.model import import_sparsify

    sparsify = import_sparsify()
    config = config_of(ctx)
    layout = Layout.of(config)
    root = Path(ctx["work"]) / "hub" / layout.prefix
    layers = [config.model.hookpoint_of(i) for i in LAYERS]
    t0 = time.perf_counter()
    saes = sparsify.SparseCoder.load_many(str(root), local=True, layers=layers, device="cpu")
    seconds = time.perf_counter() - t0
    assert sorted(saes) == sorted(layers), sorted(saes)
    return {"load_s": seconds, "saes": len(saes)}


def notebook(ctx: dict) -> dict:
    """The staged quickstart.ipynb, executed headless (nbclient) with the staged folder for
    the repo and the rehearsal's model for the model, as tests/test_stage.py runs it."""
    import nbformat
    from nbclient import NotebookClient

    from loupe.layout import NOTEBOOK
    from loupe.stage import set_notebook_parameters

    hub = Path(ctx["work"]) / "hub"
    nb = json.loads((hub / NOTEBOOK).read_text())
    set_notebook_parameters(nb, {"REPO": str(hub), "MODEL": ctx["config"]["model"]["name"]})
    run = Path(ctx["work"]) / "notebook"
    run.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    NotebookClient(
        nbformat.reads(json.dumps(nb), as_version=4),
        timeout=1800,
        kernel_name="python3",
        resources={"metadata": {"path": str(run)}},
    ).execute()
    return {"run_s": time.perf_counter() - t0, "cells": len(nb["cells"])}


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
]
LOADS = """performance.getEntriesByType('resource').filter(e => e.name.endsWith('.parquet'))
    .map(e => [e.startTime, e.responseEnd, e.encodedBodySize])"""


def browser(ctx: dict) -> dict:
    """The staged repo served as `loupe browse` serves it, in headless chromium: a first
    feature of layer 1 (the most active one with examples), the next feature, then a search
    for the most frequent top token of that layer's examples. Per view: the parquet bytes
    and requests (Resource Timing) and the most requests in flight at once; wall seconds."""
    import collections

    import pyarrow.parquet as pq
    from playwright.sync_api import sync_playwright

    from loupe.browse import serve
    from loupe.layout import Layout

    hub = Path(ctx["work"]) / "hub"
    layout = Layout.of(config_of(ctx))
    layer = LAYERS[-1]
    table = pq.read_table(hub / layout.per_layer("examples", layer), columns=["feature", "token"])
    feature = int(table["feature"][0].as_py())
    query = collections.Counter(table["token"].to_pylist()).most_common(1)[0][0]
    server, url = serve(hub)
    exe = shutil.which("chromium")
    if exe is None:
        return {"skipped": "Debian's chromium is not installed"}
    views = {}
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
            page = b.new_context(viewport={"width": 1280, "height": 900}).new_page()
            page.add_init_script("performance.setResourceTimingBufferSize(100000)")
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            done = "window.loupeState?.status === 'error' || window.loupeState?.status === 'ready'"

            def view(name: str, act, wait: str) -> None:
                before, t0 = loads(page), time.perf_counter()
                act()
                page.wait_for_function(wait, timeout=600_000)
                after = loads(page, since=before["requests"])
                state = page.evaluate("window.loupeState")
                views[name] = {
                    "bytes": after["bytes"] - before["bytes"],
                    "requests": after["requests"] - before["requests"],
                    "max_in_flight": after["max"],
                    "seconds": time.perf_counter() - t0,
                    "status": state.get("status"),
                    "error": state.get("error"),
                }

            view(
                "first feature",
                lambda: page.goto(f"{url}?layer={layer}&feature={feature}"),
                f"({done}) && window.loupeState.feature === {feature}",
            )
            view(
                "next feature",
                lambda: page.click("#next"),
                f"({done}) && window.loupeState.feature === {feature + 1}",
            )

            def search():
                page.fill("#query", query)
                page.press("#query", "Enter")

            view("token search", search, f"window.loupeState.search && ({done})")
            views["token search"]["query"] = query
            views["token search"]["features_found"] = len(
                page.evaluate("window.loupeState.search.features") or []
            )
            b.close()
    finally:
        server.shutdown()
        server.server_close()
    return {"layer": layer, "feature": feature, "views": views, "page_errors": errors}


def loads(page, since: int = 0) -> dict:
    """The page's parquet requests (Resource Timing: count, bytes), and the most in flight at
    once among those after the first `since` (tests/test_browser.py's parquet_loads)."""
    entries = page.evaluate(LOADS)
    late = entries[since:]
    edges = sorted([(s, 1) for s, _, _ in late] + [(e, -1) for _, e, _ in late])
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return {"requests": len(entries), "bytes": sum(e[2] for e in entries), "max": most}


STAGES = {
    f.__name__: f
    for f in (tokenize, maxact, evaluate, neighbours, flow, explain, summary, stage, load_many)
    + (notebook, browser)
}


def run_stage(name: str, ctx: dict, kwargs: dict) -> dict:
    """In a fresh process: one stage, its wall and CPU seconds and peak RSS (VmHWM of this
    process; the largest child it waited for, e.g. a notebook kernel, apart)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(ctx["threads"])
    wall, cpu = time.perf_counter(), time.process_time()
    result = STAGES[name](ctx, **kwargs)
    result["wall_s"] = time.perf_counter() - wall
    result["cpu_s"] = time.process_time() - cpu
    status = Path("/proc/self/status").read_text().splitlines()
    result["peak_rss_mb"] = next(int(x.split()[1]) / 1024 for x in status if x.startswith("VmHWM:"))
    result["children_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result


# --- projections --------------------------------------------------------------------------------


def projections(ctx: dict, ms: dict, shape: Shape) -> dict:
    """Each stage to gemma-loupe's 35 layers on this CPU, and where the stage is a matmul of
    known FLOPs, to one H100 (benchmarks/flops.py's assumed rates). Assumptions in the text."""
    import yaml

    from benchmarks.flops import RATES

    real = yaml.safe_load((REPO / "config.yaml").read_text())
    sample_real, eval_real = real["tokens"]["sample_tokens"], real["evaluate"]["max_tokens"]
    n = len(LAYERS)

    def mean(label: str, key: str) -> float:
        return sum(ms[f"{label}, layer {i}"][key] for i in LAYERS) / n

    features = ctx["features"]
    d = shape.model.hidden_size
    passes = [ms[f"maxact, layer {i}"] for i in LAYERS]
    maxact_pass_per_token = sum(m["pass_s"] / m["tokens"] for m in passes) / n
    logits_s = sum(m["top_logits"]["projected_full_vocab_s"] for m in passes) / n
    eval_per_token = (
        sum(
            ms[f"evaluate, layer {i}"]["pass_s"] / ms[f"evaluate, layer {i}"]["tokens"]
            for i in LAYERS
        )
        / n
    )
    nb = [ms[f"neighbours, layer {i}"] for i in LAYERS]
    product_s = sum(m["pass_s"] for m in nb) / sum(m["products"] for m in nb)
    explain_per_feature = sum(ms[f"explain, layer {i}"]["wall_s"] for i in LAYERS) / (
        n * shape.explain_features
    )
    logits_flop = 2 * features * REAL_VOCAB * d
    product_flop = 2 * features * features * d
    suite_products = REAL_LAYERS * 3 - 2
    cpu_h = {
        "maxact pass (10M tokens x 35 layers, at this model's 1-2 layer depth)": maxact_pass_per_token
        * sample_real
        * REAL_LAYERS
        / 3600,
        "top logits (full vocabulary x 35 layers)": logits_s * REAL_LAYERS / 3600,
        "evaluate (1M tokens x 35 layers, 2-layer model: 3 forwards + the 262k head)": eval_per_token
        * eval_real
        * REAL_LAYERS
        / 3600,
        f"neighbours ({suite_products} products)": product_s * suite_products / 3600,
        "explain, loupe's side only (49,152 features x 35 layers)": explain_per_feature
        * features
        * REAL_LAYERS
        / 3600,
    }
    h100_h = {
        "top logits (fp32)": REAL_LAYERS * logits_flop / (RATES["fp32"] * 1e12) / 3600,
        "neighbours (fp32)": suite_products * product_flop / (RATES["fp32"] * 1e12) / 3600,
    }
    return {
        "real": {"layers": REAL_LAYERS, "sample_tokens": sample_real, "eval_tokens": eval_real},
        "cpu_hours": cpu_h,
        "h100_hours": h100_h,
        "h100_rates_tflops": RATES,
        "per_unit": {
            "maxact pass s/token": maxact_pass_per_token,
            "top logits s/layer (full vocabulary)": logits_s,
            "evaluate s/token": eval_per_token,
            "neighbours s/product": product_s,
            "explain s/feature (loupe's side)": explain_per_feature,
        },
    }


def repo_projection(repo: dict, ms: dict, ctx: dict, shape: Shape) -> dict:
    """The staged repo at gemma-loupe's 35 layers: per layer as measured (the sample-dependent
    files as measured and at capacity: every feature with top_n examples, every interval
    slot filled and every feature explained, bytes per row as measured) and in total."""
    import pyarrow.parquet as pq

    cfg = ctx["config"]["maxact"]
    capacity = {
        "max_activations": ctx["features"] * cfg["top_n"],
        "interval_examples": ctx["features"] * ctx["interval_slots"],
    }
    layer = str(LAYERS[-1])
    measured = repo["per_layer"][layer]
    at_capacity = dict(measured)
    fill = {}
    for kind, rows_full in capacity.items():
        path = layer_file(
            ctx, LAYERS[-1], MAXACT_FILES["examples" if kind == "max_activations" else "intervals"]
        )
        rows = pq.ParquetFile(path).metadata.num_rows
        fill[kind] = rows / rows_full
        if rows:
            at_capacity[kind] = measured[kind] * rows_full / rows
    # explain.features "all": every feature explained (a layer's rows scale with them).
    explained = shape.explain_features
    fill["explanations"] = explained / ctx["features"]
    at_capacity["explanations"] = measured["explanations"] * ctx["features"] / explained
    per_layer = sum(measured.values())
    per_layer_full = sum(at_capacity.values())
    sae_only = sum(v for k, v in measured.items() if k in ("sae.safetensors", "cfg.json"))
    return {
        "layer_bytes": measured,
        "layer_bytes_at_capacity": at_capacity,
        "fill": fill,
        "per_layer_bytes": per_layer,
        "per_layer_bytes_at_capacity": per_layer_full,
        "shared_bytes": repo["shared"],
        "total_35_bytes": repo["shared"] + REAL_LAYERS * per_layer,
        "total_35_bytes_at_capacity": repo["shared"] + REAL_LAYERS * per_layer_full,
        "one_layer_sae_download_bytes": sae_only,
        "one_layer_without_saelens_copy_bytes_at_capacity": sum(
            v for k, v in at_capacity.items() if not k.startswith("saelens")
        ),
    }


# --- the run --------------------------------------------------------------------------------


def mb(x: float) -> str:
    return f"{x / 1e6:,.1f} MB" if x < 1e9 else f"{x / 1e9:,.2f} GB"


def render(result: dict) -> list[str]:
    meta, ms, p, repo = result["meta"], result["stages"], result["projection"], result["repo"]
    lines = [
        f"# The rehearsal: every stage after training at {meta['shape']}",
        "",
        f"`{meta['command']}`: {meta['wall_s'] / 60:.0f} min on {meta['machine']}, load average"
        f" {meta['load_before']} before and {meta['load_after']} after (a shared CPU: wall times"
        f" are what this run got). {meta['threads']} thread(s) per stage. Model: {meta['model']};"
        f" SAE {meta['features']:,} latents x d_in {meta['d_in']}, k {meta['k']}, one per layer"
        f" ({meta['sae_mb']:,.0f} MB each). Sample split {meta['sample_tokens']:,} tokens"
        f" (ctx {meta['ctx_len']}), eval {meta['eval_tokens']:,}; top logits timed on 1/"
        f"{meta['logit_slice']} of the vocabulary; {meta['explain_features']} features explained"
        f" and {meta['score_features']} scored per layer against a local deterministic endpoint.",
        "",
        "| stage | wall s | CPU s | peak RSS MB | files |",
        "|---|---|---|---|---|",
    ]
    for label in meta["stages"]:
        m = ms[label]
        files = ", ".join(f"{k} {mb(v)}" for k, v in m.get("files", {}).items())
        peak = f"{m['peak_rss_mb']:,.0f}"
        if m["children_peak_rss_mb"] > m["peak_rss_mb"]:
            peak += f" (child {m['children_peak_rss_mb']:,.0f})"
        lines.append(f"| {label} | {m['wall_s']:.1f} | {m['cpu_s']:.1f} | {peak} | {files} |")
    if meta["shape"] == QUICK.name:
        lines += [
            "",
            "**A quick run: its shapes are far too small for the projections to mean anything.**",
        ]
    lines += ["", "## Per unit (this CPU)", ""]
    lines += [f"- {k}: {v:.4g}" for k, v in p["per_unit"].items()]
    lines += [
        "",
        "## Projected to gemma-loupe (35 layers)",
        "",
        "| stage | this CPU, hours |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:,.2f} |" for k, v in p["cpu_hours"].items()]
    r = p["h100_rates_tflops"]
    lines += [
        "",
        f"On one H100, by FLOPs at {r['fp32']:.0f} fp32 TFLOP/s (assumed, flops.RATES; matmul"
        " only): " + "; ".join(f"{k} {v * 60:.1f} min" for k, v in p["h100_hours"].items()) + ".",
        "The sampling pass and evaluate on a GPU: bench.py's projection"
        " (results/2026-11-30-vm.md), which counts the real 35-layer forward.",
    ]
    lines += [
        "",
        "## The staged repo",
        "",
        "| file (one layer) | measured | at capacity |",
        "|---|---|---|",
    ]
    for kind, size in repo["layer_bytes"].items():
        lines.append(f"| {kind} | {mb(size)} | {mb(repo['layer_bytes_at_capacity'][kind])} |")
    lines += [
        f"| **per layer** | {mb(repo['per_layer_bytes'])} | {mb(repo['per_layer_bytes_at_capacity'])} |",
        f"| shared (card, notebook, browser, summary) | {mb(repo['shared_bytes'])} | |",
        f"| **35 layers** | {mb(repo['total_35_bytes'])} | {mb(repo['total_35_bytes_at_capacity'])} |",
        "",
        "At capacity: every feature with maxact.top_n examples, every interval slot filled and"
        " every feature explained (here: "
        + ", ".join(f"{k} {v:.1%}" for k, v in repo["fill"].items())
        + "), bytes per row as measured: an upper bound. One layer's SAE download (cfg.json +"
        f" sae.safetensors): {mb(repo['one_layer_sae_download_bytes'])}; one layer without the"
        f" SAELens copy, at capacity: {mb(repo['one_layer_without_saelens_copy_bytes_at_capacity'])}"
        f" ({mb(REAL_LAYERS * repo['one_layer_without_saelens_copy_bytes_at_capacity'])} for 35).",
    ]
    b = ms.get("browser (headless chromium)", {})
    if "views" in b:
        lines += ["", f"## The browser (layer {b['layer']}, feature {b['feature']})", ""]
        lines += [
            "| view | parquet bytes | requests | most in flight | seconds | status |",
            "|---|---|---|---|---|---|",
        ]
        for name, v in b["views"].items():
            lines.append(
                f"| {name} | {v['bytes']:,} | {v['requests']} | {v['max_in_flight']} |"
                f" {v['seconds']:.1f} | {v['status']}{': ' + v['error'] if v.get('error') else ''} |"
            )
        search = b["views"]["token search"]
        lines.append("")
        lines.append(f"Search for {search['query']!r}: {search['features_found']} features found.")
    lines.append("")
    return lines


def context(shape: Shape, work: Path, tokens: int, threads: int) -> dict:
    """What every stage reads: the config and the sizes the projections use."""
    from loupe.config import Config

    raw = raw_config(shape, work, tokens)
    sae = raw["sae"]
    maxact = Config.from_dict(raw).maxact
    return {
        "config": raw,
        "work": str(work),
        "threads": threads,
        "logit_slice": shape.logit_slice,
        "features": sae["num_latents"] or shape.model.hidden_size * sae["expansion_factor"],
        "interval_slots": maxact.intervals * maxact.per_interval,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="the demo's width: checks the code paths")
    p.add_argument("--tokens", type=int, help="sample-split tokens (default: the shape's)")
    p.add_argument("--threads", type=int, default=2, help="threads per stage")
    p.add_argument("--name", help="of the result files (default: rehearsal[-quick])")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    tmp = Path(tempfile.gettempdir()) / f"loupe-rehearsal-{os.getuid()}"
    p.add_argument("--work-dir", type=Path, default=tmp, help="model, SAEs, outputs (kept)")
    p.add_argument(
        "--render", action="store_true", help="only rewrite the .md from the results .json"
    )
    args = p.parse_args(argv)
    from benchmarks.bench import write_results

    name = args.name or "rehearsal" + ("-quick" if args.quick else "")
    if args.render:
        result = json.loads((args.out_dir / f"{name}.json").read_text())
        shape = QUICK if args.quick else FULL
        work = args.work_dir / shape.name
        if (work / "hub").is_dir():  # the run's files: the projections again, from this code
            ctx = context(shape, work, result["meta"]["sample_tokens"], result["meta"]["threads"])
            ms = result["stages"]
            result["repo"] = repo_projection(ms[STAGE]["repo"], ms, ctx, shape)
            result["projection"] = projections(ctx, ms, shape)
        write_results(args.out_dir, name, result, render(result))
        return 0

    shape = QUICK if args.quick else FULL
    tokens = args.tokens or shape.sample_tokens
    work = args.work_dir / shape.name
    started, load_before = time.time(), [round(x, 1) for x in os.getloadavg()]
    built = fixtures(shape, work)
    ctx = context(shape, work, tokens, args.threads)
    raw, features = ctx["config"], ctx["features"]
    spawn = multiprocessing.get_context("spawn")
    ms = {}
    for i, (label, stage_name, kwargs) in enumerate(plan(ctx), 1):
        with spawn.Pool(1) as pool:
            ms[label] = pool.apply(run_stage, (stage_name, ctx, kwargs))
        m = ms[label]
        print(f"[{i}] {label}: {m['wall_s']:.1f} s, peak {m['peak_rss_mb']:,.0f} MB", flush=True)
    repo = repo_projection(ms[STAGE]["repo"], ms, ctx, shape)
    flags = [("--quick", args.quick), (f"--tokens {tokens}", args.tokens is not None)]
    flags.append((f"--threads {args.threads}", args.threads != 2))
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    meta = {
        "command": " ".join(["python benchmarks/rehearse.py", *(f for f, on in flags if on)]),
        "machine": f"{os.cpu_count()} cores, {memory_gb:.0f} GB",
        "load_before": load_before,
        "load_after": [round(x, 1) for x in os.getloadavg()],
        "wall_s": time.time() - started,
        "threads": args.threads,
        "shape": shape.name,
        "stages": list(ms),  # the running order (the JSON's keys are sorted)
        "model": f"{shape.model.num_hidden_layers} layers, hidden {shape.model.hidden_size},"
        f" vocabulary {shape.model.vocab_size:,} ({built['model_mb']:,.0f} MB fp32)",
        "features": features,
        "d_in": shape.model.hidden_size,
        "k": raw["sae"]["k"],
        "sae_mb": built["sae_mb"],
        "sample_tokens": raw["tokens"]["sample_tokens"],
        "eval_tokens": shape.eval_tokens,
        "ctx_len": shape.ctx_len,
        "logit_slice": shape.logit_slice,
        "explain_features": shape.explain_features,
        "score_features": shape.score_features,
    }
    result = {
        "meta": meta,
        "stages": ms,
        "projection": projections(ctx, ms, shape),
        "repo": repo,
    }
    write_results(args.out_dir, name, result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
