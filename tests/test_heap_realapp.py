"""The exact heap on a FastAPI app of ordinary size under PYTHONTRACEMALLOC=16 (issue 8 item 7).

A fresh interpreter traces from its start (imports included, as a user running with
``PYTHONTRACEMALLOC=16`` does), builds tests/realapp.py (routers, two dozen pydantic
models, a seeded store, its OpenAPI schema) and serves ``heap`` through the mounted
pprof app (tests/realapp_heap.py). Timing targets (first heap < 5 s, later < 2 s) are
the benchmark's to report precisely; here they are asserted loosely (CI shares 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_realapp_heap_at_16_frames_is_fast_and_holds_none_of_ours() -> None:
    env = {**os.environ, "PYTHONTRACEMALLOC": "16", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.realapp_heap", "2"],  # a first and a later heap
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(got, indent=1))
    assert got["stacks"] > 10_000, "not a heap of realistic size"
    # CPU seconds of the process per request, not wall time: other jobs on a shared
    # 2-core CI stretch wall time 2-3x. The targets are 5 s first, 2 s later;
    # measured here (a loaded 2-core machine) 6.3-8.2 s and 2.3-3.0 s with traces grouped
    # and named in C (_traces), 9.1 s and 3.1 s under coverage; 9.9-12.1 s and 3.9-5.8 s
    # alongside in the same runs before it; 48-54 s and 9-21 s before issue 8. Bounds:
    # about twice what was measured.
    assert got["cpu"][0] < 14, got
    assert min(got["cpu"][1:]) < 5, got
    # Our own allocations exist (tracemalloc's own view) but are out of the profile,
    # counted in the trailer instead.
    assert got["own_truth"] > 0
    assert got["ours_in_profile"] == 0
    assert got["own_bytes_fact"] > 0
    # What the app holds is there, by the function that made it.
    assert got["seed_seen"]
    assert got["frames_fact"].endswith("(max 100000)")
