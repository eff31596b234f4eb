"""The exact heap on a FastAPI app of ordinary size under PYTHONTRACEMALLOC=16 (issue 8 item 7).

A fresh interpreter traces from its start (imports included, as a user running with
``PYTHONTRACEMALLOC=16`` does), builds tests/realapp.py (routers, two dozen pydantic
models, a seeded store, its OpenAPI schema) and serves ``heap`` through the mounted
pprof app. Timing targets (first heap < 5 s, later < 2 s) are the benchmark's to report
precisely; here they are asserted loosely, since CI shares 2 cores with others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, re, time, tracemalloc
    import httpx
    from asgi_pprof import builder, heap_names
    from tests import realapp

    OURS = heap_names.PACKAGE_DIR

    def fact(body, key):
        return re.search(rf"^# {re.escape(key)} = (.+)$", body, re.M).group(1)

    async def main():
        t = httpx.ASGITransport(app=realapp.app)
        async with httpx.AsyncClient(transport=t, base_url="http://t", timeout=300) as c:
            for path in realapp.WARM_PATHS:
                assert (await c.get(path)).status_code == 200
            took, cpu = [], []
            for _ in range(3):
                t0, c0 = time.perf_counter(), time.process_time()
                r = await c.get("/debug/pprof/heap")
                took.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                assert r.status_code == 200, r.text
            t0 = time.perf_counter()
            text = (await c.get("/debug/pprof/heap?debug=1")).text
            text_took = time.perf_counter() - t0
        data = builder.decode(r.content)
        snap = tracemalloc.take_snapshot()
        own = total = 0
        for stat in snap.statistics("traceback"):
            total += stat.size
            if any(f.filename.startswith(OURS) for f in stat.traceback):
                own += stat.size
        print(json.dumps({
            "took": took,
            "cpu": cpu,
            "text_took": text_took,
            "stacks": len(data.samples),
            "profile_bytes": sum(s.values[1] for s in data.samples),
            "ours_in_profile": sum(
                s.values[1] for s in data.samples
                if any(f.filename.startswith(OURS) for f in s.stack)
            ),
            "own_truth": own,
            "traced_total": total,
            "own_bytes_fact": int(fact(text, "asgi_pprof.own_bytes")),
            "frames_fact": fact(text, "asgi_pprof.names.frames"),
            "seed_seen": any(
                "realapp.Store.seed" in f.function for s in data.samples for f in s.stack
            ),
        }))

    asyncio.run(main())
    """
)


def test_realapp_heap_at_16_frames_is_fast_and_holds_none_of_ours() -> None:
    env = {**os.environ, "PYTHONTRACEMALLOC": "16", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
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
    # 2-core CI stretch wall time 2-3x. Loose bounds, 5x the targets (5 s first, 2 s
    # later); before this change the first took 48-54 s and later ones 9-21 s.
    assert got["cpu"][0] < 25, got
    assert min(got["cpu"][1:]) < 10, got
    # Our own allocations exist (tracemalloc's own view) but are out of the profile,
    # counted in the trailer instead.
    assert got["own_truth"] > 0
    assert got["ours_in_profile"] == 0
    assert got["own_bytes_fact"] > 0
    # What the app holds is there, by the function that made it.
    assert got["seed_seen"]
    assert got["frames_fact"].endswith("(max 100000)")
