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


# E2B's hidden size and head layout (8 heads, 1 KV head, head_dim 256 / global 512, MLP 6144,
# per-layer inputs 256, window 512) on 4 layers and a 2048-token vocabulary, to fit a 2-core,
# 24 GB machine; no KV sharing (a shared layer needs a full-attention layer before it).
FULL = Shape(
    "e2b-width",
    TinyModelSpec(
        hidden_size=1536,
        intermediate_size=6144,
        num_hidden_layers=4,
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
)
QUICK = Shape(
    "quick",
    TinyModelSpec(num_hidden_layers=3, num_kv_shared_layers=0, pretrain_steps=0),
    sae={"expansion_factor": 8, "k": 8},
    rows=16,
    batches=(1, 16),  # tiny batches: many, so the difference stands above the noise
    tokenize_tokens=(16384, 196608),
    documents=2000,
)


def plan(shape: Shape) -> list[tuple[str, str, dict]]:
    """(label, measurement, kwargs) in running order: maxact reads layer 0's SAE, evaluate
    its feature stats."""
    n = shape.model.num_hidden_layers
    return [
        ("tokenize", "tokenize", {}),
        ("train: loupe, layer 0", "train_loupe", {"layer": 0}),
        (f"train: loupe, layer {n - 1}", "train_loupe", {"layer": n - 1}),
        ("train: sparsify Trainer, layer 0", "train_sparsify", {"layers": [0]}),
        (f"train: sparsify Trainer, all {n} layers", "train_sparsify", {"layers": list(range(n))}),
        ("maxact: loupe, layer 0", "maxact", {"layer": 0}),
        ("evaluate: loupe, layer 0", "evaluate", {"layer": 0}),
    ]


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
    device, m = select_device(config.device), config.model
    torch.set_num_threads(ctx["threads"])
    model = load_model(m.name, device, m.revision, m.dtype)
    rows = open_split(split(ctx, ctx["batches"][1], "train.npy"))[: ctx["rows"]]
    ids = torch.from_numpy(rows.astype(np.int64)).to(device)
    out = {}
    for n in sorted(prefixes, reverse=True):  # cut the model shorter each time
        truncate_after(model, hookpoint := m.hookpoint_of(n - 1))
        out[f"forward_{n}"] = per_token(
            ctx, lambda h=hookpoint: capture(model, h, ids), ids.numel()
        )
    x = capture(model, m.hookpoint_of(0), ids).float().flatten(0, 1)
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
    for size in sizes:
        t0 = now(ctx)
        result = run(size)
        out["seconds"].append(now(ctx) - t0)
        out["tokens"].append(result.pop("tokens"))
        out.update(result)
    (s0, s1), (t0, t1) = out["seconds"], out["tokens"]
    if s1 <= s0 or t1 <= t0:
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


def train_loupe(ctx: dict, layer: int) -> dict:
    """loupe.train.train_layer, one optimizer step of one batch, then one of several batches
    (grad_acc_steps): the difference holds batches, no optimizer step."""
    from loupe.train import train_layer

    def run(batches: int) -> dict:
        out = fresh(Path(ctx["work"]) / f"train-{layer}")
        config = config_of(ctx, train={"grad_acc_steps": batches})
        tokens = split(ctx, batches, "train.npy")
        s = train_layer(config, layer, tokens, out / "sae", out / "checkpoint", ctx["threads"])
        shutil.rmtree(out / "checkpoint")  # GBs at the real width; maxact reads out / "sae"
        return {"tokens": s["tokens"], "final_fvu": s["final_fvu"]}

    return stage(ctx, run, layer + 1)


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

    config, sae = config_of(ctx), Path(ctx["work"]) / f"train-{layer}" / "sae"

    def run(batches: int) -> dict:
        out = fresh(Path(ctx["work"]) / f"maxact-{layer}-{batches}")
        tokens, manifest = split(ctx, batches, "sample.npy"), split(ctx, batches, "manifest.json")
        names = ("examples", "intervals", "stats", "logits")
        files = {name: out / f"{name}.parquet" for name in names}
        s = sample_layer(config, layer, sae, tokens, manifest, **files, threads=ctx["threads"])
        return {"tokens": s["tokens"], "examples": s["examples"]}

    return stage(ctx, run, layer + 1)


def evaluate(ctx: dict, layer: int) -> dict:
    """loupe.evaluate.evaluate_layer: per batch three full forwards (clean, SAE-spliced,
    zero-ablated) and the next-token losses."""
    from loupe.evaluate import evaluate_layer

    config, work = config_of(ctx), Path(ctx["work"])
    sae, out = work / f"train-{layer}" / "sae", work / "eval.json"
    stats = work / f"maxact-{layer}-{ctx['batches'][1]}" / "stats.parquet"

    def run(batches: int) -> dict:
        tokens, manifest = split(ctx, batches, "eval.npy"), split(ctx, batches, "manifest.json")
        r = evaluate_layer(config, layer, sae, tokens, manifest, stats, out, ctx["threads"])
        return {"tokens": r["rows"] * CTX_LEN, "fvu": r["fvu"]}

    return stage(ctx, run, len(config.model.layers), passes=3)


MEASUREMENTS = {f.__name__: f for f in (tokenize, train_loupe, train_sparsify, maxact, evaluate)}


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

    from loupe.config import Config
    from loupe.demo import build_tiny_model, harvest_documents
    from loupe.io import atomic_path
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
        "evaluate": {**real["evaluate"], "batch_size": shape.rows},
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
    if not isinstance(f, dict):  # tokenization: the tokenizer alone
        return {"tokens_per_s": 1 / spt, "x_floor": spt / f}
    forward = m["passes"] * f[f"forward_{m['layers_run']}"]
    return {
        "tokens_per_s": 1 / spt,
        "layer_tokens_per_s": m["saes"] / spt,
        "x_floor": spt / (forward + m["saes"] * f["encode"]),
        "b": (spt - forward) / (m["saes"] * f["encode"]),
    }


def compare(ms: dict, n: int) -> dict:
    """The side-by-side figures of plan()'s measurements."""
    ours, last = ms["train: loupe, layer 0"], ms[f"train: loupe, layer {n - 1}"]
    plain = ms["train: sparsify Trainer, layer 0"]
    group = ms[f"train: sparsify Trainer, all {n} layers"]
    spt, floor = ours["seconds_per_token"], plain["floor"]
    return {
        "loupe over sparsify Trainer, layer 0 (tokens/s)": plain["seconds_per_token"] / spt,
        f"loupe at layer {n - 1} over sparsify Trainer at layer 0 (tokens/s; both run every "
        "layer)": plain["seconds_per_token"] / last["seconds_per_token"],
        "truncation at layer 0: ms saved per token": 1e3 * (plain["seconds_per_token"] - spt),
        "truncation at layer 0: ms the floors predict": 1e3
        * (floor[f"forward_{n}"] - floor["forward_1"]),
        f"one job for all {n} layers over loupe's layer-0 job (layer-tokens/s)": spt
        * group["layer_tokens_per_s"],
        "SAE work per SAE, all layers in one job over one alone (b)": group["b"] / plain["b"],
        "MB per extra SAE in training": (group["peak_rss_mb"] - plain["peak_rss_mb"]) / (n - 1),
        "b: train (mean of loupe's two layers)": (ours["b"] + last["b"]) / 2,
        "b: sample": ms["maxact: loupe, layer 0"]["b"],
        "b: eval": ms["evaluate: loupe, layer 0"]["b"],
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
    for label, m in ms.items():
        runs = ", ".join(f"{t:,}: {s:.3g}" for t, s in zip(m["tokens"], m["seconds"], strict=True))
        keys = ("tokens_per_s", "layer_tokens_per_s", "x_floor", "b", "peak_rss_mb")
        lines.append(f"| {label} | {' | '.join(num(m.get(k)) for k in keys)} | {runs} |")
    lines += ["", "## Side by side", "", *(f"- {k}: {num(v)}" for k, v in cmp.items())]
    lines += ["", "## Projected cost of the full gemma-loupe build on one H100", ""]
    if meta["shape"]["name"] == QUICK.name:
        lines += ["**A quick run: its shapes are far too small for this to mean anything.**", ""]
    rates, f, mem = p["rates_tflops"], p["forward_gflops_per_token"], p["memory_gb"]
    lines += [
        f"At {rates['model']:.0f} TFLOP/s for the bf16 model and {rates['sae']:.0f} for the fp32 "
        f"SAE (assumed); per token at ctx 1024: forward {f['full']:.2f} GFLOP (through layer 17: "
        f"{f['layer_17_prefix']:.2f}), LM head {f['lm_head']:.2f}, SAE encoder "
        f"{p['sae_mflops_per_token']['encode']:.0f} MFLOP. Truncation speeds up one layer's "
        "training job "
        + ", ".join(f"{v:.2f}x at layer {k}" for k, v in p["truncation_speedup"].items())
        + ".",
        "",
        "| stage | plan | GPU-hours | whole build |",
        "|---|---|---|---|",
        *(
            f"| train | {k} | {num(v)} | {num(p['total_gpu_hours'][k])} |"
            for k, v in p["train_gpu_hours"].items()
        ),
        f"| max-activation sampling | one layer per job | {num(p['sample_gpu_hours'])} | |",
        f"| evaluate | one layer per job | {num(p['eval_gpu_hours'])} | |",
        "",
        f"Tokenization: {num(p['tokenize_cpu_hours'])} CPU-hours (one thread, the demo's "
        f"tokenizer). Memory: the model {mem['model']:.1f} GB (bf16) + {mem['per_sae_train']:.2f} "
        f"GB per SAE in training + 8 GB working set: at most {p['largest_group']} SAEs per job "
        f"on an {mem['gpu']:.0f} GB H100.",
    ]
    return "\n".join(lines) + "\n"


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
    args = p.parse_args(argv)
    from loupe.io import write_json
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
    for i, (label, name, kwargs) in enumerate(plan(shape), 1):
        t0 = time.time()
        ms[label] = measure(label, name, kwargs, ctx, args.in_process)
        ms[label].update(derive(ms[label]))
        print(f"[{i}] {label}: {ms[label]['tokens_per_s']:,.0f} tokens/s, {time.time() - t0:.0f}s")
    n = shape.model.num_hidden_layers
    cmp = compare(ms, n)
    from benchmarks.flops import project

    b = {k: cmp[f"b: {k}"] for k in ("sample", "eval")}
    b["train"] = cmp["b: train (mean of loupe's two layers)"]
    per_sae_gb = cmp["MB per extra SAE in training"] / 1024
    projection = project(b, per_sae_gb, ms["tokenize"]["tokens_per_s"])
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
