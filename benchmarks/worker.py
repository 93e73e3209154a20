"""One measurement in its own process, so one stage's memory never shows in another's peak:
`python -m benchmarks.worker SPEC.json` reads the spec and writes its result beside it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .timing import rss_mb, use_clock

KINDS = {
    "tokenize": "benchmarks.stage_tokenize:run",
    "floor": "benchmarks.stage_floor:run",
    "train_ours": "benchmarks.stage_train:run_ours",
    "train_sparsify": "benchmarks.stage_train:run_sparsify",
    "maxact": "benchmarks.stage_maxact:run",
}


def main(spec_path: str) -> None:
    import importlib

    spec = json.loads(Path(spec_path).read_text())
    use_clock(spec["clock"])
    module, _, name = KINDS[spec["kind"]].partition(":")
    fn = getattr(importlib.import_module(module), name)
    # Imports done: what the process holds before the stage's own work starts.
    baseline = rss_mb()
    t0 = time.perf_counter()
    result = fn(spec)
    result.update(baseline_rss_mb=baseline, wall_s=time.perf_counter() - t0)
    Path(spec["result"]).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
