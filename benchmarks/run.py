#!/usr/bin/env python
"""Run every loupe benchmark on this machine and write benchmarks/results/<date>-<host>.json
and .md: stage throughput and peak memory, each as a ratio to its floor, sparsify's plain
Trainer side by side with loupe's training code, and the projected GPU-hours of the full
gemma-loupe build on one H100.

    python benchmarks/run.py            # the full run: ~6 CPU-minutes on 2 cores
    python benchmarks/run.py --quick    # small shapes, to check the code paths
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `benchmarks` as a package, run from anywhere


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes: checks the code paths")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and tokenizer threads per measurement (1: steady on a shared machine)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / f"loupe-bench-{os.getuid()}",
        help="inputs (corpus, models, tokens) and logs; kept and reused between runs",
    )
    p.add_argument(
        "--out-dir", type=Path, default=REPO / "benchmarks" / "results", help="result files"
    )
    p.add_argument(
        "--reanalyze",
        type=Path,
        default=None,
        help="recompute the table and projection from an earlier result JSON; measure nothing",
    )
    p.add_argument("--tflops-bf16", type=float, default=None, help="sustained H100 bf16 TFLOP/s")
    p.add_argument("--tflops-tf32", type=float, default=None, help="sustained H100 TF32 TFLOP/s")
    return p.parse_args(argv)


def _meta(args, started: float) -> dict:
    from importlib.metadata import version

    import psutil
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    argv = " ".join(sys.argv[1:])
    return {
        "date": datetime.date.today().isoformat(),
        "host": socket.gethostname().split(".")[0],
        "command": f"python benchmarks/run.py{' ' + argv if argv else ''}",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": psutil.virtual_memory().total / 2**30,
        "threads": args.threads,
        "device": args.device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sparsify": version("eai-sparsify"),
        "python": platform.python_version(),
        "quick": args.quick,
        "wall_s": time.time() - started,
    }


def measure(args) -> tuple[dict, dict]:
    """Every measurement of a run: (raw results, run metadata)."""
    from benchmarks import fixtures, suite
    from benchmarks.shapes import shapes

    started = time.time()
    load_before = [round(x, 2) for x in os.getloadavg()]
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    chosen = shapes(args.quick)
    print(f"loupe benchmarks: work dir {work}, shapes {[s.name for s in chosen]}", flush=True)

    # Inputs first, in this process (cached in the work dir for later runs).
    splits = fixtures.token_splits(
        work, suite.train_split_tokens(chosen), suite.sample_split_tokens(chosen)
    )
    for shape in chosen:
        fixtures.model(work, shape)

    from loupe.model import resolve_device

    clock = "cpu" if resolve_device(args.device).type == "cpu" else "wall"
    runner = suite.Runner(work=work, threads=args.threads, device=args.device, clock=clock)
    sizes = (32768, 131072) if args.quick else (131072, 786432)  # tokenization: 4-6x apart
    raw = {"tokenize": suite.tokenization(runner, sizes), "shapes": {}}
    for shape in chosen:
        raw["shapes"][shape.name] = suite.shape_suite(runner, shape, splits)
    meta = _meta(args, started)
    meta["shapes"] = [s.name for s in chosen]
    meta["clock"] = clock
    meta["load_before"] = load_before
    meta["load_after"] = [round(x, 2) for x in os.getloadavg()]
    # Load before we started is someone else's work: the machine was shared.
    meta["shared"] = load_before[0] > 0.5
    return raw, meta


def analyze(raw: dict, meta: dict, args) -> tuple[dict, str]:
    """Table rows, derived figures and the projection: (JSON result, markdown)."""
    from benchmarks import analysis, cost, report
    from benchmarks.flops import count_e2b_flops, real_sae

    names = meta["shapes"]
    rows, tok = analysis.tokenize_rows(raw["tokenize"])
    derived = {"main_shape": names[0], "shapes": {}, "tokenize": tok}
    for name in names:
        r = raw["shapes"][name]
        shape_rows, d = analysis.shape_rows(name, r)
        d.update(layers=r["layers"], shallow_layer=r["shape"]["layers"][0])
        rows += shape_rows
        derived["shapes"][name] = d

    main_d = derived["shapes"][names[0]]
    model = count_e2b_flops(1024)
    defaults = cost.Rates()
    rates = cost.Rates(
        bf16=args.tflops_bf16 or defaults.bf16, tf32=args.tflops_tf32 or defaults.tf32
    )
    projection = analysis.projection(
        model,
        real_sae(),
        main_d,
        rates,
        cost.Build(),
        per_sae_gb=main_d["per_sae_train_mb"] / 1024,
        model_gb=model.params * 2 / 1e9,
        tokenize_tps=tok["tokens_per_s"],
    )
    result = {"meta": meta, "rows": rows, "derived": derived, "projection": projection, "raw": raw}
    return result, report.render(meta, rows, derived, projection)


def main(argv=None) -> int:
    args = parse_args(argv)
    from loupe.io import atomic_path, write_json
    from loupe.progress import setup_logging

    setup_logging()
    if args.reanalyze:
        old = json.loads(args.reanalyze.read_text())
        raw, meta = old["raw"], old["meta"]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if not args.reanalyze:
        raw, meta = measure(args)
    stem = f"{meta['date']}-{meta['host']}{'-quick' if meta['quick'] else ''}"
    if not args.reanalyze:  # the measurements survive a failing analysis: --reanalyze them
        write_json(args.out_dir / f"{stem}.json", {"meta": meta, "raw": raw})
    result, markdown = analyze(raw, meta, args)
    write_json(args.out_dir / f"{stem}.json", result)
    with atomic_path(args.out_dir / f"{stem}.md") as tmp:
        tmp.write_text(markdown)
    print(markdown)
    print(f"wrote {args.out_dir / stem}.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
