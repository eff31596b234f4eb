"""Goroutine profile: time and CPU to serve debug=0/1/2 with 1 000 and 10 000 tasks, the
worst event-loop lag each request causes against the lag any Python thread causes, full
collections during the requests, and what creation tracking costs per task.

The reading runs in a worker thread, so the loop only ever waits for the GIL. Two
baselines, measured in the same run and alternated with the requests, each as long as
a request took: the same loop's worst lag while a pure-Python busy thread runs (the
floor set by the GIL's 5 ms switch interval and the OS's scheduling; the reader gives
the GIL back every millisecond, so it can beat it), and with nothing running (the
OS's own noise). ``lag over floor`` is the request's cost to the loop beyond what any
Python thread costs; the target at 10 000 tasks is a worst lag of 10 ms.

Standalone: ``python bench/bench_goroutine.py`` (``make bench`` runs it).
"""

from __future__ import annotations

import asyncio
import gc
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
from bench.common import LagMonitor, med

PAIRS = 5
SIZES = (1000, 10_000)
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


def busy(seconds: float) -> None:
    """Run pure Python for ``seconds``: the GIL held as any thread holds it."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class FullCollections:
    """Counts full (generation 2) collections and their longest pause while open."""

    def __init__(self) -> None:
        self.count = 0
        self.longest = 0.0
        self._t = 0.0

    def _cb(self, phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.count += 1
            self.longest = max(self.longest, time.perf_counter() - self._t)

    def __enter__(self) -> FullCollections:
        gc.callbacks.append(self._cb)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._cb)


async def serve(n: int) -> list[str]:
    ev = asyncio.Event()
    q: asyncio.Queue[int] = asyncio.Queue()
    kinds: list[Callable[[], Coroutine[Any, Any, None]]] = [
        bench_sleep,
        lambda: bench_event(ev),
        lambda: bench_queue(q),
        bench_gather,
    ]
    made = [asyncio.create_task(kinds[i % 4](), name=f"worker-{i}") for i in range(n)]
    await asyncio.sleep(0.05)
    total = len(asyncio.all_tasks())
    app = Starlette(routes=[Mount("/debug/pprof", app=create_app())])
    rows = []
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://bench"
    ) as c:
        await c.get("/debug/pprof/goroutine?debug=2")  # warm up: worker thread, frames
        gc.collect()  # the workload's own debt to the collector, paid before measuring
        for debug in (0, 1, 2):
            times, cpus, lags, floors, idles, size = [], [], [], [], [], 0
            with FullCollections() as full:
                for i in range(PAIRS):
                    sides = ("request", "floor", "idle")
                    for side in sides if i % 2 == 0 else sides[::-1]:
                        took = statistics.median(times) if times else 0.2
                        if side == "floor":
                            with LagMonitor() as lag:
                                await asyncio.to_thread(busy, took)
                            floors.append(lag.worst)
                            continue
                        if side == "idle":
                            with LagMonitor() as lag:
                                await asyncio.sleep(took)
                            idles.append(lag.worst)
                            continue
                        with LagMonitor() as lag:
                            await asyncio.sleep(0.005)
                            t, cpu = time.perf_counter(), time.process_time()
                            r = await c.get(f"/debug/pprof/goroutine?debug={debug}")
                            times.append(time.perf_counter() - t)
                            cpus.append(time.process_time() - cpu)
                            await asyncio.sleep(0.005)
                        assert r.status_code == 200
                        size = len(r.content)
                        lags.append(lag.worst)
            over = [a - b for a, b in zip(lags, floors, strict=True)]
            rows.append(
                f"{n:>6} tasks ({total:>6} live) debug={debug}: serve ms {ms(times)}, "
                f"CPU ms/request {ms(cpus)}, body {size / 1024:.0f} KiB\n"
                f"{'':>8}worst loop lag ms {ms(lags)}, busy-thread floor ms {ms(floors)}, "
                f"idle loop ms {ms(idles)}, lag over floor ms {ms(over)}; "
                f"full collections {full.count}"
                + (f" (longest {full.longest * 1e3:.1f} ms)" if full.count else "")
            )
    for t in made:
        t.cancel()
    await asyncio.gather(*made, return_exceptions=True)
    return rows


def ms(xs: list[float]) -> str:
    """Return 'median (min..max)' of seconds, in milliseconds."""
    return med([x * 1e3 for x in xs])


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
    ratio = statistics.median(per_tracked) / statistics.median(per_base)
    return (
        f"create+run a task us: baseline {med(per_base)}, tracked {med(per_tracked)}, "
        f"ratio {ratio:.2f}; tracking costs {med(diffs)} us per task "
        f"({TRACK_ROUNDS} alternated rounds of {TRACK_TASKS} tasks)"
    )


def main() -> int:
    print(
        f"python {sys.version.split()[0]}; {PAIRS} alternated rounds (request, busy-thread "
        "floor, idle loop) each, median (min..max); client on the same loop (ASGITransport)"
    )
    for name, runner in loops():
        print(f"-- {name} loop")
        for n in SIZES:
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
