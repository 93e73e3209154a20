"""Max-activation sampling: the `maxact` rule's code (`loupe.maxact.sample_layer`) with a
trained SAE. Each batch is timed from the moment its activations are requested to the next
batch's request, so a batch's time covers its forward, encode and top-N merge."""

from __future__ import annotations

from pathlib import Path

import loupe.maxact as maxact
from loupe.tokens import open_split

from .stage_floor import measure
from .timing import now, peak_rss_mb


def _wrap(name: str, before=None, seconds: list | None = None) -> None:
    """Replace maxact.<name> (looked up in its module at call time) by a timed call."""
    fn = getattr(maxact, name)

    def timed(*args, **kwargs):
        if before is not None:
            before()
        t0 = now()
        try:
            return fn(*args, **kwargs)
        finally:
            if seconds is not None:
                seconds.append(now() - t0)

    setattr(maxact, name, timed)


def run(spec: dict) -> dict:
    marks: list[float] = []
    writes: list[float] = []
    _wrap("encode_batch", before=lambda: marks.append(now()))
    _wrap("write_stats", seconds=writes)
    _wrap("write_examples", seconds=writes)
    out = Path(spec["out_dir"])
    summary = maxact.sample_layer(
        spec["settings"],
        spec["layer"],
        Path(spec["sae_dir"]),
        Path(spec["tokens"]),
        Path(spec["manifest"]),
        out / "max_activations.parquet",
        out / "feature_stats.parquet",
        threads=spec["threads"],
    )
    peak = peak_rss_mb()
    batches = [b - a for a, b in zip(marks, marks[1:], strict=False)][spec["warmup_batches"] :]
    rows, ctx_len = open_split(spec["tokens"]).shape
    batch_rows = min(rows, spec["settings"]["maxact"]["batch_size"])
    prefixes = [spec["layer"] + 1]
    floor = measure(
        spec["settings"], spec["tokens"], batch_rows, prefixes, spec["floor_runs"], shuffled=False
    )
    return {
        "floor": floor,
        "batch_s": batches,
        "tokens_per_batch": batch_rows * ctx_len,
        "pass_tokens": summary["tokens"],
        "pass_s": summary["seconds"],
        # Both parquet files: sized by features x top_n, not by the sample.
        "write_s": sum(writes),
        "examples": summary["examples"],
        "peak_rss_mb": peak,
    }
