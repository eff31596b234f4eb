"""Heap and allocs cost: tracemalloc's price on the reference app, and serving a big heap.

Prints (1) throughput, p99 and server CPU per request of the reference app with tracemalloc
off vs on with 1 frame and with the default frames (A/B alternated rounds, medians with
spread, ratios against the baseline of the same run) and each server's RSS; (2) the time to
serve ``heap`` (proto and text) for 10k, 100k and 1M live traced blocks, how long taking the
snapshot held the GIL, and the largest event-loop lag each request caused; (3) on a FastAPI
app of realistic size (tests/realapp.py) traced from interpreter start at 1 and 16
frames, the first and later ``heap``'s wall and CPU time and asgi_pprof's own share of
the traced bytes (left out of the profile), and at 16 frames once on the pure-Python
path; (4) the cost of ``allocs``: the GC-trigger sampler's overhead per collection and the
time to serve it.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from starlette.applications import Starlette
from starlette.routing import Mount

from asgi_pprof import create_app, gcsampler, heap
from bench.common import LagMonitor, RefServer, compare_to_base, med

ROUND_S = 2.0
ROUNDS = 3
FRAMES = heap.DEFAULT_FRAMES


def mounted() -> Starlette:
    """Return a parent app with pprof mounted at /debug/pprof, as users run it."""
    return Starlette(routes=[Mount("/debug/pprof", app=create_app())])


def rss_mb(server: RefServer) -> float:
    """Return the server process's resident set size in MB."""
    assert server.proc is not None
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def throughput() -> None:
    print(
        f"== reference app under load: tracemalloc off vs 1 frame vs {FRAMES} frames "
        f"({ROUNDS} rounds of {ROUND_S:.0f} s each side, alternated)"
    )
    variants = {"off": "0", "1 frame": "1", f"{FRAMES} frames": str(FRAMES)}
    servers = {name: RefServer({"BENCH_TRACEMALLOC": frames}) for name, frames in variants.items()}
    for s in servers.values():
        s.__enter__()
    try:
        compare_to_base(servers, "off", ("/items?n=50", "/hello"), ROUNDS, ROUND_S)
        print(
            "  RSS after the runs: "
            + ", ".join(f"{n} {rss_mb(s):.0f} MB" for n, s in servers.items())
        )
    finally:
        for s in servers.values():
            s.__exit__(None, None, None)


# --- serving a big heap ------------------------------------------------------------------------


def _left(k: int, bits: int, n: int) -> list[bytes]:
    if k == 0:
        return [bytes(8) for _ in range(n)]
    return (_left if bits & 1 else _right)(k - 1, bits >> 1, n)


def _right(k: int, bits: int, n: int) -> list[bytes]:
    if k == 0:
        return [bytes(16) for _ in range(n)]
    return (_left if bits & 1 else _right)(k - 1, bits >> 1, n)


def live_blocks(total: int, stacks: int = 1024) -> list[list[bytes]]:
    """Return ``total`` live blocks spread over ``stacks`` distinct allocation stacks."""
    depth = stacks.bit_length() - 1
    return [_left(depth, bits, total // stacks) for bits in range(stacks)]


async def _serve_with_lag(client: httpx.AsyncClient, url: str) -> tuple[float, float, int]:
    """Return (seconds to serve, largest loop lag in s, body bytes) for one GET."""
    with LagMonitor() as lag:
        await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        r = await client.get(url)
        took = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    return took, lag.worst, len(r.content)


async def big_heaps() -> None:
    print(f"== serving heap with N live traced blocks ({FRAMES} frames, 1024 stacks; 2 runs, best)")
    transport = httpx.ASGITransport(app=mounted())
    async with httpx.AsyncClient(transport=transport, base_url="http://b", timeout=300) as c:
        # Warm the name caches while tracing, then drop the session: what they hold is
        # then allocated before the measured sessions start, so N is what is traced.
        tracemalloc.start(FRAMES)
        warm = live_blocks(1024)
        await c.get("/debug/pprof/heap?debug=1")
        await c.get("/debug/pprof/allocs")
        tracemalloc.stop()
        del warm
        for n in (10_000, 100_000, 1_000_000):
            tracemalloc.start(FRAMES)
            try:
                blocks = live_blocks(n)
                traced = tracemalloc.get_traced_memory()[0]
                overhead = tracemalloc.get_tracemalloc_memory()
                for path in ("heap", "heap?debug=1", "allocs"):
                    runs = []
                    for _ in range(2):
                        took, lag, size = await _serve_with_lag(c, f"/debug/pprof/{path}")
                        runs.append((took, lag, heap.last_snapshot.copy_seconds, size))
                    took, lag, snap, size = min(runs)
                    print(
                        f"  {n:>9,} blocks ({heap.last_snapshot.blocks:>9,} traced, "
                        f"{traced / 1e6:5.0f} MB) {path:13s} served in {took * 1e3:7.0f} ms, "
                        f"snapshot held the GIL {snap * 1e3:6.1f} ms, largest loop lag "
                        f"{lag * 1e3:6.1f} ms, body {size / 1e6:6.2f} MB"
                    )
                print(
                    f"  {n:>9,} blocks: tracemalloc's own memory {overhead / 1e6:.0f} MB "
                    f"({overhead / n:.0f} B per block)"
                )
                del blocks
            finally:
                tracemalloc.stop()


# --- allocs ------------------------------------------------------------------------------------


def pile_up(n: int) -> list[list[int]]:
    return [[i] for i in range(n)]


def json_like(n: int) -> int:
    total = 0
    for _ in range(n):
        total += len([{"id": i, "tags": ["a", "b"]} for i in range(50)])
    return total


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def allocs_cost() -> None:
    print("== allocs: the GC-trigger sampler (on gc.callbacks, installed on first allocs use)")
    sampler = gcsampler.sampler
    for name, work in (
        ("pile_up 200k lists (a collection every threshold0 containers)", lambda: pile_up(200_000)),
        ("json_like 2k requests (temporaries only: few collections)", lambda: json_like(2_000)),
    ):
        on: list[float] = []
        off: list[float] = []
        collections = 0
        for i in range(16):
            for installed in (i % 2 == 0, i % 2 != 0):
                (sampler.install if installed else sampler.uninstall)()
                before = sum(s["collections"] for s in gc.get_stats())
                dt = _time(work)
                (on if installed else off).append(dt)
                if installed:
                    collections += sum(s["collections"] for s in gc.get_stats()) - before
        sampler.install()
        print(
            f"  {name}: off {med([x * 1e3 for x in off])} ms, on {med([x * 1e3 for x in on])} ms, "
            f"ratio {statistics.median(on) / statistics.median(off):.3f}; "
            f"{collections / len(on):.0f} collections per run"
        )


def _at_depth(depth: int, fn: Callable[[], float]) -> float:
    return _at_depth(depth - 1, fn) if depth else fn()


def callback_cost() -> None:
    """Print the sampler's own cost per collection: its two callbacks at a 40-frame stack."""
    sampler = gcsampler.sampler
    info = {"generation": 0, "collected": 0, "uncollectable": 0}
    n = 20_000

    def calls() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            sampler._callback("start", info)
            sampler._callback("stop", info)
        return (time.perf_counter() - t0) / n

    best = min(_at_depth(40, calls) for _ in range(5))
    print(f"  the sampler's two callbacks per collection, 40-frame stack: {best * 1e6:.1f} µs")


async def allocs_serve() -> None:
    transport = httpx.ASGITransport(app=mounted())
    async with httpx.AsyncClient(transport=transport, base_url="http://b", timeout=300) as c:
        kept = [pile_up(20_000) for _ in range(5)]
        took, lag, size = await _serve_with_lag(c, "/debug/pprof/allocs")
        stacks = len(gcsampler.sampler.data)
        print(
            f"  serving allocs with tracing off ({stacks} GC-trigger stacks): {took * 1e3:.0f} ms, "
            f"largest loop lag {lag * 1e3:.1f} ms, body {size / 1e3:.0f} kB"
        )
        del kept


# --- the realistic app under PYTHONTRACEMALLOC ---------------------------------------------------


def realapp(frames: int, runs: int = 2, requests: int = 4, native: bool = True) -> None:
    """Print heap serve time (wall, process CPU) and our own share, tests/realapp.py traced.

    ``native=False`` runs the pure-Python path (``ASGI_PPROF_NO_NATIVE=1``) for comparison.
    """
    import json
    import os
    import subprocess

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONTRACEMALLOC": str(frames), "PYTHONPATH": str(root)}
    env["ASGI_PPROF_NO_NATIVE"] = "" if native else "1"
    results = []
    for _ in range(runs):  # fresh processes: the first request is the cold one
        out = subprocess.run(
            [sys.executable, "-m", "tests.realapp_heap", str(requests)],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=True,
        ).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    first = [r["took"][0] for r in results]
    first_cpu = [r["cpu"][0] for r in results]
    later = [t for r in results for t in r["took"][1:]]
    later_cpu = [t for r in results for t in r["cpu"][1:]]
    text = [r["text_took"] for r in results]
    r0 = results[-1]
    share = r0["own_truth"] / max(1, r0["traced_total"])
    path = "C grouping, naming and encoding" if native else "pure Python (ASGI_PPROF_NO_NATIVE=1)"
    print(
        f"== realistic FastAPI app (tests/realapp.py), PYTHONTRACEMALLOC={frames}, "
        f"{runs} processes x {requests} heap requests, {path}"
    )
    print(
        f"  {r0['stacks']:,} stacks, {r0['profile_bytes'] / 1e6:.1f} MB in the profile, "
        f"RSS {r0['rss_mb']:.0f} MB"
    )
    print(f"  first heap: wall {med(first)} s, CPU {med(first_cpu)} s (targets: < 5 s)")
    print(f"  later heap: wall {med(later)} s, CPU {med(later_cpu)} s (target: < 2 s)")
    print(f"  heap?debug=1 after those: wall {med(text)} s")
    print(
        f"  asgi_pprof's own traced bytes: {share:.1%} of all traced "
        f"({r0['own_truth'] / 1e6:.1f} MB), in the profile: {r0['ours_in_profile']} bytes"
    )


def main() -> None:
    only = sys.argv[1:]
    if not only or "throughput" in only:
        throughput()
    if not only or "heaps" in only:
        asyncio.run(big_heaps())
    if not only or "realapp" in only:
        for frames in (1, FRAMES):
            realapp(frames)
        realapp(FRAMES, runs=1, requests=2, native=False)
    if not only or "allocs" in only:
        allocs_cost()
        callback_cost()
        asyncio.run(allocs_serve())


if __name__ == "__main__":
    main()
