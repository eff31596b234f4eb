"""Real processes for the deployment tests: start one, wait for its URL, send it traffic."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def running(
    args: list[str], cwd: Path, wait_url: str, **env_vars: str
) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_vars}
    # Its own process group: the server's workers go with it, and none is left holding
    # the stderr pipe open (a read of it would then wait forever).
    proc = subprocess.Popen(args, cwd=cwd, env=env, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60  # a cold start under load takes a few seconds
        while True:
            try:
                httpx.get(wait_url, timeout=2)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    _stop_group(proc)
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    pytest.fail(f"{args} did not start:\n{err}")
                time.sleep(0.1)
        yield proc
    finally:
        _stop_group(proc)
        if proc.stderr:
            proc.stderr.close()


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server and every process of its group (workers included)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


@contextmanager
def traffic(url: str, seconds: float) -> Iterator[None]:
    """Request ``url`` in a loop (bounded by ``seconds``) while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        end = time.monotonic() + seconds
        with httpx.Client(timeout=10) as c:
            while not stop.is_set() and time.monotonic() < end:
                c.get(url)

    t = threading.Thread(target=loop, name="test-traffic", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(15)
