"""Goroutine profile: time to serve debug=0/1/2 with 100, 1 000 and 10 000 tasks, the
largest event-loop lag each request causes, and what creation tracking costs per task.

Standalone: ``python bench/bench_goroutine.py`` (``make bench`` runs it).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.routing import Mount

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asgi_pprof import create_app, tasks
from bench.common import LagMonitor

REPEATS = 5
TRACK_TASKS = 20_000
TRACK_ROUNDS = 7


async def bench_sleep() -> None:
    await asyncio.sleep(3600)


async def bench_event(ev: asyncio.Event) -> None:
    await ev.wait()


async def bench_queue(q: asyncio.Queue[int]) -> None:
    await q.get()


async def bench_gather() -> None:
    await asyncio.gather(bench_sleep(), bench_sleep())


def spread(xs: list[float]) -> str:
    """Return ``median [min-max]`` in milliseconds."""
    return f"{statistics.median(xs) * 1e3:7.1f} ms [{min(xs) * 1e3:.1f}-{max(xs) * 1e3:.1f}]"


async def serve(n: int) -> list[str]:
    ev = asyncio.Event()
    q: asyncio.Queue[int] = asyncio.Queue()
    kinds: list[Callable[[], Coroutine[Any, Any, None]]] = [
        bench_sleep,
        lambda: bench_event(ev),
        lambda: bench_queue(q),
        bench_gather,
    ]
    made = [asyncio.create_task(kinds[i % 4]()) for i in range(n)]
    await asyncio.sleep(0.05)
    total = len(asyncio.all_tasks())
    app = Starlette(routes=[Mount("/debug/pprof", app=create_app())])
    rows = []
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://bench"
    ) as c:
        await c.get("/debug/pprof/goroutine")  # warm up: worker thread, caches
        with LagMonitor() as idle:  # the same loop with no request: the floor
            await asyncio.sleep(0.3)
        rows.append(
            f"{n:>6} tasks ({total:>6} live)  no request: worst loop lag "
            f"{idle.worst * 1e3:5.1f} ms in 0.3 s"
        )
        for debug in (0, 1, 2):
            times, lags, size = [], [], 0
            for _ in range(REPEATS):
                with LagMonitor() as lag:
                    await asyncio.sleep(0.005)
                    t = time.perf_counter()
                    r = await c.get(f"/debug/pprof/goroutine?debug={debug}")
                    times.append(time.perf_counter() - t)
                    await asyncio.sleep(0.005)
                assert r.status_code == 200
                size = len(r.content)
                lags.append(lag.worst)
            rows.append(
                f"{n:>6} tasks ({total:>6} live)  debug={debug}  serve {spread(times)}  "
                f"worst loop lag {max(lags) * 1e3:5.1f} ms  body {size / 1024:8.1f} KiB"
            )
    for t in made:
        t.cancel()
    await asyncio.gather(*made, return_exceptions=True)
    return rows


async def noop() -> None:
    pass


async def create_many(track: bool) -> float:
    if track:
        tasks.track_task_creation()
    t = time.perf_counter()
    for _ in range(TRACK_TASKS // 1000):
        await asyncio.gather(*[asyncio.create_task(noop()) for _ in range(1000)])
    return time.perf_counter() - t


def tracking_cost(runner: Callable[[Coroutine[Any, Any, float]], float]) -> str:
    base: list[float] = []
    tracked: list[float] = []
    for _ in range(TRACK_ROUNDS):  # alternate A/B so drift hits both alike
        base.append(runner(create_many(False)))
        tracked.append(runner(create_many(True)))
    per_base = [b / TRACK_TASKS * 1e6 for b in base]
    per_tracked = [t / TRACK_TASKS * 1e6 for t in tracked]
    diffs = [t - b for t, b in zip(per_tracked, per_base, strict=True)]
    med_b, med_t = statistics.median(per_base), statistics.median(per_tracked)
    return (
        f"create+run a task: baseline {med_b:.2f} us [{min(per_base):.2f}-{max(per_base):.2f}], "
        f"tracked {med_t:.2f} us [{min(per_tracked):.2f}-{max(per_tracked):.2f}]; tracking costs "
        f"{statistics.median(diffs):.2f} us per task [{min(diffs):.2f}-{max(diffs):.2f}] "
        f"({TRACK_ROUNDS} alternated rounds of {TRACK_TASKS} tasks)"
    )


def main() -> int:
    print(f"python {sys.version.split()[0]}; {REPEATS} requests each, median [min-max]")
    for name, runner in loops():
        print(f"-- {name} loop")
        for n in (100, 1000, 10_000):
            for row in runner(serve(n)):
                print(row, flush=True)
        print(tracking_cost(runner), flush=True)
    return 0


def loops() -> list[tuple[str, Callable[[Coroutine[Any, Any, Any]], Any]]]:
    out: list[tuple[str, Callable[[Coroutine[Any, Any, Any]], Any]]] = [("asyncio", asyncio.run)]
    try:
        import uvloop
    except ImportError:
        return out
    out.append(("uvloop", uvloop.run))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
