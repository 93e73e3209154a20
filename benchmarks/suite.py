"""The measurements of one benchmark run, each in its own worker process, in the order
their inputs appear: tokenization, then per shape floors, training, sampling."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import fixtures
from .shapes import REPO, Shape, settings_for

WARMUP_STEPS = 1  # optimizer steps (training) or batches (sampling) dropped before timing
RUNS = 3  # timed optimizer steps / batches / repeats, of which the median is reported
FLOOR_RUNS = 5  # floors are cheap: a steadier median


@dataclass
class Runner:
    work: Path
    threads: int
    device: str
    clock: str  # "cpu" or "wall": see timing.use_clock
    done: int = 0

    def measure(self, kind: str, label: str, keep: str | None = None, **spec) -> dict:
        """Run one measurement in a fresh process; returns its result dict. Its out_dir is
        deleted afterwards (SAE checkpoints are GBs) except the subfolder `keep`."""
        specs = self.work / "specs"
        specs.mkdir(parents=True, exist_ok=True)
        spec_path = specs / f"{label}.json"
        result_path = specs / f"{label}.result.json"
        log_path = self.work / "logs" / f"{label}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.unlink(missing_ok=True)
        if "out_dir" in spec:  # a fresh start: a checkpoint left there would be resumed
            shutil.rmtree(spec["out_dir"], ignore_errors=True)
        spec.update(kind=kind, result=str(result_path), threads=self.threads, clock=self.clock)
        spec_path.write_text(json.dumps(spec, indent=1))
        env = dict(os.environ)
        env.update(
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
            OMP_NUM_THREADS=str(self.threads),
            MKL_NUM_THREADS=str(self.threads),
            HF_HUB_OFFLINE="1",
            TQDM_MININTERVAL="30",
        )
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.worker", str(spec_path)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
            raise SystemExit(f"benchmark {label} failed (exit {proc.returncode}):\n{tail}")
        self.done += 1
        print(f"  [{self.done:2d}] {label}: {elapsed:.0f}s", flush=True)
        if "out_dir" in spec:
            out = Path(spec["out_dir"])
            for child in out.iterdir() if out.exists() else ():
                if child.name == keep:
                    continue
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        result = json.loads(result_path.read_text())
        result["process_s"] = elapsed
        return result


def tokenization(run: Runner, sizes: tuple[int, int]) -> dict:
    """Tokens/s (median of RUNS after a warm-up, in one process) and peak RSS at two corpus
    sizes; the floor on the larger one."""
    work = run.work
    cfg = fixtures.repo_config("real")["tokens"]
    base = dict(
        corpus=str(fixtures.corpus(work)),
        tokenizer=str(fixtures.tokenizer(work)),
        ctx_len=fixtures.BENCH_CTX_LEN,
        shuffle_buffer=cfg["shuffle_buffer"],
        doc_batch_size=cfg["doc_batch_size"],
    )
    small, large = sizes
    out = {}
    for name, tokens in (("small", small), ("large", large)):
        out[name] = run.measure(
            "tokenize",
            f"tokenize-{name}",
            tokens=tokens,
            repeats=WARMUP_STEPS + RUNS,
            floor_runs=RUNS if name == "large" else 0,
            out_dir=str(work / f"tok-{name}"),
            **base,
        )
        out[name]["runs_s"] = out[name]["runs_s"][WARMUP_STEPS:]
    return out


def shape_suite(run: Runner, shape: Shape, splits: Path) -> dict:
    """Floors, training (ours truncated/full at two layers, sparsify plain) and sampling."""
    work = run.work / shape.name
    model_dir = fixtures.model(run.work, shape)
    settings = settings_for(shape, model_dir, run.device)
    n = shape.model.num_hidden_layers
    rows = shape.batch_size
    batches = (WARMUP_STEPS + RUNS) * shape.grad_acc_steps + 1  # +1: ends the last timed one
    train = fixtures.head_rows(
        splits / "train.npy",
        batches * rows,
        work / f"train-{fixtures.BENCH_CTX_LEN}x{batches * rows}.npy",
    )
    label = shape.name

    prefixes = list(range(1, n + 1))  # every truncation point (grouping compares them all)
    out = {"shape": shape.describe(), "layers": n}
    out["floor"] = run.measure(
        "floor",
        f"{label}-floor",
        settings=settings,
        tokens=str(train),
        rows=rows,
        prefixes=prefixes,
        runs=FLOOR_RUNS,
    )
    common = dict(
        settings=settings, tokens=str(train), warmup_steps=WARMUP_STEPS, floor_runs=FLOOR_RUNS
    )
    ours = out["ours"] = {}
    for layer in shape.layers:
        for truncate in (True, False):
            name = f"L{layer}-{'truncated' if truncate else 'full'}"
            ours[name] = run.measure(
                "train_ours",
                f"{label}-train-{name}",
                layer=layer,
                truncate=truncate,
                out_dir=str(work / f"train-{name}"),
                keep="sae" if truncate and layer == shape.layers[0] else None,
                **common,
            )
            ours[name].update(layer=layer, truncate=truncate)
    shallow = shape.layers[0]
    out["sparsify_one"] = run.measure(
        "train_sparsify",
        f"{label}-sparsify-L{shallow}",
        layer=shallow,
        hookpoints="one",
        out_dir=str(work / "sparsify-one"),
        **common,
    )
    out["sparsify_one"]["layer"] = shallow
    out["sparsify_all"] = run.measure(
        "train_sparsify",
        f"{label}-sparsify-all",
        layer=shallow,
        hookpoints="all",
        out_dir=str(work / "sparsify-all"),
        **common,
    )

    # Sampling with the SAE just trained at the shallow layer, in training's batch shape so
    # the same floors apply; RSS at a sample 4x larger.
    sample_settings = {**settings, "maxact": {**settings["maxact"], "batch_size": rows}}
    sae_dir = work / f"train-L{shallow}-truncated" / "sae"
    sizes = {
        "small": (1 + WARMUP_STEPS + RUNS) * rows,
        "large": 4 * (1 + WARMUP_STEPS + RUNS) * rows,
    }
    out["maxact"] = {}
    for name, n_rows in sizes.items():
        tokens = fixtures.head_rows(
            splits / "sample.npy", n_rows, work / f"sample-{fixtures.BENCH_CTX_LEN}x{n_rows}.npy"
        )
        out["maxact"][name] = run.measure(
            "maxact",
            f"{label}-maxact-{name}",
            settings=sample_settings,
            layer=shallow,
            sae_dir=str(sae_dir),
            tokens=str(tokens),
            manifest=str(splits / "manifest.json"),
            out_dir=str(work / f"maxact-{name}"),
            warmup_batches=WARMUP_STEPS,
            floor_runs=FLOOR_RUNS,
        )
    out["maxact"]["layer"] = shallow
    return out


def sample_split_tokens(shapes: list[Shape]) -> int:
    """Sample-split tokens the fixture needs: the largest sampling run of any shape."""
    return (
        max(4 * (1 + WARMUP_STEPS + RUNS) * s.batch_size for s in shapes) * fixtures.BENCH_CTX_LEN
    )


def train_split_tokens(shapes: list[Shape]) -> int:
    rows = max(((WARMUP_STEPS + RUNS) * s.grad_acc_steps + 1) * s.batch_size for s in shapes)
    return rows * fixtures.BENCH_CTX_LEN
