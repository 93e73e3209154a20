"""Timing and memory helpers shared by the benchmark workers."""

from __future__ import annotations

import resource
import statistics
import time

import psutil

# The clock every measurement reads. On a CPU: this process's CPU seconds (all its threads),
# which count the work done whatever share of the cores other jobs take; wall time on a
# shared machine would time them too. On a GPU: wall time (the work is not this process's
# CPU time), with a synchronize before each reading.
_clock = time.perf_counter


def use_clock(kind: str) -> None:
    """'cpu' (process CPU seconds) or 'wall'."""
    global _clock
    _clock = {"cpu": time.process_time, "wall": time.perf_counter}[kind]


def now() -> float:
    return _clock()


def rss_mb() -> float:
    """Resident memory of this process now, in MB."""
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB. Linux's VmHWM starts afresh at
    exec; ru_maxrss does not (a worker would inherit its parent's peak)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device) -> None:
    """Wait for queued GPU work, so a timer reads the work's end, not its launch."""
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def time_runs(fn, runs: int, warmup: int = 1, device=None) -> list[float]:
    """Seconds of each of `runs` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        sync(device)
        t0 = now()
        fn()
        sync(device)
        times.append(now() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


class BatchClock:
    """Marks the moment each batch's first row is fetched. A trainer's DataLoader (no worker
    processes) fetches batch j+1 right after finishing batch j, so consecutive marks bound
    one batch's whole work: model forward, SAE forward and backward, optimizer step."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.marks: list[float] = []
        self.peak_rss_mb = 0.0  # at the last mark: training state, not the final save

    def row_fetched(self, i: int) -> None:
        if i % self.batch_size == 0:
            self.marks.append(now())
            self.peak_rss_mb = peak_rss_mb()

    def steps(self, grad_acc_steps: int, warmup_steps: int) -> dict:
        """Per optimizer step: seconds of whole steps, of the accumulation-only batches, and
        of the batch that also ran the optimizer; the first `warmup_steps` steps dropped."""
        durations = [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]
        g = grad_acc_steps
        whole = len(durations) // g
        steps = [sum(durations[s * g : (s + 1) * g]) for s in range(warmup_steps, whole)]
        accumulate = [
            d for s in range(warmup_steps, whole) for d in durations[s * g : (s + 1) * g - 1]
        ]
        with_step = [durations[(s + 1) * g - 1] for s in range(warmup_steps, whole)]
        return {"step_s": steps, "accumulate_batch_s": accumulate, "optimizer_batch_s": with_step}
