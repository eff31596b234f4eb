"""Serve ``heap`` a few times from tests/realapp.py in this process; print what it cost as JSON.

Run as ``PYTHONTRACEMALLOC=16 python -m tests.realapp_heap`` (the test and the benchmark
do): tracing from interpreter start, as a user would run it.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import tracemalloc
from typing import Any

import httpx

from asgi_pprof import builder, heap_names
from tests import realapp

OURS = heap_names.PACKAGE_DIR


def _fact(body: str, key: str) -> str:
    m = re.search(rf"^# {re.escape(key)} = (.+)$", body, re.M)
    return m.group(1) if m else ""


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def measure(requests: int) -> dict[str, Any]:
    """Return timings (wall and process CPU seconds) of ``requests`` heap requests and more."""
    transport = httpx.ASGITransport(app=realapp.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=600) as c:
        for path in realapp.WARM_PATHS:
            assert (await c.get(path)).status_code == 200
        took: list[float] = []
        cpu: list[float] = []
        for _ in range(requests):
            t0, c0 = time.perf_counter(), time.process_time()
            r = await c.get("/debug/pprof/heap")
            took.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            assert r.status_code == 200, r.text
        t0, c0 = time.perf_counter(), time.process_time()
        text = (await c.get("/debug/pprof/heap?debug=1")).text
        text_took, text_cpu = time.perf_counter() - t0, time.process_time() - c0
    data = builder.decode(r.content)
    own = total = 0
    if tracemalloc.is_tracing():
        for stat in tracemalloc.take_snapshot().statistics("traceback"):
            total += stat.size
            if any(f.filename.startswith(OURS) for f in stat.traceback):
                own += stat.size
    return {
        "frames": tracemalloc.get_traceback_limit(),
        "took": took,
        "cpu": cpu,
        "text_took": text_took,
        "text_cpu": text_cpu,
        "stacks": len(data.samples),
        "profile_bytes": sum(s.values[1] for s in data.samples),
        "ours_in_profile": sum(
            s.values[1] for s in data.samples if any(f.filename.startswith(OURS) for f in s.stack)
        ),
        "own_truth": own,
        "traced_total": total,
        "own_bytes_fact": int(_fact(text, "asgi_pprof.own_bytes") or 0),
        "frames_fact": _fact(text, "asgi_pprof.names.frames"),
        "seed_seen": any("realapp.Store.seed" in f.function for s in data.samples for f in s.stack),
        "rss_mb": _rss_mb(),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 3))))
