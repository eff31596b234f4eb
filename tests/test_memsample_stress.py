"""The sampled allocation profiler must never take its host down: stress, fork, shutdown.

Each case runs in a child interpreter (tests/memsample_scripts.py): the hooks are
process-wide, and a crash must fail the test, not the test run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from asgi_pprof import memprofile

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(
    not memprofile.available(), reason=f"native sampler off: {memprofile.unavailable_reason()}"
)


def run_child(function: str, timeout: float = 180, **env: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", f"from tests.memsample_scripts import {function}; {function}()"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **env},
        check=False,
    )
    how = (
        f"killed by {signal.Signals(-proc.returncode).name}"
        if proc.returncode < 0
        else f"exit {proc.returncode}"
    )
    assert proc.returncode == 0, f"{function}: {how}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.startswith("OK"), proc.stdout
    return proc.stdout


@pytest.mark.parametrize("malloc", ["default", "debug"])
def test_stress_threads_tracemalloc_rate_changes_and_fork(malloc: str) -> None:
    # PYTHONMALLOC=debug checks every hooked call: the GIL is held, no buffer over- or
    # underflow, no free of memory another domain allocated.
    env = {"PYTHONMALLOC": malloc} if malloc == "debug" else {}
    print(run_child("stress", **env))


@pytest.mark.parametrize("how", ["coexist", "coexist_direct"])
def test_tracemalloc_started_before_and_after_and_stopped_while_sampling(how: str) -> None:
    print(run_child(how))
    print(run_child(how, PYTHONMALLOC="debug"))


def test_interpreter_shutdown_while_sampling_every_allocation() -> None:
    out = run_child("shutdown", timeout=60)
    assert out.strip() == "OK exiting"
