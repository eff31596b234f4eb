"""CPU profile cost: the reference app with and without a 100 Hz profile running.

Prints medians (min..max) of A/B-alternated rounds and the ratio against the baseline of
the same run; the sampler's cost per sample by thread count and stack depth; the largest
event-loop lag during a capture.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asgi_pprof import create_app
from asgi_pprof.sampler import get_sampler, sample_stack
from bench.common import LagMonitor, RefServer, ab_rounds, during, measure, med, report

ROUND_S = 4.0
ROUNDS = 6


def throughput() -> None:
    print("== reference app under load: no profiler vs a CPU profile at 100 Hz")
    with RefServer() as srv:
        for path in ("/items?n=50", "/hello"):

            def profiled(path: str = path) -> dict[str, float]:
                url = f"{srv.url}/debug/pprof/profile?seconds={int(ROUND_S) + 1}"
                with during(lambda: httpx.get(url, timeout=60)):
                    return measure(srv, path, ROUND_S)

            measure(srv, path, 1.0)  # warm up
            base, prof = ab_rounds(ROUNDS, lambda path=path: measure(srv, path, ROUND_S), profiled)
            print(f" route {path}  ({ROUNDS} rounds of {ROUND_S:.0f} s each side, alternated)")
            report("profiling", base, prof)


def _park(depth: int, ready: threading.Barrier, stop: threading.Event) -> None:
    if depth > 0:
        _park(depth - 1, ready, stop)
        return
    ready.wait()
    stop.wait()


def cost_per_sample() -> None:
    print("== sampler cost per sample (reading one thread's stack, GIL held)")
    for threads in (1, 8, 32):
        for depth in (10, 50, 200):
            stop = threading.Event()
            ready = threading.Barrier(threads + 1)
            ts = [threading.Thread(target=_park, args=(depth, ready, stop)) for _ in range(threads)]
            for t in ts:
                t.start()
            ready.wait()
            idents = [t.ident for t in ts]
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(20):
                    frames = sys._current_frames()
                    for ident in idents:
                        sample_stack(frames[ident])
                times.append((time.perf_counter() - t0) / 20)
            stop.set()
            for t in ts:
                t.join()
            per_batch = statistics.median(times)
            print(
                f"  threads {threads:3d} depth {depth:4d}: "
                f"{per_batch * 1e6 / threads:8.1f} us per thread-sample, "
                f"{per_batch * 1e6:9.1f} us if every thread ticks at once"
            )


def burn(stop: threading.Event) -> None:
    """Burn short CPU bursts at stack depth ~40 with sleeps: many samples, little GIL hogging."""

    def down(n: int) -> None:
        if n:
            down(n - 1)
            return
        while not stop.is_set():
            sum(i * i for i in range(5000))
            time.sleep(0.002)

    down(40)


async def _lag(capture: bool) -> float:
    transport = httpx.ASGITransport(app=create_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        with LagMonitor(0.002) as lag:
            if capture:
                r = await c.get("/profile?seconds=3", timeout=60)
                assert r.status_code == 200
            else:
                await asyncio.sleep(3)
    return lag.worst


def loop_lag() -> None:
    print("== largest event-loop lag (2 ms ticker; 4 bursty threads at depth 40), 3 s windows")
    stop = threading.Event()
    ts = [threading.Thread(target=burn, args=(stop,)) for _ in range(4)]
    for t in ts:
        t.start()
    base, cap = [], []
    for i in range(4):
        order = (False, True) if i % 2 == 0 else (True, False)
        for c in order:
            (cap if c else base).append(asyncio.run(_lag(c)) * 1e3)
    stop.set()
    for t in ts:
        t.join()
    print(f"  no capture   max lag ms {med(base)}")
    print(f"  capturing    max lag ms {med(cap)}  (capture + encode + gzip)")
    s = get_sampler(100, 0.0001)
    print(f"  sampler mode: {s.mode}; ticks {s.ticks}; overruns {s.overruns}")


def _contend(work: int) -> float:
    def crunch() -> None:
        sum(i * i for i in range(work))

    ts = [threading.Thread(target=crunch) for _ in range(2)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def switch_interval_cost() -> None:
    print("== cost of the lowered GIL switch interval for two CPU-bound threads (wall time)")
    saved = sys.getswitchinterval()
    a, b = [], []
    for i in range(6):
        for si in (saved, 0.0001) if i % 2 == 0 else (0.0001, saved):
            sys.setswitchinterval(si)
            (a if si == saved else b).append(_contend(3_000_000))
    sys.setswitchinterval(saved)
    ratio = statistics.median(b) / statistics.median(a)
    print(f"  switch {saved * 1e3:.1f} ms: {med(a)} s   0.1 ms: {med(b)} s   ratio {ratio:.3f}")


if __name__ == "__main__":
    switch_interval_cost()
    throughput()
    cost_per_sample()
    loop_lag()
