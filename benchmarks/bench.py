#!/usr/bin/env python
"""What each loupe stage costs per token on this machine, measured through the functions the
rules call, beside sparsify's Trainer used directly, and the full gemma-loupe build's cost on
one H100 projected from that (flops.py). Method and limits: benchmarks/README.md.

    python benchmarks/bench.py           # the real SAE width (d_in 1536, 49,152 latents, k 100)
    python benchmarks/bench.py --quick   # tiny shapes: checks the code paths

Each measurement runs in its own process: it times its floors (the model forward through the
layers it runs, the SAE encoder matmul), calls its stage function once untimed (what a process
pays once: imports, caches), then at two sizes. Time difference over token difference is the
cost per token: what every call pays (loading the model, building the trainer, writing files)
cancels. The clock is the process's CPU time on a CPU, synchronized wall time on a GPU.

To add a measurement: a function `name(ctx, **kwargs)` returning stage(ctx, run, ...), and a line
in plan(). Writes benchmarks/results/<name>.json (every number) and .md (the tables)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gzip
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `benchmarks.flops`, wherever this runs from

from loupe.demo import TinyModelSpec  # noqa: E402

CTX_LEN = 64  # short rows keep the real SAE width affordable on a CPU; flops.py counts ctx 1024


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    model: TinyModelSpec  # random weights: the speed does not depend on their values
    sae: dict  # over config.yaml's sae section
    rows: int  # rows of CTX_LEN tokens per batch
    batches: tuple[int, int]  # the two sizes every stage runs at
    tokenize_tokens: tuple[int, int]  # the two training-split sizes tokenization runs at
    documents: int | None  # of the demo corpus (None: all)
    logit_vocab: tuple[int, int]  # the two unembedding sizes top logits run against


# E2B's hidden size and head layout (8 heads, 1 KV head, head_dim 256 / global 512, MLP 6144,
# per-layer inputs 256, window 512) on 8 layers (3 and 7 full attention) and a 2048-token
# vocabulary, to fit a 2-core, 24 GB machine (8 SAEs in training take 14 GB); no KV sharing
# (a shared layer needs a full-attention layer before it).
FULL = Shape(
    "e2b-width",
    TinyModelSpec(
        hidden_size=1536,
        intermediate_size=6144,
        num_hidden_layers=8,
        num_kv_shared_layers=0,
        num_attention_heads=8,
        head_dim=256,
        global_head_dim=512,
        hidden_size_per_layer_input=256,
        sliding_window=512,
        full_attention_every=4,
        pretrain_steps=0,
    ),
    sae={},
    rows=16,  # 1,024 tokens: at 64, the SAE's fixed costs per step dominate
    batches=(1, 3),
    tokenize_tokens=(131072, 655360),
    documents=None,
    logit_vocab=(2048, 6144),
)
QUICK = Shape(
    "quick",
    TinyModelSpec(num_hidden_layers=3, num_kv_shared_layers=0, pretrain_steps=0),
    sae={"expansion_factor": 8, "k": 8},
    rows=16,
    batches=(1, 16),  # tiny batches: many, so the difference stands above the noise
    tokenize_tokens=(16384, 196608),
    documents=2000,
    logit_vocab=(2048, 32768),
)


# The result labels, written once: the keys of a run's "measurements" and its table rows
# (filled in with the layer and the layer count), and the "side_by_side" keys the projection
# reads back. Changing one changes the results files' format.
LABELS = {
    "tokenize": "tokenize",
    "train alone": "train: loupe, layer {layer}",
    "train group": "train: loupe, all {n} layers in one job",
    "sparsify layer 0": "train: sparsify Trainer, layer 0",
    "sparsify all": "train: sparsify Trainer, all {n} layers",
    "maxact": "maxact: loupe, layer 0",
    "sampling pass": "sampling pass: loupe, layer 0",
    "top logits": "top logits (tokens: of the vocabulary)",
    "evaluate": "evaluate: loupe, layer 0",
}
SIDE = {
    "b alone": "b: train alone (mean of the per-layer jobs)",
    "b group": "b: train in one job",
    "b optimizer": "b: optimizer step per token at {tokens:,} tokens per step",
    "b sample": "b: sample",
    "b eval": "b: eval",
    "MB per extra SAE": "MB per extra SAE in training",
    "top logits GFLOP/s": "top logits: GFLOP/s",
}


def label(key: str, **fields) -> str:
    """A measurement's label (LABELS[key] filled in)."""
    return LABELS[key].format(**fields)


def plan(shape: Shape) -> list[tuple[str, str, dict]]:
    """(label, measurement, kwargs) in running order: maxact, the sampling pass and top logits
    read layer 0's SAE, evaluate its feature stats."""
    n = shape.model.num_hidden_layers
    every = list(range(n))
    return [
        (label("tokenize"), "tokenize", {}),
        (label("train alone", layer=0), "train_loupe", {"layers": [0], "optimizer_step": True}),
        *((label("train alone", layer=i), "train_loupe", {"layers": [i]}) for i in every[1:]),
        (label("train group", n=n), "train_loupe", {"layers": every}),
        (label("sparsify layer 0"), "train_sparsify", {"layers": [0]}),
        (label("sparsify all", n=n), "train_sparsify", {"layers": every}),
        (label("maxact"), "maxact", {"layer": 0}),
        (label("sampling pass"), "sampling_pass", {"layer": 0}),
        (label("top logits"), "feature_logits", {"layer": 0}),
        (label("evaluate"), "evaluate", {"layer": 0}),
    ]


def trained(ctx: dict, layer: int) -> Path:
    """The SAE folder train_loupe's job for `layer` alone wrote (maxact and later read it)."""
    return Path(ctx["work"]) / f"train-{layer}" / f"sae-{layer}"


# --- inside a measurement's process -------------------------------------------------------------


def now(ctx: dict) -> float:
    if ctx["clock"] == "cpu":
        return time.process_time()  # this process's work, whatever share of the cores it gets
    import torch

    torch.cuda.synchronize()
    return time.perf_counter()


def config_of(ctx: dict, **sections):
    """The typed config of the run, with keys of some sections replaced."""
    from loupe.config import Config

    raw = json.loads(json.dumps(ctx["config"]))
    for name, keys in sections.items():
        raw[name].update(keys)
    return Config.from_dict(raw)


def split(ctx: dict, batches: int, name: str) -> Path:
    """A file of the token splits of `batches` batches (train, sample, eval, manifest.json)."""
    return Path(ctx["splits"][str(batches)]) / name


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def per_token(ctx: dict, fn, tokens: int, runs: int = 3) -> float:
    """Median seconds per token of fn() after a warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        t0 = now(ctx)
        fn()
        times.append(now(ctx) - t0)
    return statistics.median(times) / tokens


def floor(ctx: dict, prefixes: set[int]) -> dict:
    """Seconds per token of the forward through each number of layers in `prefixes` and of the
    SAE encoder matmul (x @ W_enc.T + b), on one batch of the training split (a matmul's speed
    per token depends on its rows)."""
    import torch

    from loupe.gpus import select_device
    from loupe.model import capture, load_model, truncate_after
    from loupe.tokens import open_split

    config = config_of(ctx)
    device, model_config = select_device(config.device), config.model
    torch.set_num_threads(ctx["threads"])
    model = load_model(model_config.name, device, model_config.revision, model_config.dtype)
    rows = open_split(split(ctx, ctx["batches"][1], "train.npy"))[: ctx["rows"]]
    ids = torch.from_numpy(rows.astype(np.int64)).to(device)
    out = {}
    for n in sorted(prefixes, reverse=True):  # cut the model shorter each time
        truncate_after(model, hookpoint := model_config.hookpoint_of(n - 1))
        out[f"forward_{n}"] = per_token(
            ctx, lambda h=hookpoint: capture(model, h, ids), ids.numel()
        )
    x = capture(model, model_config.hookpoint_of(0), ids).float().flatten(0, 1)
    latents = config.sae.num_latents or x.shape[1] * config.sae.expansion_factor
    w, b = torch.randn(latents, x.shape[1], device=device), torch.zeros(latents, device=device)
    with torch.inference_mode():
        out["encode"] = per_token(ctx, lambda: torch.nn.functional.linear(x, w, b), ids.numel())
    return out


def stage(ctx: dict, run, layers_run: int = 0, saes=1, passes=1, also=(), sizes=None) -> dict:
    """Floors (forward through `layers_run` and the `also` layer counts; none if 0), an untimed
    run at the smaller size (what a process pays once: imports, caches), then run(size) ->
    {"tokens": n, ...} at both sizes: seconds per token between them, the last run's extras."""
    out = {"layers_run": layers_run, "saes": saes, "passes": passes, "tokens": [], "seconds": []}
    if layers_run:
        out["floor"] = floor(ctx, {layers_run, *also})
    sizes = sizes or ctx["batches"]
    run(sizes[0])
    for _ in range(2):  # at small sizes noise can invert the pair once: measure it again
        out["seconds"], out["tokens"] = [], []
        for size in sizes:
            t0 = now(ctx)
            result = run(size)
            out["seconds"].append(now(ctx) - t0)
            out["tokens"].append(result.pop("tokens"))
            out.update(result)
        (s0, s1), (t0, t1) = out["seconds"], out["tokens"]
        if s1 > s0 and t1 > t0:
            break
    else:
        raise RuntimeError(f"{t0} tokens took {s0:.3g}s, {t1} took {s1:.3g}s: use larger sizes")
    return {**out, "seconds_per_token": (s1 - s0) / (t1 - t0)}


def tokenize(ctx: dict) -> dict:
    """loupe.tokens.tokenize at two training-split sizes; floor: the tokenizer alone, batched
    as tokenize batches, on the documents the larger run read."""
    from loupe.tokens import load_tokenizer
    from loupe.tokens import tokenize as tokenize_splits

    def run(train_tokens: int) -> dict:
        sizes = {"train_tokens": train_tokens, "sample_tokens": CTX_LEN, "eval_tokens": CTX_LEN}
        out = fresh(Path(ctx["work"]) / "tokenize")
        manifest = tokenize_splits(config_of(ctx, tokens=sizes), out, ctx["threads"])
        return {"tokens": sum(manifest["tokens"].values()), "docs": manifest["documents_read"]}

    out = stage(ctx, run, sizes=ctx["tokenize_tokens"])
    config = config_of(ctx)
    tok, step = load_tokenizer(config.model.tokenizer_name), config.tokens.doc_batch_size
    with gzip.open(config.dataset.path, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in itertools.islice(f, out["docs"])]

    def encode() -> int:
        kw = dict(add_special_tokens=False, return_attention_mask=False)
        batches = (tok(texts[i : i + step], **kw)["input_ids"] for i in range(0, len(texts), step))
        return sum(len(ids) for batch in batches for ids in batch)

    return {**out, "floor": per_token(ctx, encode, encode())}


def train_loupe(ctx: dict, layers: list[int], optimizer_step: bool = False) -> dict:
    """loupe.train.train_group, what every training rule runs: one layer's job, or a layer
    group's on one forward cut after its deepest layer. One optimizer step of one batch, then
    one of several batches (grad_acc_steps): the difference holds batches, no optimizer step.
    optimizer_step: then the larger size again in one-batch steps; the extra time over the
    extra steps is what a step costs beyond its batches (`optimizer_step_s`, all SAEs)."""
    from loupe.train import train_group

    name = f"train-{layers[0]}" if len(layers) == 1 else f"train-{layers[0]}-to-{layers[-1]}"

    def run(batches: int, steps: int = 1) -> dict:
        out = fresh(Path(ctx["work"]) / name)
        config = config_of(ctx, train={"grad_acc_steps": batches // steps})
        tokens, manifest = split(ctx, batches, "train.npy"), split(ctx, batches, "manifest.json")
        saes = [out / f"sae-{layer}" for layer in layers]
        s = train_group(config, layers, tokens, manifest, saes, out / "checkpoint", ctx["threads"])
        shutil.rmtree(out / "checkpoint")  # GBs at the real width
        return {"tokens": s["tokens"], "final_fvu": [sae["final_fvu"] for sae in s["saes"]]}

    out = stage(ctx, run, layers[-1] + 1, saes=len(layers))
    if optimizer_step:
        batches = ctx["batches"][1]
        t0 = now(ctx)
        run(batches, steps=batches)
        out["optimizer_step_s"] = (now(ctx) - t0 - out["seconds"][1]) / (batches - 1)
    return out


def train_sparsify(ctx: dict, layers: list[int]) -> dict:
    """sparsify's Trainer used directly: AutoModel (every layer runs), a MemmapDataset, the same
    TrainConfig with hookpoints `layers`; sized as train_loupe."""
    import torch
    from transformers import AutoModel

    from loupe.gpus import select_device
    from loupe.model import import_sparsify, model_dtype
    from loupe.train import train_config

    sparsify, n = import_sparsify(), len(ctx["config"]["model"]["layers"])

    def run(batches: int) -> dict:
        config = config_of(ctx, train={"grad_acc_steps": batches})
        device = select_device(config.device)
        torch.set_num_threads(ctx["threads"])
        dtype = model_dtype(device, config.model.dtype)
        model = AutoModel.from_pretrained(config.model.name, dtype=dtype).to(device)
        cfg = train_config(config, layers[0], fresh(Path(ctx["work"]) / "sparsify"))
        cfg.hookpoints = [config.model.hookpoint_of(i) for i in layers]
        tokens = Path(ctx["work"]) / "train.bin"  # sparsify reads raw token files
        np.load(split(ctx, batches, "train.npy")).tofile(tokens)
        data = sparsify.data.MemmapDataset(str(tokens), CTX_LEN, dtype=np.uint32)
        sparsify.Trainer(cfg, data, model).fit()
        return {"tokens": len(data) * CTX_LEN}

    return stage(ctx, run, n, saes=len(layers), also={layers[0] + 1})


def maxact(ctx: dict, layer: int) -> dict:
    """loupe.maxact.sample_layer with train_loupe's SAE. The difference includes writing the
    examples the extra rows admit (`examples`, of the larger run)."""
    from loupe.maxact import sample_layer

    config, sae = config_of(ctx), trained(ctx, layer)

    def run(batches: int) -> dict:
        out = fresh(Path(ctx["work"]) / f"maxact-{layer}-{batches}")
        tokens, manifest = split(ctx, batches, "sample.npy"), split(ctx, batches, "manifest.json")
        names = ("examples", "intervals", "stats", "logits")
        files = {name: out / f"{name}.parquet" for name in names}
        s = sample_layer(config, layer, sae, tokens, manifest, **files, threads=ctx["threads"])
        return {"tokens": s["tokens"], "examples": s["examples"], "logit_s": s["logit_seconds"]}

    return stage(ctx, run, layer + 1)


# The sampling pass with each addition of the feature dashboards switched off: the samplers of
# loupe.maxact that a variant replaces by one that keeps nothing (in the benchmark's process).
SAMPLERS = {
    "all": (),
    "no histogram": ("ActivationHistogram",),
    "no interval examples": ("IntervalExamples",),
    "neither": ("ActivationHistogram", "IntervalExamples"),
}


class KeepsNothing:
    """A sampler switched off: built and updated as stream builds and updates any, keeps nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def update(self, *args) -> None:
        pass


@contextlib.contextmanager
def samplers_off(names: tuple[str, ...]):
    """loupe.maxact's samplers `names` replaced by KeepsNothing while inside."""
    import loupe.maxact

    real = {name: getattr(loupe.maxact, name) for name in names}
    try:
        for name in names:
            setattr(loupe.maxact, name, KeepsNothing)
        yield
    finally:
        for name, cls in real.items():
            setattr(loupe.maxact, name, cls)


def sampling_pass(ctx: dict, layer: int, repeats: int = 3) -> dict:
    """loupe.maxact.stream, the sampling pass alone, with every sampler and with the histogram,
    the interval examples or both off: every variant at both sizes, `repeats` times, interleaved
    in one process so that they share its state and its drift; per variant the medians' cost
    per token (`variants`). An addition's share can sit within that noise, so each one's own
    update is also timed alone on the pass's real batches (`updates`, seconds per token), and
    the interval buffers' allocation once per pass (`interval_allocation_s`). The table row is
    the full pass."""
    import torch

    from loupe.maxact import encode_batch, stream
    from loupe.model import open_layer
    from loupe.samplers import ActivationHistogram, Batch, IntervalExamples, TopExamples
    from loupe.tokens import open_split, read_tokens_manifest

    config, sizes = config_of(ctx), ctx["batches"]
    manifests = {size: split(ctx, size, "manifest.json") for size in sizes}
    job = open_layer(
        config, layer, ctx["threads"], sae=trained(ctx, layer), manifest=manifests[sizes[0]]
    )
    rows = {
        size: open_split(split(ctx, size, "sample.npy"), read_tokens_manifest(manifests[size]))
        for size in sizes
    }

    def run(size: int, off: tuple[str, ...] = ()) -> float:
        with samplers_off(off):
            t0 = now(ctx)
            stream(job.model, job.sae, job.hookpoint, rows[size], config.maxact, job.special_ids)
            return now(ctx) - t0

    run(sizes[0])  # what a process pays once
    times = {(name, size): [] for name in SAMPLERS for size in sizes}
    for _ in range(repeats):
        for size in sizes:
            for name, off in SAMPLERS.items():
                times[name, size].append(run(size, off))
    (t0, t1), variants = (rows[size].size for size in sizes), {}
    for name in SAMPLERS:
        s0, s1 = (statistics.median(times[name, size]) for size in sizes)
        variants[name] = {"seconds": [s0, s1], "seconds_per_token": (s1 - s0) / (t1 - t0)}

    maxact_config, num, device = config.maxact, job.sae.num_latents, job.sae.device
    special = torch.tensor(job.special_ids, dtype=torch.int64, device=device)
    updates = {"histogram": 0.0, "interval examples": 0.0}
    with torch.inference_mode():
        batches, top = [], TopExamples(num, maxact_config, device)
        for start in range(0, len(rows[sizes[1]]), maxact_config.batch_size):
            ids = torch.from_numpy(
                rows[sizes[1]][start : start + maxact_config.batch_size].astype(np.int64)
            )
            acts, indices, _ = encode_batch(
                job.model, job.sae, job.hookpoint, ids.to(device), special
            )
            batches.append(Batch(acts, indices, start, num))
            top.update(batches[-1])  # computes the peaks the interval examples share, as in stream
        t = now(ctx)
        intervals = IntervalExamples(num, maxact_config, device)
        allocation = now(ctx) - t
        histogram = ActivationHistogram(num, device)
        for _ in range(repeats):
            for batch in batches:
                t = now(ctx)
                histogram.update(batch.acts, batch.indices)
                updates["histogram"] += now(ctx) - t
                t = now(ctx)
                intervals.update(batch)
                updates["interval examples"] += now(ctx) - t
    return {
        "layers_run": layer + 1,
        "saes": 1,
        "passes": 1,
        "floor": floor(ctx, {layer + 1}),
        "tokens": [t0, t1],
        "seconds": variants["all"]["seconds"],
        "seconds_per_token": variants["all"]["seconds_per_token"],
        "variants": variants,
        "updates": {name: s / (repeats * t1) for name, s in updates.items()},
        "interval_allocation_s": allocation,
    }


def feature_logits(ctx: dict, layer: int) -> dict:
    """loupe.logits.top_logits of train_loupe's SAE (its real width) against random
    unembeddings of two vocabulary sizes: seconds per vocabulary token, from which the time at
    Gemma's 262,144 tokens follows (the product is linear in the vocabulary)."""
    import torch

    from loupe.gpus import select_device
    from loupe.logits import top_logits
    from loupe.model import load_sae

    config = config_of(ctx)
    device = select_device(config.device)
    torch.set_num_threads(ctx["threads"])
    sae = load_sae(trained(ctx, layer), device)
    generator = torch.Generator().manual_seed(0)
    unembed = {
        vocab: torch.randn(vocab, sae.d_in, generator=generator).to(device)
        for vocab in ctx["logit_vocab"]
    }

    def run(vocab: int) -> dict:
        top_logits(sae.W_dec, unembed[vocab], k=config.maxact.top_logits)
        return {"tokens": vocab}

    out = stage(ctx, run, sizes=ctx["logit_vocab"])
    num, d = sae.W_dec.shape
    return {
        **out,
        "floor": None,
        "features": num,
        "flops_per_s": 2 * num * d / out["seconds_per_token"],
    }


def evaluate(ctx: dict, layer: int) -> dict:
    """loupe.evaluate.evaluate_layer: per batch three full forwards (clean, SAE-spliced,
    zero-ablated) and the next-token losses."""
    from loupe.evaluate import evaluate_layer

    config, work = config_of(ctx), Path(ctx["work"])
    sae, out = trained(ctx, layer), work / "eval.json"
    stats = work / f"maxact-{layer}-{ctx['batches'][1]}" / "stats.parquet"

    def run(batches: int) -> dict:
        tokens, manifest = split(ctx, batches, "eval.npy"), split(ctx, batches, "manifest.json")
        r = evaluate_layer(config, layer, sae, tokens, manifest, stats, out, ctx["threads"])
        return {"tokens": r["rows"] * CTX_LEN, "fvu": r["fvu"]}

    return stage(ctx, run, len(config.model.layers), passes=3)


MEASUREMENTS = {
    f.__name__: f
    for f in (
        tokenize,
        train_loupe,
        train_sparsify,
        maxact,
        sampling_pass,
        feature_logits,
        evaluate,
    )
}


def child(spec: dict) -> dict:
    """Run one measurement; with its peak memory (Linux: VmHWM, reset first)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # in one process for all: reset the peak
    except OSError:
        pass
    result = MEASUREMENTS[spec["measurement"]](spec["ctx"], **spec["kwargs"])
    status = Path("/proc/self/status").read_text().splitlines()
    peak = next((int(ln.split()[1]) / 1024 for ln in status if ln.startswith("VmHWM:")), None)
    return {**result, "peak_rss_mb": peak}


# --- the run ------------------------------------------------------------------------------------


def fixtures(shape: Shape, work: Path, device: str, threads: int = 1) -> dict:
    """Corpus, model and token splits in the work folder (kept while unchanged), and what every
    measurement reads (`ctx`): the config, built on config.yaml's SAE and stage settings."""
    import torch
    import yaml

    from loupe.atomic import atomic_path
    from loupe.config import Config
    from loupe.demo import build_tiny_model, harvest_documents
    from loupe.tokens import tokenize as tokenize_splits

    root = work / shape.name
    corpus, model, key = root / "corpus.jsonl.gz", root / "model", root / "model.json"
    if not corpus.exists():
        with atomic_path(corpus) as tmp, gzip.open(tmp, "wt", encoding="utf-8") as f:
            for doc in itertools.islice(harvest_documents(), shape.documents):
                f.write(json.dumps(doc) + "\n")
    spec = json.dumps(dataclasses.asdict(shape.model), sort_keys=True)
    if not key.exists() or key.read_text() != spec:
        build_tiny_model(model, corpus, shape.model)
        key.write_text(spec)
    real = yaml.safe_load((REPO / "config.yaml").read_text())
    layers = list(range(shape.model.num_hidden_layers))
    raw = {
        "model": {"name": str(model), "hookpoint": real["model"]["hookpoint"], "layers": layers},
        "device": device,
        "dataset": {"path": str(corpus), "text_column": "text"},
        "tokens": {**real["tokens"], "ctx_len": CTX_LEN},
        "sae": {**real["sae"], **shape.sae},
        "train": {**real["train"], "batch_size": shape.rows, "save_every": 10**9, "log_every": 1},
        "maxact": {**real["maxact"], "batch_size": shape.rows},
        # The stage as it ran before the ladder and transfer (measured apart, with their own
        # flag): config.yaml's ladder is wider than small shapes, its chat model not offline.
        "evaluate": {
            **real["evaluate"],
            "batch_size": shape.rows,
            "k_ladder": [],
            "transfer_models": [],
        },
    }
    splits = {}
    for batches in shape.batches:  # train, sample and eval splits of that many batches each
        size = batches * shape.rows * CTX_LEN
        raw["tokens"].update(train_tokens=size, sample_tokens=size, eval_tokens=size)
        splits[str(batches)] = str(root / f"tokens-{batches}")
        tokenize_splits(Config.from_dict(raw), Path(splits[str(batches)]))
    # Each measurement picks (and locks) its GPU; this process never does.
    clock = "wall" if device != "cpu" and torch.cuda.is_available() else "cpu"
    return {
        "config": raw,
        "work": str(root),
        "splits": splits,
        "clock": clock,
        "threads": threads,
        "rows": shape.rows,
        "batches": shape.batches,
        "tokenize_tokens": shape.tokenize_tokens,
        "logit_vocab": shape.logit_vocab,
    }


def measure(label: str, name: str, kwargs: dict, ctx: dict, in_process: bool) -> dict:
    """One measurement, in a process of its own (log in <work>/logs) or in this one."""
    spec = {"measurement": name, "kwargs": kwargs, "ctx": ctx}
    if in_process:
        return child(spec)
    logs = Path(ctx["work"]) / "logs"
    logs.mkdir(exist_ok=True)
    stem = logs / "".join(c if c.isalnum() else "-" for c in label)
    spec_file, out, log = (Path(f"{stem}{ext}") for ext in (".json", ".result.json", ".log"))
    spec_file.write_text(json.dumps(spec))
    out.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(ctx["threads"]), "TQDM_DISABLE": "1"}
    with open(log, "w") as f:
        cmd = [sys.executable, __file__, "--child", str(spec_file), str(out)]
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise SystemExit(f"{label} failed (exit {code}); the end of {log}:\n{tail}")
    return json.loads(out.read_text())


def derive(m: dict) -> dict:
    """Rates and floor ratios: `b` is the SAE work per SAE and token beyond the forward floor
    (passes x the forward through layers_run), in encoder matmuls."""
    spt, f = m["seconds_per_token"], m["floor"]
    if f is None:  # top logits: no floor beyond their own matmul
        return {"tokens_per_s": 1 / spt}
    if not isinstance(f, dict):  # tokenization: the tokenizer alone
        return {"tokens_per_s": 1 / spt, "x_floor": spt / f}
    forward = m["passes"] * f[f"forward_{m['layers_run']}"]
    return {
        "tokens_per_s": 1 / spt,
        "layer_tokens_per_s": m["saes"] / spt,
        "x_floor": spt / (forward + m["saes"] * f["encode"]),
        "b": (spt - forward) / (m["saes"] * f["encode"]),
    }


def tokens_per_step() -> int:
    """Tokens per optimizer step of config.yaml's training (the real build's)."""
    import yaml

    real = yaml.safe_load((REPO / "config.yaml").read_text())
    return real["train"]["batch_size"] * real["train"]["grad_acc_steps"] * real["tokens"]["ctx_len"]


def compare(ms: dict, n: int) -> dict:
    """The side-by-side figures of plan()'s measurements."""
    alone = [ms[label("train alone", layer=i)] for i in range(n)]
    group = ms[label("train group", n=n)]
    plain = ms[label("sparsify layer 0")]
    every = ms[label("sparsify all", n=n)]
    # n per-layer jobs train n layer-tokens per token in the sum of their times.
    per_layer = n / sum(m["seconds_per_token"] for m in alone)
    first, last = alone[0], alone[-1]
    b_alone = statistics.mean(m["b"] for m in alone)
    sampling = ms[label("sampling pass")]
    cost = {name: v["seconds_per_token"] for name, v in sampling["variants"].items()}
    updates = sampling["updates"]
    return {
        f"per-layer jobs, layers 0-{n - 1} (layer-tokens/s)": per_layer,
        f"one loupe job, all {n} layers (layer-tokens/s)": group["layer_tokens_per_s"],
        f"sparsify Trainer, all {n} hookpoints (layer-tokens/s)": every["layer_tokens_per_s"],
        "one loupe job over per-layer jobs": group["layer_tokens_per_s"] / per_layer,
        "one loupe job over sparsify Trainer, every hookpoint": group["layer_tokens_per_s"]
        / every["layer_tokens_per_s"],
        "loupe over sparsify Trainer, layer 0 (tokens/s)": plain["seconds_per_token"]
        / first["seconds_per_token"],
        f"loupe at layer {n - 1} over sparsify Trainer at layer 0 (tokens/s; both run every "
        "layer)": plain["seconds_per_token"] / last["seconds_per_token"],
        "truncation at layer 0: ms saved per token": 1e3
        * (plain["seconds_per_token"] - first["seconds_per_token"]),
        "truncation at layer 0: ms the floors predict": 1e3
        * (plain["floor"][f"forward_{n}"] - plain["floor"]["forward_1"]),
        "SAE work per SAE, all layers in one job over one alone (b)": group["b"] / b_alone,
        # Both run the forward through every layer: the difference is the extra SAEs.
        SIDE["MB per extra SAE"]: (group["peak_rss_mb"] - last["peak_rss_mb"]) / (n - 1),
        SIDE["b alone"]: b_alone,
        SIDE["b group"]: group["b"],
        "optimizer step, s per SAE": first["optimizer_step_s"],
        SIDE["b optimizer"].format(tokens=tokens_per_step()): first["optimizer_step_s"]
        / tokens_per_step()
        / first["floor"]["encode"],
        SIDE["b sample"]: ms[label("maxact")]["b"],
        SIDE["b eval"]: ms[label("evaluate")]["b"],
        "sampling pass: histogram update, share of the full pass (timed alone)": updates[
            "histogram"
        ]
        / cost["all"],
        "sampling pass: interval examples update, share of the full pass (timed alone)": updates[
            "interval examples"
        ]
        / cost["all"],
        "sampling pass: interval examples, s to allocate per pass": sampling[
            "interval_allocation_s"
        ],
        "sampling pass: without both additions, over the full pass (end to end)": cost["neither"]
        / cost["all"],
        SIDE["top logits GFLOP/s"]: ms[label("top logits")]["flops_per_s"] / 1e9,
    }


def num(x) -> str:
    return "" if x is None else f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def render(meta: dict, ms: dict, cmp: dict, p: dict) -> str:
    lines = [
        f"# loupe benchmarks: {meta['name']}",
        "",
        f"`{meta['command']}`: {meta['wall_s'] / 60:.0f} min on {meta['machine']}, load average "
        f"{meta['load_before']} before and {meta['load_after']} after. Clock: {meta['clock']} "
        f"seconds, {meta['threads']} thread(s). Shape `{meta['shape']['name']}` "
        f"(benchmarks/README.md). {meta['versions']}.",
        "",
        "| measurement | tokens/s | layer-tokens/s | x floor | b | peak RSS MB | runs (tokens: s) |"
        "\n|---|---|---|---|---|---|---|",
    ]
    for row, m in ms.items():
        runs = ", ".join(f"{t:,}: {s:.3g}" for t, s in zip(m["tokens"], m["seconds"], strict=True))
        keys = ("tokens_per_s", "layer_tokens_per_s", "x_floor", "b", "peak_rss_mb")
        lines.append(f"| {row} | {' | '.join(num(m.get(k)) for k in keys)} | {runs} |")
    lines += ["", "## Side by side", "", *(f"- {k}: {num(v)}" for k, v in cmp.items())]
    sampling = ms[label("sampling pass")]
    lines += [
        "",
        "## The sampling pass by addition (loupe.maxact.stream, layer 0)",
        "",
        "| samplers | tokens/s | cost per token, x the full pass's |",
        "|---|---|---|",
        *(
            f"| {name} | {num(1 / v['seconds_per_token'])} | "
            f"{v['seconds_per_token'] / sampling['seconds_per_token']:.3f} |"
            for name, v in sampling["variants"].items()
        ),
        *(
            f"| {name} update alone | {num(1 / spt)} | {spt / sampling['seconds_per_token']:.3f} |"
            for name, spt in sampling["updates"].items()
        ),
    ]
    lines += ["", "## Projected cost of the full gemma-loupe build on one H100", ""]
    if meta["shape"]["name"] == QUICK.name:
        lines += ["**A quick run: its shapes are far too small for this to mean anything.**", ""]
    rates, f, mem = p["rates_tflops"], p["forward_gflops_per_token"], p["memory_gb"]
    lines += [
        f"At {rates['model']:.0f} TFLOP/s for the bf16 model, {rates['sae']:.0f} for the SAE's "
        f"matmul (bf16 autocast) and {rates['fp32']:.0f} for fp32 top logits (assumed); per token at ctx 1024: forward {f['full']:.2f} GFLOP (through layer 17: "
        f"{f['layer_17_prefix']:.2f}), LM head {f['lm_head']:.2f}, SAE encoder "
        f"{p['sae_mflops_per_token']['encode']:.0f} MFLOP. Truncation speeds up one layer's "
        "training job "
        + ", ".join(f"{v:.2f}x at layer {k}" for k, v in p["truncation_speedup"].items())
        + ".",
        "",
        "| stage | plan | GPU-hours | x per-layer | x floor | whole build |",
        "|---|---|---|---|---|---|",
        *(
            f"| train | {k} | {num(v)} | {p['train_x_per_layer'][k]:.2f} | "
            f"{p['train_x_floor'][k]:.2f} | {num(p['total_gpu_hours'][k])} |"
            for k, v in p["train_gpu_hours"].items()
        ),
        f"| max-activation sampling | one layer per job | {num(p['sample_gpu_hours'])} | | | |",
        f"| evaluate | one layer per job | {num(p['eval_gpu_hours'])} | | | |",
        "",
        f"SAE factors (encoder matmuls per SAE and token): alone {num(p['b']['alone'])}, in one "
        f"job {num(p['b']['group'])}, optimizer step {num(p['b']['optimizer'])} (added to both), "
        f"sampling {num(p['b']['sample'])}, evaluation {num(p['b']['eval'])}. Top logits per "
        f"layer: {p['logits_tflop_per_layer']:.1f} TFLOP, {p['logits_gpu_seconds_per_layer']:.1f} "
        f"GPU-seconds, {p['logits_cpu_hours_per_layer']:.2f} hours on this CPU at the measured "
        "rate.",
        "",
        f"Tokenization: {num(p['tokenize_cpu_hours'])} CPU-hours (one thread, the demo's "
        f"tokenizer). Memory: the model {mem['model']:.1f} GB (bf16) + {mem['per_sae_train']:.2f} "
        f"GB per SAE in training + 8 GB working set: at most {p['largest_group']} SAEs per job "
        f"on an {mem['gpu']:.0f} GB H100.",
    ]
    return "\n".join(lines) + "\n"


# --- the evaluation additions (issue 24): ladder, transfer, all-layer splice -----------------

# gemma-loupe's evaluation (config.yaml): 35 layers, max_tokens 1,048,576, the ladder's k other
# than the trained 100, one transfer model, spliced_max_tokens 131,072; and its per-token
# FLOPs at ctx 1024 (flops.py's counts, printed in every full run's projection): forward 3.90
# GFLOP, LM head 0.81. The evaluate stage itself: 0.485 H100-hours (2026-11-30-vm.md).
GEMMA_EVAL = dict(layers=35, max_tokens=1_048_576, ladder_extra=4, transfer_models=1)
GEMMA_SPLICE_TOKENS = 131_072
GEMMA_FORWARD_GFLOP, GEMMA_HEAD_GFLOP, GEMMA_EVALUATE_H100_HOURS = 3.90, 0.81, 0.485
GEMMA_ENCODER_GFLOP = 0.151  # one SAE's encoder matmul per token (1536 x 49,152)


def evaluation_additions(out_dir: Path, threads: int = 1, repeats: int = 3) -> dict:
    """What evaluate.k_ladder, evaluate.transfer_models and the all-layer splice add, timed
    side by side in this one process on the demo's shapes (TinyModelSpec, the demo config's
    evaluate section and SAE width, random weights and tokens: speed does not depend on
    them): loupe.evaluate.evaluate_sae without and with the demo's ladder, on a second model
    (a transfer model costs one more evaluate_sae), and loupe.splice.splice_suite over every
    layer; median of `repeats` after a warm-up. Projected to gemma-loupe by counting full
    forwards and LM-head passes per token (what dominates at E2B's size), beside the same
    count for the demo to compare with the measured ratios. Writes
    <out_dir>/evaluation-additions.json and .md."""
    import dataclasses as dc

    import torch
    from transformers import Gemma4ForConditionalGeneration

    from loupe.config import Config
    from loupe.demo import tiny_gemma4_config
    from loupe.evaluate import evaluate_sae
    from loupe.model import import_sparsify, load_model
    from loupe.splice import splice_suite

    torch.set_num_threads(threads)
    sparsify = import_sparsify()
    config = Config.from_dict(_demo_config())
    spec = TinyModelSpec()
    work = Path(tempfile.mkdtemp(prefix="loupe-additions-"))
    torch.manual_seed(0)
    Gemma4ForConditionalGeneration(tiny_gemma4_config(spec)).save_pretrained(work / "model")
    model = load_model(str(work / "model"), torch.device("cpu"), None, "auto", head=True)
    cfg = sparsify.SparseCoderConfig(expansion_factor=config.sae.expansion_factor, k=config.sae.k)
    saes = [sparsify.SparseCoder(spec.hidden_size, cfg, device="cpu") for _ in config.model.layers]
    hooks = [config.model.hookpoint_of(layer) for layer in config.model.layers]
    evaluate_config = config.evaluate
    ctx = config.tokens.ctx_len
    rows = -(-evaluate_config.max_tokens // ctx)
    tokens = np.random.default_rng(0).integers(4, spec.vocab_size, size=(rows, ctx))
    tokens[:, 0] = 2  # BOS
    specials = [0, 1, 2]

    def timed(fn) -> float:
        return cpu_median(fn, repeats)

    def eval_with(ladder):
        laddered_config = dc.replace(evaluate_config, k_ladder=ladder)
        return lambda: evaluate_sae(model, saes[0], hooks[0], tokens, specials, laddered_config)

    base = timed(eval_with([]))
    ladder = timed(eval_with(evaluate_config.k_ladder))
    splice = timed(
        lambda: splice_suite(
            model,
            saes,
            hooks,
            tokens,
            specials,
            evaluate_config.spliced_max_tokens,
            evaluate_config.batch_size,
            256,
        )
    )
    n = len(hooks)
    extra = len([k for k in evaluate_config.k_ladder if k != config.sae.k])
    # Per token: the evaluation runs 3 forwards and 3 LM-head passes, each ladder rung one
    # more of each, a transfer model a whole evaluation; the splice 1 + n of each.
    measured = {
        "evaluate s/layer": base,
        "ladder: x evaluate": ladder / base,
        "transfer: x evaluate per model": 1.0,
        "splice: x all per-layer evaluations": splice / (n * base),
    }
    demo_counted = {
        "ladder: x evaluate": (3 + extra) / 3,
        "splice: x all per-layer evaluations": (1 + n)
        * evaluate_config.spliced_max_tokens
        / (3 * n * rows * ctx),
    }
    # gemma-loupe by GFLOP per token: the evaluation's 3 forwards + 3 heads + 1 encoder, a
    # rung one more of each, the splice's prefixes 1 + n forwards and heads and
    # 1 + 2 + ... + n encoders (each prefix reconstructs every layer it splices).
    g = GEMMA_EVAL
    per = GEMMA_FORWARD_GFLOP + GEMMA_HEAD_GFLOP
    n_g = g["layers"]
    layer_eval = 3 * per + GEMMA_ENCODER_GFLOP
    rung = per + GEMMA_ENCODER_GFLOP
    splice_gflop = (1 + n_g) * per + n_g * (n_g + 1) / 2 * GEMMA_ENCODER_GFLOP
    splice_ratio = splice_gflop * GEMMA_SPLICE_TOKENS / (n_g * layer_eval * g["max_tokens"])
    gemma = {
        "evaluate (today)": GEMMA_EVALUATE_H100_HOURS,
        "ladder (+4 k)": GEMMA_EVALUATE_H100_HOURS * g["ladder_extra"] * rung / layer_eval,
        "transfer (+1 model)": GEMMA_EVALUATE_H100_HOURS * g["transfer_models"],
        "all-layer splice": GEMMA_EVALUATE_H100_HOURS * splice_ratio,
    }
    result = {
        "command": "python benchmarks/bench.py --evaluation-additions",
        "machine": f"{os.cpu_count()} cores, {threads} thread(s), load {os.getloadavg()[0]:.1f}",
        "demo": {
            "layers": n,
            "max_tokens": rows * ctx,
            "k_ladder": evaluate_config.k_ladder,
            "spliced_max_tokens": evaluate_config.spliced_max_tokens,
            "seconds": {"evaluate": base, "evaluate with ladder": ladder, "splice": splice},
            "measured": measured,
            "counted": demo_counted,
        },
        "gemma_loupe_h100_hours": gemma,
        "gemma_gflop_per_token": {
            "layer evaluation": layer_eval,
            "ladder rung": rung,
            "splice with every prefix": splice_gflop,
        },
    }
    shutil.rmtree(work, ignore_errors=True)
    lines = [
        "# Evaluation additions: ladder, transfer, all-layer splice",
        "",
        f"`{result['command']}` ({result['machine']}; CPU time of this process, medians of"
        f" {repeats}). Demo: {n} layers, {rows * ctx:,} eval tokens, k_ladder"
        f" {evaluate_config.k_ladder}, splice on {evaluate_config.spliced_max_tokens:,} tokens.",
        "",
        "| addition | demo, measured | demo, forward count | gemma-loupe H100-hours |",
        "|---|---|---|---|",
        f"| evaluate today (35 layers) | {base:.3f} s/layer | | {gemma['evaluate (today)']:.3f} |",
        f"| k ladder | x{measured['ladder: x evaluate']:.2f} of evaluate"
        f" | x{demo_counted['ladder: x evaluate']:.2f} | +{gemma['ladder (+4 k)']:.3f} |",
        f"| transfer, per model | x1 of evaluate (a second evaluation) | x1"
        f" | +{gemma['transfer (+1 model)']:.3f} |",
        f"| all-layer splice with prefixes | x{measured['splice: x all per-layer evaluations']:.3f}"
        f" of all per-layer evaluations"
        f" | x{demo_counted['splice: x all per-layer evaluations']:.3f}"
        f" | +{gemma['all-layer splice']:.3f} |",
    ]
    return write_results(out_dir, "evaluation-additions", result, lines)


def cpu_median(fn, repeats: int) -> float:
    """Median CPU time of `repeats` calls of fn after a warm-up call (CPU time, as bench's
    other CPU figures: now())."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def write_results(out_dir: Path, name: str, result: dict, lines: list[str]) -> dict:
    """<out_dir>/<name>.json (every number) and .md (the table lines), printed too."""
    from loupe.atomic import write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{name}.json", result)
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def _transfer_memory_child(args: tuple) -> dict:
    """In a fresh process: loupe.evaluate.evaluate_layer as the evaluate job runs it, with
    `transfer` models; with `hold_base`, open_layer's model is kept referenced (what the job
    did before it freed the base model). Its peak RSS (VmHWM) and the models' parameter MB."""
    raw, layer, files, hold_base = args
    import torch

    import loupe.evaluate as ev
    from loupe.config import Config

    held = []
    if hold_base:
        real_open_layer = ev.open_layer

        def open_layer(*a, **kw):
            job = real_open_layer(*a, **kw)
            held.append(job.model)  # the base model stays in memory through the transfer
            return job

        ev.open_layer = open_layer
    torch.set_num_threads(1)
    out = Path(files["out"])
    ev.evaluate_layer(
        Config.from_dict(raw),
        layer,
        *(Path(files[k]) for k in ("sae", "tokens", "manifest", "stats")),
        out,
    )
    status = Path("/proc/self/status").read_text().splitlines()
    peak = next(int(ln.split()[1]) / 1024 for ln in status if ln.startswith("VmHWM:"))
    return {"peak_rss_mb": peak, "transfer": json.loads(out.read_text()).get("transfer", [])}


def transfer_memory(out_dir: Path) -> dict:
    """Peak RSS of the evaluate job with a transfer model, side by side in fresh processes:
    no transfer model, a transfer model with the base model freed first (the job today), and
    with the base model held (before). Random demo-shaped Gemma 4 models with the real
    262,144-token vocabulary (embeddings dominate, as in E2B), fp32 on CPU, 1,024 eval tokens.
    Writes <out_dir>/transfer-memory.json and .md."""
    import hashlib
    import multiprocessing

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import Gemma4ForConditionalGeneration

    from loupe.demo import tiny_gemma4_config
    from loupe.model import import_sparsify

    sparsify = import_sparsify()
    work = Path(tempfile.mkdtemp(prefix="loupe-transfer-memory-"))
    spec = dataclasses.replace(TinyModelSpec(), vocab_size=262_144)
    params = 0
    for name, seed in (("base", 0), ("other", 1)):
        torch.manual_seed(seed)
        model = Gemma4ForConditionalGeneration(tiny_gemma4_config(spec))
        model.save_pretrained(work / name)
        params = sum(p.numel() for p in model.parameters())
        del model
    layer = 2
    cfg = sparsify.SparseCoderConfig(expansion_factor=8, k=8)
    sparsify.SparseCoder(spec.hidden_size, cfg, device="cpu").save_to_disk(work / "sae")
    rows, ctx = 16, 64
    ids = np.random.default_rng(0).integers(4, spec.vocab_size, (rows, ctx)).astype(np.uint32)
    ids[:, 0] = 2
    np.save(work / "eval.npy", ids)
    manifest = {
        "rows": {"eval": rows},
        "ctx_len": ctx,
        "dtype": "uint32",
        "sha256": {"eval": hashlib.sha256(np.ascontiguousarray(ids).data).hexdigest()},
        "vocab_size": spec.vocab_size,
        "max_token_id": int(ids.max()),
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
    }
    (work / "manifest.json").write_text(json.dumps(manifest))
    latents = spec.hidden_size * 8
    pq.write_table(
        pa.table(
            {
                "feature": np.arange(latents),
                "fire_count": np.ones(latents, dtype=np.int64),
                "density": np.full(latents, 0.01),
            }
        ),
        work / "stats.parquet",
    )
    raw = _demo_config()
    raw["model"].update(name=str(work / "base"), layers=[layer])
    raw["device"] = "cpu"
    raw["evaluate"].update(max_tokens=rows * ctx, k_ladder=[], transfer_models=[])
    files = {
        k: str(work / v)
        for k, v in (
            ("sae", "sae"),
            ("tokens", "eval.npy"),
            ("manifest", "manifest.json"),
            ("stats", "stats.parquet"),
            ("out", "eval.json"),
        )
    }
    with_transfer = json.loads(json.dumps(raw))
    with_transfer["evaluate"]["transfer_models"] = [str(work / "other")]
    runs = {
        "no transfer model": (raw, False),
        "transfer, base model freed first (today)": (with_transfer, False),
        "transfer, base model held (before)": (with_transfer, True),
    }
    spawn = multiprocessing.get_context("spawn")
    peaks = {}
    for label, (config, hold) in runs.items():
        with spawn.Pool(1) as pool:
            peaks[label] = pool.apply(_transfer_memory_child, ((config, layer, files, hold),))
    shutil.rmtree(work, ignore_errors=True)
    one = params * 4 / 2**20
    mb = {label: r["peak_rss_mb"] for label, r in peaks.items()}
    base = mb["no transfer model"]
    result = {
        "command": "python benchmarks/bench.py --transfer-memory",
        "machine": f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "model_parameters": params,
        "model_mb_fp32": one,
        "peak_rss_mb": mb,
        "over no transfer, in models": {k: (v - base) / one for k, v in mb.items()},
    }
    lines = [
        "# Evaluate's memory with a transfer model",
        "",
        f"`{result['command']}` ({result['machine']}). evaluate_layer in a fresh process per"
        f" row, 1,024 eval tokens; two random demo-shaped Gemma 4 models with the real 262,144"
        f" vocabulary, {params / 1e6:.1f}M parameters = {one:.0f} MB each in fp32.",
        "",
        "| run | peak RSS | over no transfer, in model sizes |",
        "|---|---|---|",
        *(
            f"| {k} | {v:,.0f} MB | {result['over no transfer, in models'][k]:+.2f} |"
            for k, v in mb.items()
        ),
        "",
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "transfer-memory.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "transfer-memory.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return result


# gemma-loupe's SAE width, the neighbours settings and the random-window pool of config.yaml.
GEMMA_NEIGHBOURS = dict(
    features=49_152, d=1536, layers=35, top_n=10, chunk=4096, k=100, windows=1000, window=41
)


def neighbours_cost(
    out_dir: Path, threads: int = 1, repeats: int = 3, gemma: dict = GEMMA_NEIGHBOURS
) -> dict:
    """What the neighbours stage costs (loupe.neighbours, through logits.blocked_top_k): on the
    demo's SAE width, one layer's three products (same, prev, next) whole; at gemma-loupe's
    width (49,152 x 1,536, a random fp32 pair), one query block of neighbours.chunk rows
    against all of the other layer's features, and a product's matmul alone on that block.
    Projected by the block count to one product, one layer (3 products) and the 35-layer
    suite on this CPU, and by FLOPs to an H100 (flops.RATES' fp32 rate: the stage computes in
    fp32). The flow rule's co-activation count per layer pair (loupe.flow.coactivation_counts,
    matched and shuffled) on random pools of gemma-loupe's shape (maxact.random_windows
    windows of window_before + 1 + window_after tokens, k codes). File size: a
    feature_neighbours.parquet of gemma-loupe's shape written by
    write_neighbours from random ids and sorted cosines, and the demo's real one. Medians of
    `repeats` after a warm-up; CPU time. Writes <out_dir>/neighbours.json and .md."""
    import torch

    from benchmarks.flops import RATES
    from loupe.config import Config
    from loupe.flow import coactivation_counts
    from loupe.logits import blocked_top_k
    from loupe.neighbours import decoder_neighbours, neighbours_table, write_neighbours

    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="loupe-neighbours-"))
    config = Config.from_dict(_demo_config())

    def timed(fn) -> float:
        return cpu_median(fn, repeats)

    g = torch.Generator().manual_seed(0)
    # The demo: d_in 64 x expansion factor, three decoders, the stage's call whole.
    demo_f = 64 * config.sae.expansion_factor
    prev, mine, nxt = (torch.randn(demo_f, 64, generator=g) for _ in range(3))
    top_n, chunk = config.neighbours.top_n, config.neighbours.chunk
    adjacent = {"prev": (0, prev), "next": (2, nxt)}
    demo_s = timed(lambda: decoder_neighbours(mine, adjacent, 1, top_n, chunk))
    demo_file = work / "demo.parquet"
    write_neighbours(
        demo_file, neighbours_table(decoder_neighbours(mine, adjacent, 1, top_n, chunk))
    )

    # gemma-loupe's width: one query block against every key, in the stage's blocks.
    G = gemma
    F, d, q = G["features"], G["d"], G["chunk"]
    a = torch.nn.functional.normalize(torch.randn(q, d, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(F, d, generator=g), dim=1)
    block_s = timed(
        lambda: blocked_top_k(a, b, G["top_n"], query_chunk=q, key_chunk=q, desc="bench")
    )
    matmul_s = timed(lambda: [a @ b[k0 : k0 + q].T for k0 in range(0, F, q)])
    blocks = -(-F // q)  # query blocks per product
    product_flop = 2 * F * F * d
    product_s = block_s * blocks
    layer_s = 3 * product_s  # same, prev, next (the two ends of the stack have 2)
    suite_products = G["layers"] * 3 - 2
    h100_product_s = product_flop / (RATES["fp32"] * 1e12)

    # The flow's count for one layer pair: two pools of TopK codes, matched and shuffled.
    rng = np.random.default_rng(0)
    pool_tokens = G["windows"] * G["window"]

    def pool():
        ids = np.argpartition(rng.random((pool_tokens, F // 64)), G["k"], axis=1)[:, : G["k"]]
        features = (ids * 64 + rng.integers(0, 64, ids.shape)).astype(np.int32)  # distinct
        return features, rng.uniform(0.1, 5.0, features.shape).astype(np.float32)

    (fa, aa), (fb, ab) = pool(), pool()
    match = rng.integers(0, F, F)
    flow_s = cpu_median(
        lambda: [coactivation_counts(fa, aa, fb, ab, m) for m in (match, rng.permutation(match))],
        repeats,
    )

    # A gemma-loupe neighbours file: 3 relations x top_n rows per feature.
    found = {
        relation: (
            layer,
            torch.from_numpy(-np.sort(-rng.uniform(0.2, 0.9, (F, G["top_n"])), axis=1)),
            torch.from_numpy(rng.integers(0, F, (F, G["top_n"]))),
        )
        for relation, layer in (("prev", 4), ("next", 6), ("same", 5))
    }
    gemma_file = work / "gemma.parquet"
    write_neighbours(gemma_file, neighbours_table(found))
    result = {
        "command": "python benchmarks/bench.py --neighbours",
        "machine": f"{os.cpu_count()} cores, {threads} thread(s), load {os.getloadavg()[0]:.1f}",
        "demo": {
            "features": demo_f,
            "d": 64,
            "layer_s": demo_s,
            "file_bytes": demo_file.stat().st_size,
        },
        "gemma": {
            **G,
            "block_s": block_s,
            "block_matmul_s": matmul_s,
            "block_gflop": 2 * q * F * d / 1e9,
            "cpu_gflop_per_s": 2 * q * F * d / 1e9 / block_s,
            "top_k_share": 1 - matmul_s / block_s,
            "product_tflop": product_flop / 1e12,
            "cpu_product_s": product_s,
            "cpu_layer_s": layer_s,
            "cpu_suite_h": suite_products * product_s / 3600,
            "h100_fp32_tflops_assumed": RATES["fp32"],
            "h100_product_s": h100_product_s,
            "h100_layer_s": 3 * h100_product_s,
            "h100_suite_min": suite_products * h100_product_s / 60,
            "file_bytes": gemma_file.stat().st_size,
            "file_rows": 3 * G["top_n"] * F,
            "flow_pool_tokens": pool_tokens,
            "flow_pair_s": flow_s,
        },
    }
    shutil.rmtree(work, ignore_errors=True)
    gm = result["gemma"]
    lines = [
        "# Neighbours stage: FLOPs, time per layer, file size",
        "",
        f"`{result['command']}` ({result['machine']}; CPU time, medians of {repeats})."
        f" gemma-loupe width: {F:,} x {d:,}, top_n {G['top_n']}, {q:,}-row blocks; one query"
        f" block ({q:,} x {F:,}, {gm['block_gflop']:.0f} GFLOP) timed, the rest projected.",
        "",
        "| | demo (512 x 64) | gemma-loupe (49,152 x 1,536) |",
        "|---|---|---|",
        f"| one product (2 F^2 d) | {2 * demo_f**2 * 64 / 1e6:.1f} MFLOP"
        f" | {gm['product_tflop']:.2f} TFLOP |",
        f"| one query block, this CPU | | {block_s:.2f} s ({gm['cpu_gflop_per_s']:.1f} GFLOP/s;"
        f" matmul {matmul_s:.2f} s, top-k and merge {gm['top_k_share']:.0%}) |",
        f"| one layer (3 products), this CPU | {demo_s * 1000:.1f} ms (measured)"
        f" | {layer_s / 60:.1f} min (projected: {blocks} blocks x 3) |",
        f"| 35-layer suite ({suite_products} products), this CPU | | {gm['cpu_suite_h']:.1f} h |",
        f"| one layer, H100 (matmul at {RATES['fp32']:.0f} fp32 TFLOP/s assumed) |"
        f" | {gm['h100_layer_s']:.2f} s |",
        f"| 35-layer suite, H100 | | {gm['h100_suite_min']:.1f} min |",
        f"| flow: co-activation count per layer pair ({pool_tokens:,} tokens x k {G['k']},"
        f" matched and shuffled) | | {flow_s:.2f} s (suite: {(G['layers'] - 1) * flow_s:.0f} s) |",
        f"| feature_neighbours.parquet per layer | {result['demo']['file_bytes'] / 1e3:.0f} kB"
        f" | {gm['file_bytes'] / 1e6:.1f} MB ({gm['file_rows']:,} rows) |",
    ]
    return write_results(out_dir, "neighbours", result, lines)


def _demo_config() -> dict:
    """The demo's config (config.yaml overlaid with profiles/demo/demo-config.yaml)."""
    import yaml

    from loupe.config import overlay

    base = yaml.safe_load((REPO / "config.yaml").read_text())
    return overlay(base, yaml.safe_load((REPO / "profiles/demo/demo-config.yaml").read_text()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes: checks the code paths")
    p.add_argument("--threads", type=int, default=1, help="threads per measurement")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--name", help="of the result files (default: <date>-<host>[-quick])")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    tmp = Path(tempfile.gettempdir()) / f"loupe-bench-{os.getuid()}"
    p.add_argument("--work-dir", type=Path, default=tmp, help="inputs, logs (kept)")
    p.add_argument("--in-process", action="store_true", help="no process per measurement")
    p.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    p.add_argument(
        "--evaluation-additions",
        action="store_true",
        help="only the cost of the k ladder, transfer and all-layer splice (demo shapes)",
    )
    p.add_argument(
        "--transfer-memory",
        action="store_true",
        help="only the evaluate job's peak RSS with a transfer model, base model freed or held",
    )
    p.add_argument(
        "--neighbours",
        action="store_true",
        help="only the neighbours stage: demo width, and one block at gemma-loupe's width",
    )
    p.add_argument(
        "--rehearse",
        action="store_true",
        help="only the rehearsal: every stage after training at gemma-loupe width (rehearse.py;"
        " with --quick its small shape)",
    )
    args = p.parse_args(argv)
    if args.rehearse:
        from benchmarks import rehearse

        quick = ["--quick"] if args.quick else []
        return rehearse.main([*quick, "--out-dir", str(args.out_dir)])
    if args.transfer_memory:
        transfer_memory(args.out_dir)
        return 0
    if args.neighbours:
        neighbours_cost(args.out_dir, args.threads)
        return 0
    if args.evaluation_additions:
        evaluation_additions(args.out_dir, args.threads)
        return 0
    from loupe.atomic import write_json
    from loupe.progress import setup_logging

    setup_logging()
    if args.child:
        write_json(args.child[1], child(json.loads(args.child[0].read_text())))
        return 0
    from importlib.metadata import version

    started, load_before = time.time(), [round(x, 1) for x in os.getloadavg()]
    shape = QUICK if args.quick else FULL
    ctx = fixtures(shape, args.work_dir, args.device, args.threads)
    ms = {}
    for i, (row, name, kwargs) in enumerate(plan(shape), 1):
        t0 = time.time()
        ms[row] = measure(row, name, kwargs, ctx, args.in_process)
        ms[row].update(derive(ms[row]))
        print(f"[{i}] {row}: {ms[row]['tokens_per_s']:,.0f} tokens/s, {time.time() - t0:.0f}s")
    n = shape.model.num_hidden_layers
    cmp = compare(ms, n)
    from benchmarks.flops import project

    b = {k: cmp[SIDE[f"b {k}"]] for k in ("sample", "eval", "alone", "group")}
    b["optimizer"] = cmp[SIDE["b optimizer"].format(tokens=tokens_per_step())]
    per_sae_gb = cmp[SIDE["MB per extra SAE"]] / 1024
    logits = cmp[SIDE["top logits GFLOP/s"]] * 1e9
    projection = project(b, per_sae_gb, ms[label("tokenize")]["tokens_per_s"], logits)
    cpu = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
    flags = [("--quick", args.quick), (f"--threads {args.threads}", args.threads != 1)]
    flags.append((f"--device {args.device}", args.device != "auto"))
    host = socket.gethostname().split(".")[0]
    name = args.name or f"{datetime.date.today()}-{host}" + ("-quick" if args.quick else "")
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    meta = {
        "name": name,
        "command": " ".join(["python benchmarks/bench.py", *(f for f, on in flags if on)]),
        "machine": f"{cpu[0].split(':')[1].strip() if cpu else 'CPU'}, {os.cpu_count()} cores, "
        f"{memory_gb:.0f} GB",
        "load_before": load_before,
        "load_after": [round(x, 1) for x in os.getloadavg()],
        "wall_s": time.time() - started,
        "clock": "process CPU" if ctx["clock"] == "cpu" else "synchronized wall",
        "threads": args.threads,
        "shape": dataclasses.asdict(shape),
        "versions": ", ".join(
            f"{pkg} {version(pkg)}" for pkg in ("torch", "transformers", "eai-sparsify")
        ),
    }
    result = {"meta": meta, "measurements": ms, "side_by_side": cmp, "projection": projection}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")  # plan order
    (args.out_dir / f"{name}.md").write_text(render(meta, ms, cmp, projection))
    print(render(meta, ms, cmp, projection) + f"wrote {args.out_dir / name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
