"""Execution trace cost: the reference app under load while a trace runs, and after.

Prints, in one run: throughput, p99 and server CPU per request with and without a trace
being captured (A/B alternated rounds, medians with min..max, ratio of medians); the
same before any trace and after traces ended (nothing must remain); the size of a 5 s
trace of the reference app under load; and, in-process, what the step hook and the
sampler cost per event-loop step and the worst event-loop stall while a big trace is
encoded. Loopback only, every load run bounded in time.

Standalone: ``python bench/bench_trace.py`` (``make bench`` runs it).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asgi_pprof import tracing
from asgi_pprof.concurrency import SleepWindow
from asgi_pprof.options import Options
from bench.common import LagMonitor, RefServer, ab_rounds, during, measure, med, report

ROUND_S = 3.0
ROUNDS = 4
PATHS = ("/items?n=50", "/hello")


def trace_url(srv: RefServer, seconds: float) -> str:
    return f"{srv.url}/debug/pprof/trace?seconds={seconds}"


LOOPS = ("asyncio", "uvloop")
"""uvicorn's event loops (UVICORN_LOOP): every step is seen on asyncio, none on uvloop."""


def throughput() -> None:
    print("== reference app under load: no trace vs a trace being captured")
    for loop in LOOPS:
        with RefServer(env={"UVICORN_LOOP": loop}) as srv:
            for path in PATHS:

                def traced(path: str = path) -> dict[str, float]:
                    url = trace_url(srv, ROUND_S + 0.5)
                    with during(lambda: httpx.get(url, timeout=120)):
                        return measure(srv, path, ROUND_S)

                measure(srv, path, 1.0)  # warm up
                base, tr = ab_rounds(ROUNDS, lambda path=path: measure(srv, path, ROUND_S), traced)
                print(
                    f" loop {loop}, route {path}"
                    f"  ({ROUNDS} rounds of {ROUND_S:.0f} s each side, alternated)"
                )
                report("tracing", base, tr)


def after_trace() -> None:
    print("== once a trace has ended: a server never traced vs one traced twice before")
    path = PATHS[0]
    env = {"UVICORN_LOOP": "asyncio"}  # the loop where the most is hooked
    with RefServer(env=env) as fresh, RefServer(env=env) as traced:
        for _ in range(2):
            r = httpx.get(trace_url(traced, 1), timeout=60)
            assert r.status_code == 200, r.text
        measure(fresh, path, 1.0)  # warm up
        measure(traced, path, 1.0)
        base, after = ab_rounds(
            ROUNDS, lambda: measure(fresh, path, ROUND_S), lambda: measure(traced, path, ROUND_S)
        )
        print(f" loop asyncio, route {path}  ({ROUNDS} rounds each side, alternated)")
        report("after", base, after)


def trace_size() -> None:
    for loop in LOOPS:
        with RefServer(env={"UVICORN_LOOP": loop}) as srv:
            _trace_size(srv, loop)


def _trace_size(srv: RefServer, loop: str) -> None:
    print(f"== a 5 s trace of the reference app under load ({loop}, /items?n=50, 4 connections)")
    measure(srv, PATHS[0], 1.0)  # warm up
    out: dict[str, object] = {}

    def get_trace() -> None:
        t0 = time.perf_counter()
        r = httpx.get(trace_url(srv, 5), timeout=120)
        out["seconds"] = time.perf_counter() - t0
        out["body"] = r.content

    with during(get_trace):
        load = measure(srv, PATHS[0], 6.0)
    body = out["body"]
    assert isinstance(body, bytes)
    doc = json.loads(body)
    evs = doc["traceEvents"]
    kinds: dict[str, int] = {}
    for e in evs:
        kinds[e.get("cat", e["ph"])] = kinds.get(e.get("cat", e["ph"]), 0) + 1
    top = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:6])
    served = float(str(out["seconds"]))
    print(f"  {len(body) / 1e6:.1f} MB, {len(evs)} events ({len(evs) / 5:.0f} per second)")
    print(f"  by category: {top}")
    print(f"  {len(body) / max(1, load['rps'] * 5) / 1e3:.2f} kB per request traced")
    print(f"  response took {served:.2f} s for a 5 s window (capture end -> JSON sent)")
    print(f"  truncated: {doc['otherData']['truncated']}")


async def _steps(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        await asyncio.sleep(0)
    return time.perf_counter() - t0


class _During:
    """A window that runs a measured workload instead of sleeping."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.took = 0.0

    async def wait(self, seconds: float) -> bool:
        self.took = await _steps(self.n)
        return True


def step_cost() -> None:
    print("== in-process: cost per event-loop step (await asyncio.sleep(0) loop, 100 000 steps)")
    n = 100_000

    async def main() -> dict[str, list[float]]:
        res: dict[str, list[float]] = {"no trace": [], "hook, 1 Hz sampler": [], "1000 Hz": []}
        for _ in range(5):
            res["no trace"].append(await _steps(n))
            for label, hz in (("hook, 1 Hz sampler", 1), ("1000 Hz", 1000)):
                w = _During(n)
                await tracing.capture(0, w, Options(trace_sample_hz=hz))
                res[label].append(w.took)
        return res

    res = asyncio.run(main())
    base = statistics.median(res["no trace"])
    for label, xs in res.items():
        per = [x / n * 1e9 for x in xs]
        print(
            f"  {label:20s} {med(per)} ns per step "
            f"(+{(statistics.median(xs) - base) / n * 1e9:.0f} ns)"
        )


def encode_stall() -> None:
    print("== in-process: worst event-loop stall while a 200 000-event trace is encoded")

    async def main() -> tuple[float, float, int]:
        stop = False

        async def busy() -> None:
            while not stop:
                await asyncio.gather(*(asyncio.sleep(0) for _ in range(100)))

        opts = Options(trace_max_events=200_000)
        load = asyncio.ensure_future(busy())
        t0 = time.perf_counter()
        cap = asyncio.ensure_future(tracing.capture(1.0, SleepWindow(), opts))
        await asyncio.sleep(1.05)  # the window is over: what follows is encoding
        with LagMonitor() as lag:
            body = await cap
        took = time.perf_counter() - t0 - 1.0
        stop = True
        await load
        return lag.worst, took, len(body)

    worst, took, size = asyncio.run(main())
    print(f"  {size / 1e6:.1f} MB encoded in {took:.2f} s; worst loop stall {worst * 1e3:.1f} ms")


def main() -> int:
    step_cost()
    encode_stall()
    throughput()
    after_trace()
    trace_size()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
