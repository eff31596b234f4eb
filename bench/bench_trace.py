"""Execution trace cost: the reference app under load while a trace runs, and after.

Prints, in one run:

* the server's CPU per request with and without a trace being captured, on asyncio and
  on uvloop (A/B alternated rounds, medians with min..max, the ratio of the medians),
  split into the event loop's thread and every other thread (the samplers), beside
  throughput and p99;
* in-process, what each part costs per request-like cycle (a protocol callback, the
  request's task with an ASGI scope, its done callback: uvicorn's three steps), with
  every part on, and with the wall-clock sampler or the CPU subscription left out;
* the cost per event-loop step of the hook, the worst event-loop stall while a big trace
  is encoded, the same server before any trace and after traces ended (nothing must
  remain), and the size of a 5 s trace under load.

Loopback only, every load run bounded in time. Standalone: ``python bench/bench_trace.py``
(``make bench`` runs it).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asgi_pprof import tracing
from asgi_pprof.concurrency import SleepWindow
from asgi_pprof.options import Options
from bench.common import LagMonitor, RefServer, ab_rounds, during, load, measure, med, report

ROUND_S = 2.5
ROUNDS = 4
PATHS = ("/items?n=50", "/hello")


def trace_url(srv: RefServer, seconds: float) -> str:
    return f"{srv.url}/debug/pprof/trace?seconds={seconds}"


LOOPS = ("asyncio", "uvloop")
"""uvicorn's event loops (UVICORN_LOOP): every step is seen on asyncio, none on uvloop."""


def _threads_cpu(pid: int) -> dict[int, float]:
    """Return each thread's CPU seconds so far (user + system), by kernel thread id."""
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def measure_threads(srv: RefServer, path: str, seconds: float) -> dict[str, float]:
    """Return rps, p99 and the server's CPU per request: all, its loop thread's, the rest."""
    assert srv.proc is not None
    pid = srv.proc.pid
    a = _threads_cpu(pid)
    r = load(srv.url + path, seconds)
    b = _threads_cpu(pid)
    n = max(1, int(r["requests"]))
    loop_us = (b.get(pid, 0.0) - a.get(pid, 0.0)) * 1e6 / n  # uvicorn's loop: the main thread
    other_us = sum(v - a.get(t, 0.0) for t, v in b.items() if t != pid) * 1e6 / n
    return {
        "rps": r["requests"] / r["seconds"],
        "p99_ms": r["p99_ms"],
        "cpu_us_per_req": loop_us + other_us,
        "loop_us_per_req": loop_us,
        "other_us_per_req": other_us,
    }


def report_threads(base: list[dict[str, float]], other: list[dict[str, float]]) -> None:
    """Print medians with spread of both sides, ratios for rps, p99 and CPU per request."""
    for key in ("rps", "p99_ms", "cpu_us_per_req", "loop_us_per_req", "other_us_per_req"):
        a = [r[key] for r in base]
        b = [r[key] for r in other]
        ma, mb = statistics.median(a), statistics.median(b)
        tail = f"ratio {mb / ma:.3f}" if ma > 0 else f"+{mb - ma:.1f}"
        print(f"  {key:17s} no trace {med(a):26s} trace {med(b):26s} {tail}")


def throughput() -> None:
    print("== reference app under load: CPU per request, no trace vs a trace being captured")
    for loop in LOOPS:
        with RefServer(env={"UVICORN_LOOP": loop}) as srv:
            for path in PATHS:

                def traced(path: str = path) -> dict[str, float]:
                    url = trace_url(srv, ROUND_S + 0.5)
                    with during(lambda: httpx.get(url, timeout=120)):
                        return measure_threads(srv, path, ROUND_S)

                measure_threads(srv, path, 1.0)  # warm up
                base, tr = ab_rounds(
                    ROUNDS, lambda path=path: measure_threads(srv, path, ROUND_S), traced
                )
                print(
                    f" loop {loop}, route {path}"
                    f"  ({ROUNDS} rounds of {ROUND_S:g} s each side, alternated)"
                )
                report_threads(base, tr)


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


class _Cycle:
    """What uvicorn's RequestResponseCycle holds that the trace looks at: the scope."""

    def __init__(self, i: int) -> None:
        self.scope = {
            "type": "http",
            "method": "GET",
            "path": f"/items/{i % 100}",
            "path_params": {"item_id": i % 100},
            "endpoint": None,
        }

    async def run_asgi(self, app: object) -> None:
        sum(range(200))  # a little work, done in one step as small requests are


def _cycles(loop: asyncio.AbstractEventLoop, n: int) -> asyncio.Future[None]:
    """Run ``n`` request-like cycles, one after the other; return when all are done."""
    done: asyncio.Future[None] = loop.create_future()
    tasks: set[asyncio.Task[None]] = set()
    left = [n]

    def finished(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        left[0] -= 1
        if left[0] == 0:
            done.set_result(None)
        else:
            loop.call_soon(data_received, left[0])

    def data_received(i: int) -> None:  # the protocol callback
        task = loop.create_task(_Cycle(i).run_asgi(None))
        tasks.add(task)
        task.add_done_callback(finished)

    loop.call_soon(data_received, n)
    return done


class _Run:
    """A window that runs ``n`` request-like cycles and keeps their CPU time."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.cpu = 0.0

    async def wait(self, seconds: float) -> bool:
        t0 = time.thread_time()
        await _cycles(asyncio.get_running_loop(), self.n)
        self.cpu = time.thread_time() - t0
        return True


def cycle_cost() -> None:
    print("== in-process: CPU per request-like cycle (3 loop steps, 1 task), 20 000 cycles")
    n = 20_000
    from asgi_pprof import sampler

    real_get_sampler = tracing.get_sampler
    real_sample = tracing._Recorder._sample

    class _NoCPU:
        period_ns = 10_000_000

        def subscribe(self, timeline: bool = False) -> Any:
            return sampler.Capture(period_ns=self.period_ns, timeline=[])

        def unsubscribe(self, cap: Any) -> None:
            pass

        def release_signal(self) -> None:
            pass

    def no_wall(self: Any) -> None:
        self._stop.wait()

    variants: dict[str, Any] = {
        "everything": {},
        "no wall sampler": {"sample": no_wall},
        "no CPU timeline": {"cpu": True},
        "hooks only": {"sample": no_wall, "cpu": True},
    }

    async def main() -> dict[str, list[float]]:
        res: dict[str, list[float]] = {"no trace": [], **{k: [] for k in variants}}
        loop = asyncio.get_running_loop()
        for _ in range(5):
            t0 = time.thread_time()
            await _cycles(loop, n)
            res["no trace"].append(time.thread_time() - t0)
            for label, v in variants.items():
                tracing._Recorder._sample = v.get("sample", real_sample)  # type: ignore[method-assign]
                tracing.get_sampler = (
                    (lambda hz, si: _NoCPU()) if v.get("cpu") else real_get_sampler
                )  # type: ignore[assignment, misc]
                try:
                    w = _Run(n)
                    await tracing.capture(0, w, Options())
                finally:
                    tracing._Recorder._sample = real_sample  # type: ignore[method-assign]
                    tracing.get_sampler = real_get_sampler
                res[label].append(w.cpu)
        return res

    res = asyncio.run(main())
    base = statistics.median(res["no trace"])
    for label, xs in res.items():
        per = [x / n * 1e6 for x in xs]
        m = statistics.median(xs)
        print(
            f"  {label:16s} {med(per)} us of loop-thread CPU per cycle "
            f"(+{(m - base) / n * 1e6:.2f} us, x{m / base:.3f})"
        )


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
    throughput()
    cycle_cost()
    step_cost()
    encode_stall()
    after_trace()
    trace_size()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
