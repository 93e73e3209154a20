"""The explain stage's embedded explainer: where explain.base_url is null, the job serves
explain.model itself with `transformers serve` (an OpenAI-compatible server) on 127.0.0.1, on
the job's device, for as long as the job runs.

The server never outlives its job: it is stopped when the job ends (its whole process group),
and on Linux the kernel kills it when the job dies without cleanup (kill -9, an OOM kill, a
scheduler's cancel), through PR_SET_PDEATHSIG. transformers serve's model process exits with
the server (transformers.cli.serving.utils.run_until_parent_exits). A local model folder is
served as it is, offline (HF_HUB_OFFLINE=1 works); a hub id is read from the cache or
downloaded like any from_pretrained."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from .errors import LoupeError

log = logging.getLogger(__name__)

# Loading an 8B model from a local disk takes a minute or two; a first download longer.
STARTUP_TIMEOUT_S = 1800.0
STOP_TIMEOUT_S = 10.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _death_signal():
    """A function for the server's process, between fork and exec: SIGKILL it when the job's
    process dies (Linux). libc is loaded here, in the job, so the child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def server_command(model: str, device: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "transformers.cli.transformers", "serve", model,
        "--host", "127.0.0.1", "--port", str(port), "--device", device,
    ]  # fmt: skip


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after STOP_TIMEOUT_S."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def embedded_server(
    model: str, device: str, server_log: Path, startup_timeout: float = STARTUP_TIMEOUT_S
) -> Iterator[str]:
    """`transformers serve model` on 127.0.0.1 at a free port, its output appended to
    `server_log`; yields its base URL (ending in /v1) once it answers /health, and stops it
    on the way out."""
    port = free_port()
    server_log = Path(server_log)
    server_log.parent.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{port}"
    log.info(
        "starting transformers serve %s on %s at %s (log: %s)", model, device, base, server_log
    )
    with open(server_log, "ab") as out:
        process = subprocess.Popen(
            server_command(model, device, port),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped whole
            preexec_fn=_death_signal(),
        )
    try:
        started = time.monotonic()
        while not _healthy(base + "/health"):
            if process.poll() is not None:
                tail = server_log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
                raise LoupeError(
                    f"transformers serve {model} exited (code {process.returncode}) while"
                    f" starting: {tail[0].strip()} (see {server_log})"
                )
            if time.monotonic() - started > startup_timeout:
                raise LoupeError(
                    f"transformers serve {model} did not answer within {startup_timeout:.0f} s"
                    f" (see {server_log})"
                )
            time.sleep(0.5)
        log.info("transformers serve %s ready after %.1f s", model, time.monotonic() - started)
        yield base + "/v1"
    finally:
        stop(process)
