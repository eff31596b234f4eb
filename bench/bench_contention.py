"""Block and mutex profiles: cost per lock operation and for a service, profiling off vs on.

1. Per operation (ns), uncontended and contended, ``threading.Lock`` and ``asyncio.Lock``:
   off (nothing hooked), on at rate 1 / fraction 1 (every event recorded) and sampled
   (block rate 10 us, mutex fraction 100). Rounds alternate the three, medians with
   (min..max), ratios against off measured in the same run.
2. A service (uvicorn subprocess, its loop on the main thread): a JSON route that takes
   a ``threading.Lock`` and an ``asyncio.Lock`` per request, block+mutex on (rate 1,
   fraction 1) vs off: requests/s, p99 and server CPU per request, A/B alternated.

Standalone: ``python bench/bench_contention.py`` (``make bench`` runs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from asgi_pprof import block, contention, create_app, loopstall
from bench.common import RefServer, ab_rounds, measure, med, report
from bench.refapp import render_items

ROUNDS = 5
OPS = 50_000
CONTENDED_OPS = 4_000
LOAD_S = 3.0
MODES: dict[str, tuple[int, int]] = {"off": (0, 0), "rate 1": (1, 1), "sampled": (10_000, 100)}


# --- the service ----------------------------------------------------------------------------


async def locked_items(request: Request) -> JSONResponse:
    app_state = request.app.state
    with app_state.tlock:
        body = render_items(50)
    async with app_state.alock:
        return JSONResponse(body)


def _make_app() -> Starlette:
    block.configure_from_env()
    loopstall.configure_from_env()
    watch = os.environ.get("BENCH_WATCH_LOOP") == "1"

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if watch:
            loopstall.watch()  # from the start, as if a scraper had been asking
        yield

    app = Starlette(
        routes=[Route("/items", locked_items), Mount("/debug/pprof", app=create_app())],
        lifespan=lifespan,
    )
    app.state.tlock = threading.Lock()
    app.state.alock = asyncio.Lock()
    return app


app = _make_app() if os.environ.get("BENCH_CONTENTION_APP") == "1" else None


class Server(RefServer):
    """This module's app under uvicorn in its own process, with ``env`` set."""

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(
            {"BENCH_CONTENTION_APP": "1", **env}, app="bench.bench_contention:app", ready="/items"
        )


# --- per operation ----------------------------------------------------------------------------


def thread_uncontended() -> float:
    lk = threading.Lock()
    t0 = time.perf_counter_ns()
    for _ in range(OPS):
        with lk:
            pass
    return (time.perf_counter_ns() - t0) / OPS


def thread_contended() -> float:
    lk = threading.Lock()
    n = CONTENDED_OPS

    def worker() -> None:
        for _ in range(n):
            with lk:
                time.sleep(0)  # hand the GIL (and so the lock) over inside the section

    ts = [threading.Thread(target=worker) for _ in range(2)]
    t0 = time.perf_counter_ns()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return (time.perf_counter_ns() - t0) / (2 * n)


def asyncio_uncontended() -> float:
    async def run() -> float:
        lk = asyncio.Lock()
        t0 = time.perf_counter_ns()
        for _ in range(OPS):
            async with lk:
                pass
        return (time.perf_counter_ns() - t0) / OPS

    return asyncio.run(run())


def asyncio_contended() -> float:
    async def run() -> float:
        lk = asyncio.Lock()
        n = CONTENDED_OPS

        async def worker() -> None:
            for _ in range(n):
                async with lk:
                    await asyncio.sleep(0)  # the other task queues up on the lock

        t0 = time.perf_counter_ns()
        await asyncio.gather(worker(), worker())
        return (time.perf_counter_ns() - t0) / (2 * n)

    return asyncio.run(run())


def per_op(name: str, fn: Callable[[], float]) -> None:
    results: dict[str, list[float]] = {m: [] for m in MODES}
    order = list(MODES)
    for i in range(ROUNDS):
        for mode in order if i % 2 == 0 else order[::-1]:
            rate, fraction = MODES[mode]
            block.set_block_profile_rate(rate)
            block.set_mutex_profile_fraction(fraction)
            try:
                results[mode].append(fn())
            finally:
                block.set_block_profile_rate(0)
                block.set_mutex_profile_fraction(0)
                contention.reset()
    base = statistics.median(results["off"])
    line = f"  {name:22s}"
    for mode in MODES:
        r = statistics.median(results[mode]) / base
        line += f" {mode} {med(results[mode])} ns (x{r:.2f})"
    print(line, flush=True)


def main() -> int:
    print("per lock operation (ns, median (min..max)), ratio against off:", flush=True)
    per_op("threading uncontended", thread_uncontended)
    per_op("threading contended", thread_contended)
    per_op("asyncio uncontended", asyncio_uncontended)
    per_op("asyncio contended", asyncio_contended)
    print(
        f"\nservice: /items with a threading.Lock and an asyncio.Lock per request, "
        f"{ROUNDS} x {LOAD_S:.0f} s alternated",
        flush=True,
    )
    off_env = {"ASGI_PPROF_BLOCK_PROFILE_RATE": "0", "ASGI_PPROF_MUTEX_PROFILE_FRACTION": "0"}
    on_env = {"ASGI_PPROF_BLOCK_PROFILE_RATE": "1", "ASGI_PPROF_MUTEX_PROFILE_FRACTION": "1"}
    with Server(off_env) as off, Server(on_env) as on:
        base, other = ab_rounds(
            ROUNDS,
            lambda: measure(off, "/items", LOAD_S),
            lambda: measure(on, "/items", LOAD_S),
        )
        report("block+mutex on", base, other)
        r = httpx.get(on.url + "/debug/pprof/block?debug=1").text
        print(f"  (block profile of the 'on' server: {r.count(' @ ')} records)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
