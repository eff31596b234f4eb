"""Real processes for the deployment tests: start one, wait for its URL, send it traffic."""

from __future__ import annotations

import os
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
    proc = subprocess.Popen(args, cwd=cwd, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30  # a cold start under load takes a few seconds
        while True:
            try:
                httpx.get(wait_url, timeout=2)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    pytest.fail(f"{args} did not start:\n{err}")
                time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stderr:
            proc.stderr.close()


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
