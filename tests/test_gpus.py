"""The per-process GPU allocator: real processes and real flock locks on simulated GPUs; the
OS's own view of each lock file (an independent flock from the test) is the oracle."""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from loupe import gpus
from loupe.errors import LoupeError
from loupe.gpus import (
    LOCK_DIR_ENV,
    SIMULATED_ENV,
    USING_GPU_RE,
    held_gpu,
    release,
    select_device,
)

# Bounds on waiting for a child, generous for a loaded 2-core machine; never asserted on.
START_S = 90.0
POLL_S = 0.1  # the children's lock polling (the package's 2 s would only slow the tests)

# A job in miniature: takes a device, reports it, holds it until the test closes its stdin.
CHILD = """
import sys
from loupe import gpus
from loupe.progress import setup_logging

setup_logging()
gpus.POLL_S = float(sys.argv[2])
device = gpus.select_device(sys.argv[1])
print(f"took {gpus.held_gpu()} {device}", flush=True)
sys.stdin.readline()
"""
TOOK = re.compile(r"^took (\d+|None) (\S+)$", re.MULTILINE)
WAITING = re.compile(r"all 2 GPU\(s\) are held by other loupe jobs; waiting for one to free up")


class Child:
    """A child process whose merged stdout and stderr are read line by line in a thread."""

    def __init__(self, env: dict, device: str = "auto"):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, device, str(POLL_S)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.output = ""
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def expect(self, pattern: re.Pattern, timeout: float = START_S) -> re.Match:
        """Wait until the output so far matches `pattern`; fail with the output if it never does."""
        deadline = time.monotonic() + timeout
        while not (found := pattern.search(self.output)):
            left = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(left, 0))
            except queue.Empty:
                line = None
            if line is None:
                pytest.fail(f"no {pattern.pattern!r} from the child; its output:\n{self.output}")
            self.output += line
        return found

    def took(self) -> int:
        match = self.expect(TOOK)
        assert match[2] == "cpu"  # simulated GPUs run on the CPU
        return int(match[1])

    def finish(self):
        """Let the child exit normally (it releases nothing itself: the OS drops its lock)."""
        self.proc.stdin.close()
        assert self.proc.wait(timeout=START_S) == 0, self.output


def locked(path: Path) -> bool:
    """Whether another process holds an exclusive flock on `path`, asked of the OS directly."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock if this test got it
    return False


@pytest.fixture(autouse=True)
def gpu_env(monkeypatch, tmp_path):
    """Two simulated GPUs, a private lock folder, no scheduler; no lock left held after."""
    monkeypatch.setenv(SIMULATED_ENV, "2")
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path / "locks"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    yield tmp_path / "locks"
    release()


@pytest.fixture
def spawn(gpu_env):
    children: list[Child] = []

    def start(device: str = "auto") -> Child:
        children.append(Child(dict(os.environ, PYTHONUNBUFFERED="1"), device))
        return children[-1]

    yield start
    for child in children:
        child.proc.kill()
        child.proc.wait(timeout=START_S)


def test_two_concurrent_jobs_take_different_gpus_and_say_which(spawn, gpu_env):
    a, b = spawn(), spawn()
    assert {a.took(), b.took()} == {0, 1}
    for child in (a, b):
        line = child.expect(USING_GPU_RE)
        index = int(line["index"])
        assert (line["count"], line["simulated"]) == ("2", " (simulated)")
        assert line["source"] == f"lock {gpu_env / f'gpu{index}.lock'}"
        # setup_logging's format: the line carries its time and logger
        assert re.search(
            rf"\d\d:\d\d:\d\d,\d+ INFO loupe.gpus: {re.escape(line[0])}", a.output + b.output
        )
    assert locked(gpu_env / "gpu0.lock") and locked(gpu_env / "gpu1.lock")


def test_a_third_job_waits_then_takes_the_gpu_freed_first(spawn, gpu_env):
    a, b = spawn(), spawn()
    first, second = a.took(), b.took()
    c = spawn()
    c.expect(WAITING)
    time.sleep(20 * POLL_S)  # let it look again many times: the wait line must not repeat
    assert not TOOK.search(c.output) and c.proc.poll() is None
    assert locked(gpu_env / f"gpu{first}.lock") and locked(gpu_env / f"gpu{second}.lock")
    a.finish()
    assert c.took() == first
    assert len(WAITING.findall(c.output)) == 1
    assert b.proc.poll() is None and locked(gpu_env / f"gpu{second}.lock")


def test_a_killed_job_frees_its_gpu(spawn, gpu_env):
    a, b = spawn(), spawn()
    victim = {a.took(): a, b.took(): b}[1]  # kill the holder of GPU 1: no job may take 0
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(timeout=START_S)
    assert not locked(gpu_env / "gpu1.lock")
    c = spawn()
    assert c.took() == 1
    assert not WAITING.search(c.output)


@pytest.mark.parametrize("simulated", ["2", ""])
def test_a_scheduler_choice_takes_no_lock(monkeypatch, gpu_env, caplog, simulated):
    monkeypatch.setenv(SIMULATED_ENV, simulated)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    # What torch itself would run on under that CUDA_VISIBLE_DEVICES: the CPU here.
    expected = "cpu" if simulated or not torch.cuda.is_available() else "cuda"
    with caplog.at_level(logging.INFO, logger="loupe.gpus"):
        assert select_device("auto").type == expected
    assert held_gpu() is None
    assert not gpu_env.exists()  # no lock file was even created
    if simulated:
        assert "using GPU 0 of 2 (simulated) (CUDA_VISIBLE_DEVICES=1, no lock)" in caplog.messages


def test_cuda_without_a_gpu_is_one_line_error_and_cpu_takes_no_lock(monkeypatch, gpu_env):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.delenv(SIMULATED_ENV)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(LoupeError, match="no CUDA GPU is available") as error:
            select_device(name)
        assert "\n" not in str(error.value)
    assert select_device("auto") == torch.device("cpu")
    assert select_device("cpu") == torch.device("cpu")
    assert held_gpu() is None and not gpu_env.exists()


def test_explicit_gpu_is_used_as_given_without_a_lock(gpu_env):
    assert select_device("cuda:1") == torch.device("cpu")
    assert held_gpu() is None and not gpu_env.exists()
    with pytest.raises(LoupeError, match=r"'cuda:2': only 2 GPU\(s\) present"):
        select_device("cuda:2")


def test_one_process_keeps_one_gpu_until_released(gpu_env):
    select_device("auto")
    select_device("cuda")  # the same GPU again, not the next one
    assert held_gpu() == 0
    assert not locked(gpu_env / "gpu1.lock")
    release()
    assert held_gpu() is None and not locked(gpu_env / "gpu0.lock")


def test_default_lock_folder_is_shared_by_all_users(monkeypatch, tmp_path):
    monkeypatch.delenv(LOCK_DIR_ENV)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    select_device("auto")
    folder = tmp_path / gpus.DEFAULT_LOCK_DIR_NAME
    assert folder.stat().st_mode & 0o7777 == 0o1777
    assert (folder / "gpu0.lock").stat().st_mode & 0o777 == 0o666


@pytest.mark.parametrize(
    ("env", "device", "message"),
    [
        ({SIMULATED_ENV: "two"}, "auto", "LOUPE_SIMULATED_GPUS='two': expected a number"),
        ({}, "gpu", "device 'gpu' is not one of auto, cpu, cuda, cuda:N"),
        ({LOCK_DIR_ENV: "/proc/loupe-locks"}, "auto", "cannot use GPU lock /proc/loupe-locks"),
    ],
)
def test_bad_settings_are_one_line_errors(monkeypatch, env, device, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(LoupeError, match=re.escape(message)) as error:
        select_device(device)
    assert "\n" not in str(error.value)


def _stamp(line: str) -> float:
    """Seconds since the epoch of a log line's `YYYY-MM-DD HH:MM:SS,mmm` timestamp."""
    import datetime

    day, clock = line.split()[:2]
    return datetime.datetime.strptime(f"{day} {clock}", "%Y-%m-%d %H:%M:%S,%f").timestamp()


@pytest.mark.e2e
def test_snakemake_runs_two_gpu_jobs_at_once_on_different_gpus(demo_run, tmp_path):
    """A real Snakemake run of the demo's sampling step with `--resources gpu=2` and two
    simulated GPUs: the job logs show two jobs holding different GPU ids at the same time."""
    import shutil

    from helpers import copy_workflow, run_snakemake

    work = copy_workflow(tmp_path / "work")
    shutil.copytree(demo_run / "results", work / "results", symlinks=True)
    locks = tmp_path / "locks"
    os.environ[SIMULATED_ENV], os.environ[LOCK_DIR_ENV] = "2", str(locks)
    try:
        run_snakemake(
            work,
            "--profile",
            "profiles/demo",
            "--forcerun",
            "maxact",
            "--set-threads",
            "maxact=1",
            "evaluate=1",
            "--cores",
            "2",
            "--resources",
            "gpu=2",
        )
    finally:
        del os.environ[SIMULATED_ENV], os.environ[LOCK_DIR_ENV]
    spans = []  # (start, end, gpu id) of each sampling job, from its log
    for log in sorted((work / "results").glob("layer_*/maxact.log")):
        lines = log.read_text().splitlines()
        took = [(ln, USING_GPU_RE.search(ln)) for ln in lines]
        line, match = next((ln, m) for ln, m in reversed(took) if m)  # this run's (logs append)
        assert match["count"] == "2" and match["simulated"]
        end = next(ln for ln in reversed(lines) if "examples written" in ln or "top logits" in ln)
        spans.append((_stamp(line), _stamp(end), int(match["index"])))
    assert len(spans) == 6
    overlapping = [
        (a, b)
        for i, a in enumerate(spans)
        for b in spans[i + 1 :]
        if a[0] < b[1] and b[0] < a[1]  # the two jobs ran at the same time
    ]
    assert overlapping, spans
    assert all(a[2] != b[2] for a, b in overlapping), overlapping  # never on the same GPU
