"""One GPU per job on a machine with several: `select_device` gives each process a GPU that no
other running loupe job holds, through an exclusive lock file per GPU that the OS releases
when the process ends (also on kill -9). Where a scheduler has already chosen
(`CUDA_VISIBLE_DEVICES`, as SLURM sets it), its choice stands and no lock is taken."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import LoupeError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Overrides the lock folder; jobs that should not share GPUs must see the same folder.
LOCK_DIR_ENV = "LOUPE_GPU_LOCK_DIR"
# Tests only: pretend this many GPUs exist. Ids are locked as for real ones; the device is cpu.
SIMULATED_ENV = "LOUPE_SIMULATED_GPUS"
# Default lock folder, under the system temp dir; world-writable (sticky, like /tmp) so that
# jobs of different users on one workstation see each other's locks.
DEFAULT_LOCK_DIR_NAME = "loupe-gpu-locks"
# Seconds between looks at the locks while every GPU is held (read at each wait).
POLL_S = 2.0

# The one log line naming the device a job took, at INFO on logger `loupe.gpus`. `source` is
# `lock <path>` (taken here), `CUDA_VISIBLE_DEVICES=<value>, no lock` (the scheduler's
# choice) or `device cuda:N chosen in the settings, no lock`. Find it with USING_GPU_RE.search.
USING_GPU = "using GPU {index} of {count}{simulated} ({source})"
USING_GPU_RE = re.compile(
    r"using GPU (?P<index>\d+) of (?P<count>\d+)(?P<simulated> \(simulated\))? "
    r"\((?P<source>.*)\)$",
    re.MULTILINE,
)
SIMULATED_NOTE = " (simulated)"
# Logged once, at WARNING (so it shows even where logging is not set up), when a job waits.
WAITING = (
    "all {count} GPU(s) are held by other loupe jobs; waiting for one to free up "
    "(locks in {lock_dir})"
)
# Logged at INFO when `auto` (or `cpu`) ends on the CPU.
USING_CPU = "using the CPU ({reason})"


@dataclass(frozen=True)
class _Held:
    index: int
    fd: int
    path: Path


_mutex = threading.Lock()
_held: _Held | None = None  # the GPU lock this process holds, kept until it exits


def lock_dir() -> Path:
    """The folder of per-GPU lock files: $LOUPE_GPU_LOCK_DIR, else one under the temp dir."""
    override = os.environ.get(LOCK_DIR_ENV)
    return Path(override) if override else Path(tempfile.gettempdir()) / DEFAULT_LOCK_DIR_NAME


def held_gpu() -> int | None:
    """The GPU id whose lock this process holds, or None."""
    return None if _held is None else _held.index


def release() -> None:
    """Give back this process's GPU lock (for tests; a job keeps its GPU until it exits)."""
    global _held
    with _mutex:
        if _held is not None:
            os.close(_held.fd)
            _held = None


def select_device(name: str) -> torch.device:
    """The device for this job: `auto`/`cuda` take a GPU no other loupe job holds (waiting
    while all are held), `cuda:N` is used as given, `cpu` is the CPU."""
    import torch

    try:
        asked = torch.device("cuda" if name == "auto" else name)
    except RuntimeError:
        raise LoupeError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N") from None
    if asked.type != "cuda":
        if asked.type == "cpu":
            log.info(USING_CPU.format(reason=f"device {name}"))
        return asked
    count, simulated = _gpu_count()
    if count == 0:
        if name == "auto":
            log.info(USING_CPU.format(reason="device auto: no CUDA GPU found"))
            return torch.device("cpu")
        raise LoupeError(
            f"device {name!r} requested but no CUDA GPU is available (use device: auto or cpu)"
        )
    if asked.index is not None:
        # The user pinned this GPU, maybe on purpose for several jobs: no lock, no waiting.
        if asked.index >= count:
            raise LoupeError(f"device {name!r}: only {count} GPU(s) present")
        source = f"device {name} chosen in the settings, no lock"
        return _use(asked.index, count, simulated, source)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        # A scheduler (SLURM) gave this job its GPUs; their numbering restarts at 0 inside the
        # job, so locks keyed by that number would make jobs on different GPUs wait for each
        # other. Use the first one it gave.
        return _use(0, count, simulated, f"CUDA_VISIBLE_DEVICES={visible}, no lock")
    global _held
    with _mutex:
        if _held is None:
            _held = _acquire(count)
            return _use(_held.index, count, simulated, f"lock {_held.path}")
        return _device(_held.index, simulated)  # a second call: the GPU already held


def _gpu_count() -> tuple[int, bool]:
    """How many GPUs this process sees, and whether the count is simulated."""
    raw = os.environ.get(SIMULATED_ENV, "")
    if raw:
        try:
            count = int(raw)
        except ValueError:
            count = -1
        if count < 0:
            raise LoupeError(f"{SIMULATED_ENV}={raw!r}: expected a number of GPUs (0 or more)")
        return count, True
    import torch

    return (torch.cuda.device_count() if torch.cuda.is_available() else 0), False


def _use(index: int, count: int, simulated: bool, source: str) -> torch.device:
    note = SIMULATED_NOTE if simulated else ""
    log.info(USING_GPU.format(index=index, count=count, simulated=note, source=source))
    return _device(index, simulated)


def _device(index: int, simulated: bool) -> torch.device:
    import torch

    if simulated:
        return torch.device("cpu")
    # Code that names no device (Triton launches, torch.cuda memory stats, a library's own
    # `cuda`) uses the current one: make it the GPU this job took, not GPU 0.
    torch.cuda.set_device(index)
    return torch.device(f"cuda:{index}")


def _acquire(count: int) -> _Held:
    """Lock the first free GPU id of 0..count-1, polling while every one is held."""
    directory = lock_dir()
    _make_lock_dir(directory, shared=LOCK_DIR_ENV not in os.environ)
    paths = [directory / f"gpu{i}.lock" for i in range(count)]
    fds: dict[int, int] = {}
    try:
        for i, path in enumerate(paths):
            fds[i] = _open_lock(path)
        waiting = False
        while True:
            for i, fd in fds.items():
                try:
                    # flock, not fcntl/lockf: it belongs to this open file, so the kernel drops
                    # it when the process ends, however it ends.
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                return _Held(i, fds.pop(i), paths[i])
            if not waiting:
                log.warning(WAITING.format(count=count, lock_dir=directory))
                waiting = True
            time.sleep(POLL_S)
    finally:
        for fd in fds.values():
            os.close(fd)


def _make_lock_dir(directory: Path, shared: bool) -> None:
    try:
        directory.mkdir(parents=True)
    except FileExistsError:
        return
    except OSError as e:
        raise LoupeError(_lock_problem(directory, e)) from None
    if shared:
        os.chmod(directory, 0o1777)  # past the umask: every user's jobs create locks here


def _open_lock(path: Path) -> int:
    """An fd on the lock file, created empty if missing. The fd is not inherited by programs
    the job starts (Python's default), so only this process holds the lock."""
    while True:
        try:
            # Without O_CREAT first: Linux's protected_regular refuses O_CREAT on another
            # user's file in a sticky folder. Read-only is enough for flock.
            return os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise LoupeError(_lock_problem(path, e)) from None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue  # another job created it between the two opens
        except OSError as e:
            raise LoupeError(_lock_problem(path, e)) from None
        os.fchmod(fd, 0o666)  # past the umask, so other users' jobs can open it too
        return fd


def _lock_problem(path: Path, error: OSError) -> str:
    return (
        f"cannot use GPU lock {path}: {error.strerror}; "
        f"set {LOCK_DIR_ENV} to a folder all loupe jobs can write"
    )
