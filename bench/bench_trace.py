"""Execution trace cost: the reference app under load while a trace runs, and after.

Prints, in one run:

* the server's CPU per request with and without a trace being captured, on asyncio and
  on uvloop: every variant in one server process, rounds alternated (no trace; a trace
  with the C step hook; with the Python one; the C hook alone, no samplers; the samplers
  alone, no hook), medians with min..max, split into the event loop's thread and every
  other thread (the samplers), beside throughput and p99;
* deterministic counts (callgrind, when valgrind is installed): CPU instructions per
  request of the reference app with no trace and with each step hook alone, and per
  request-like cycle in-process (a protocol callback, the request's task with an ASGI
  scope, its done callback: uvicorn's three steps);
* in-process, what each part costs per request-like cycle (CPU time), with every part
  on, with either hook, and with the wall-clock sampler or the CPU subscription left out;
* the cost per event-loop step of each hook, the worst event-loop stall while a big
  trace is encoded, the same server before any trace and after traces ended (nothing
  must remain), and the size of a 5 s trace under load.

Loopback only, every load run bounded in time. Standalone: ``python bench/bench_trace.py``
(``make bench`` runs it).
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asgi_pprof import sampler, trace_hook, tracing
from asgi_pprof.concurrency import SleepWindow
from asgi_pprof.options import Options
from asgi_pprof.sampler import get_sampler
from bench.common import (
    LagMonitor,
    RefServer,
    ab_rounds,
    during,
    free_port,
    load,
    measure,
    med,
    quartiles,
    report,
)

ROUND_S = 2.0
ROUNDS = 6
PATHS = ("/items?n=50", "/hello")


def trace_url(srv: RefServer, seconds: float) -> str:
    return f"{srv.url}/debug/pprof/trace?seconds={seconds}"


LOOPS = ("asyncio", "uvloop")
"""uvicorn's event loops (UVICORN_LOOP): every step is seen on asyncio, none on uvloop."""


def _threads_cpu(pid: int) -> dict[int, float]:
    """Return each thread's CPU seconds so far, by kernel thread id: from schedstat (exact
    to the ns), else from stat (user + system, counted in 10 ms ticks)."""
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            try:
                out[int(task.name)] = int((task / "schedstat").read_text().split()[0]) / 1e9
            except FileNotFoundError:  # a kernel without schedstats
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            continue  # the thread ended
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


VARIANTS: dict[str, dict[str, str | None]] = {
    "asyncio": {
        "no trace": None,
        "trace, C hook": "hook=native",
        "trace, Python hook": "hook=python",
        "trace, C hook only": "hook=native&without=wall,cpu",
        "trace, samplers only": "without=hook",
    },
    "uvloop": {"no trace": None, "trace": ""},
}
"""Per loop: what each side of the comparison runs (``/bench/trace-variant``'s query)."""


def report_variants(res: dict[str, list[dict[str, float]]]) -> None:
    """Print medians with spread per variant: CPU per request (and its split), rps, p99."""
    base = res["no trace"]
    b_cpu = statistics.median(r["cpu_us_per_req"] for r in base)
    b_rps = statistics.median(r["rps"] for r in base)
    for name, rounds in res.items():
        cpu = [r["cpu_us_per_req"] for r in rounds]
        rps = [r["rps"] for r in rounds]
        print(
            f"  {name:22s} CPU/req {med(cpu):22s} us ({statistics.median(cpu) / b_cpu - 1:+.1%})"
            f"  loop {med([r['loop_us_per_req'] for r in rounds]):22s}"
            f"  other threads {med([r['other_us_per_req'] for r in rounds]):18s}"
            f"  rps {med(rps):26s} ({statistics.median(rps) / b_rps - 1:+.1%})"
            f"  p99 {med([r['p99_ms'] for r in rounds])} ms"
        )


def throughput() -> None:
    print(
        "== reference app under load: server CPU per request, no trace vs a trace being "
        "captured (one server per loop, every variant in it, rounds alternated)"
    )
    for loop in LOOPS:
        env = {"UVICORN_LOOP": loop, "BENCH_TRACE_VARIANTS": "1"}
        with RefServer(env=env) as srv:
            for path in PATHS:
                variants = VARIANTS[loop]
                res: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
                measure_threads(srv, path, 1.0)  # warm up
                for i in range(ROUNDS):
                    order = list(variants) if i % 2 == 0 else list(reversed(variants))
                    for name in order:
                        query = variants[name]
                        if query is None:
                            res[name].append(measure_threads(srv, path, ROUND_S))
                            continue
                        httpx.get(f"{srv.url}/bench/trace-variant?{query}").raise_for_status()
                        url = trace_url(srv, ROUND_S + 0.6)
                        with during(lambda url=url: httpx.get(url, timeout=120)):
                            res[name].append(measure_threads(srv, path, ROUND_S))
                print(f" loop {loop}, route {path}  ({ROUNDS} rounds of {ROUND_S:g} s per variant)")
                report_variants(res)


TWIN_VARIANTS: dict[str, str] = {
    "the whole trace, C hook": "hook=native",
    "the C hook alone": "hook=native&without=wall,cpu",
    "the samplers alone": "without=hook",
    "the CPU sampler alone": "without=hook,wall",
    "the wall-clock sampler alone": "without=hook,cpu",
    "nothing (the method's zero)": "without=hook,wall,cpu",
}
"""What ``side_by_side`` traces (``/bench/trace-variant``'s query), each against no trace."""


def side_by_side(rounds: int = 10, window: float = 2.0, loops: tuple[str, ...] = LOOPS) -> None:
    """The trace's cost per request against host noise: two identical servers on one core,
    loaded at once from the other core, one traced at a time, roles swapped each round.

    On this kind of shared VM the same work's CPU time drifts by up to 2x within seconds,
    so rounds of one server alternated in time (``throughput``) read ±10-15 %; two servers
    sharing one core see the same drift at the same moment, and the ratio of their CPU per
    request (every thread, from schedstat, over requests counted by the app) cancels it.
    The zero variant (a trace with every part left out) checks the method reads 1.00.
    """
    if shutil.which("taskset") is None or os.cpu_count() == 1:
        print("== side by side: needs taskset and two cores")
        return
    print(
        "== the trace's cost, side by side: two servers on core 0, loaded from core 1, one "
        f"traced per round, roles swapped ({rounds} rounds of {window:g} s): traced / untraced "
        "server CPU per request (median, quartiles), and the traced server's other threads"
    )
    for loop in loops:
        variants = TWIN_VARIANTS if loop == "asyncio" else {"the whole trace": ""}
        for path in PATHS:
            print(f" loop {loop}, route {path}")
            for name, query in variants.items():
                print(f"  {name:30s} {_twin(loop, path, query, rounds, window)}")


def _twin(loop: str, path: str, query: str, rounds: int, window: float) -> str:
    env = {"UVICORN_LOOP": loop, "BENCH_TRACE_VARIANTS": "1"}
    with RefServer(env=env) as a, RefServer(env=env) as b:
        srvs = [a, b]
        pids = [s.proc.pid for s in srvs if s.proc is not None]
        for pid in pids:
            for task in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(task), {0})  # new threads inherit it
        total = rounds * (window + 2.5) + 30
        loadgen = str(Path(__file__).parent / "loadgen.py")
        gens = [
            subprocess.Popen(
                ["taskset", "-c", "1", sys.executable, loadgen, s.url + path, str(total), "4"],
                stdout=subprocess.DEVNULL,
            )
            for s in srvs
        ]
        clients = [httpx.Client(base_url=s.url, timeout=120) for s in srvs]
        try:
            for c in clients:
                c.get(f"/bench/trace-variant?{query}").raise_for_status()
            time.sleep(2)  # warm up
            ratios: list[float] = []
            others: list[float] = []
            for i in range(rounds):
                k = i % 2  # the one traced this round
                got: dict[str, httpx.Response] = {}

                def trace(k: int = k, got: dict[str, httpx.Response] = got) -> None:
                    got["r"] = clients[k].get(f"/debug/pprof/trace?seconds={window + 0.5}")

                t = threading.Thread(target=trace)
                t.start()
                time.sleep(0.25)  # installed
                n0 = [int(c.get("/bench/served").text) for c in clients]
                s0 = [_threads_cpu(p) for p in pids]
                time.sleep(window)
                n1 = [int(c.get("/bench/served").text) for c in clients]
                s1 = [_threads_cpu(p) for p in pids]
                c0, c1 = [sum(x.values()) for x in s0], [sum(x.values()) for x in s1]
                loop = pids[k]  # the traced server's loop thread: its main thread
                l0, l1 = s0[k].get(loop, 0.0), s1[k].get(loop, 0.0)
                t.join()
                assert got["r"].status_code == 200, got["r"].text
                per = [(c1[j] - c0[j]) / max(1, n1[j] - n0[j]) for j in range(2)]
                ratios.append(per[k] / per[1 - k])
                others.append(((c1[k] - c0[k]) - (l1 - l0)) * 1e6 / max(1, n1[k] - n0[k]))
                time.sleep(0.3)  # the trace is written: outside the next window
        finally:
            for c in clients:
                c.close()
            for g in gens:
                g.kill()
                g.wait()
    q1, q3 = quartiles(ratios)
    return (
        f"x{statistics.median(ratios):.3f} ({q1:.3f}..{q3:.3f}); other threads "
        f"{statistics.median(others):.1f} us per request"
    )


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


class _NoCPU:
    """A CPU sampler stand-in that samples nothing: a trace without its CPU track."""

    period_ns = 10_000_000

    def subscribe(self, timeline: bool = False, on_main_tick: Any = None) -> Any:
        from asgi_pprof import sampler

        return sampler.Capture(period_ns=self.period_ns, timeline=[])

    def unsubscribe(self, cap: Any) -> None:
        pass

    def release_signal(self) -> None:
        pass


def cycle_cost(n: int = 20_000) -> None:
    print(f"== in-process: CPU per request-like cycle (3 loop steps, 1 task), {n} cycles")
    real_get_sampler = tracing.get_sampler
    real_sample = tracing._Recorder._sample

    def no_wall(self: Any) -> None:
        self._stopped.acquire()  # held until the capture ends: no samples

    variants: dict[str, Any] = {
        "everything": {},
        "everything, Py hook": {"native": False},
        "no wall sampler": {"sample": no_wall},
        "no CPU timeline": {"cpu": True},
        "hooks only": {"sample": no_wall, "cpu": True},
        "hooks only, Py hook": {"sample": no_wall, "cpu": True, "native": False},
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
                tracing._native_hook = v.get("native")
                try:
                    w = _Run(n)
                    await tracing.capture(0, w, Options())
                finally:
                    tracing._Recorder._sample = real_sample  # type: ignore[method-assign]
                    tracing.get_sampler = real_get_sampler
                    tracing._native_hook = None
                res[label].append(w.cpu)
        return res

    res = asyncio.run(main())
    base = statistics.median(res["no trace"])
    for label, xs in res.items():
        per = [x / n * 1e6 for x in xs]
        m = statistics.median(xs)
        print(
            f"  {label:20s} {med(per)} us of loop-thread CPU per cycle "
            f"(+{(m - base) / n * 1e6:.2f} us, x{m / base:.3f})"
        )


def sampler_cost(rounds: int = 6, seconds: float = 2.0) -> None:
    print(
        "== in-process: the samplers' own threads over a busy loop of short steps (thread CPU "
        f"clocks and voluntary context switches, {rounds} captures of {seconds:g} s per variant, "
        "alternated): their cost is per second, so per request it is this share of a loop kept "
        "busy by requests. 'racing': the trace's wall-clock sampler waiting on a plain lock "
        "(the Python hook's wait), the GIL raced for instead of handed over by the next step"
    )

    def by_name() -> dict[str, tuple[float, int]]:
        out = {}
        for th in threading.enumerate():
            if th.native_id is None or not th.name.startswith("asgi_pprof-"):
                continue
            try:
                cpu = time.clock_gettime(((~th.native_id) << 3) | 4 | 2)
                with open(f"/proc/self/task/{th.native_id}/status") as f:
                    switches = next(
                        int(x.split()[1]) for x in f if x.startswith("voluntary_ctxt_switches")
                    )
            except (OSError, StopIteration):
                continue
            out[th.name] = (cpu, switches)
        return out

    real_wait = tracing._Recorder._sample_wait
    real_tick = tracing._Recorder._on_main_tick
    in_ticks = [0, 0.0]  # tick samples taken, their CPU on the loop's thread

    def racing(self: tracing._Recorder) -> Any:
        return self._stop_wait

    def no_tick(self: tracing._Recorder, frame: Any) -> None:
        pass

    def timed_tick(self: tracing._Recorder, frame: Any) -> None:
        t0, n0 = time.thread_time(), self.tick_samples
        real_tick(self, frame)
        if self.tick_samples != n0:
            in_ticks[0] += 1
            in_ticks[1] += time.thread_time() - t0

    async def profile(seconds: float) -> None:
        s = get_sampler(Options().sample_hz, Options().switch_interval)
        cap = s.subscribe()
        try:
            await asyncio.sleep(seconds)
        finally:
            s.unsubscribe(cap)
            s.release_signal()

    variants: dict[str, Any] = {
        "trace": lambda: tracing.capture(seconds + 0.5, SleepWindow(), Options()),
        "trace, samples in its thread only": lambda: tracing.capture(
            seconds + 0.5, SleepWindow(), Options()
        ),
        "trace, racing": lambda: tracing.capture(seconds + 0.5, SleepWindow(), Options()),
        "CPU profile": lambda: profile(seconds + 0.5),
        "CPU profile, rescans every 250 ms": lambda: profile(seconds + 0.5),
    }
    idle_rescan = sampler._IDLE_RESCAN_S

    async def main() -> dict[str, dict[str, list[tuple[float, float]]]]:
        stop = False

        async def busy() -> None:
            while not stop:
                sum(range(3000))
                await asyncio.sleep(0)

        res: dict[str, dict[str, list[tuple[float, float]]]] = {v: {} for v in variants}
        load = asyncio.ensure_future(busy())
        for i in range(rounds):
            for name in list(variants) if i % 2 == 0 else list(reversed(variants)):
                wait = racing if "racing" in name else real_wait
                tracing._Recorder._sample_wait = wait  # type: ignore[method-assign]
                tick = timed_tick if name == "trace" else no_tick
                tracing._Recorder._on_main_tick = tick  # type: ignore[method-assign]
                sampler._IDLE_RESCAN_S = 0.25 if "250 ms" in name else idle_rescan
                try:
                    cap = asyncio.ensure_future(variants[name]())
                    await asyncio.sleep(0.25)
                    a, t0 = by_name(), time.monotonic()
                    await asyncio.sleep(seconds)
                    b, t1 = by_name(), time.monotonic()
                    await cap
                finally:
                    tracing._Recorder._sample_wait = real_wait  # type: ignore[method-assign]
                    tracing._Recorder._on_main_tick = real_tick  # type: ignore[method-assign]
                    sampler._IDLE_RESCAN_S = idle_rescan
                total = (0.0, 0.0)  # per round: a thread seen in one round only counts there
                for th, (cpu, sw) in b.items():
                    if th in a:
                        got = ((cpu - a[th][0]) / (t1 - t0) * 1e3, (sw - a[th][1]) / (t1 - t0))
                        res[name].setdefault(th, []).append(got)
                        total = (total[0] + got[0], total[1] + got[1])
                res[name].setdefault("all of them", []).append(total)
        stop = True
        await load
        return res

    res = asyncio.run(main())
    for name, threads in res.items():
        print(f"  {name}")
        for th, xs in threads.items():
            ms = [x[0] for x in xs]
            sw = [x[1] for x in xs]
            print(
                f"    {th:20s} {med(ms)} ms of CPU per second "
                f"({statistics.median(ms) / 10:.2f} % of a core), {med(sw)} switches per second"
            )
    base = statistics.median(x[0] for x in res["trace, racing"]["all of them"])
    one = statistics.median(x[0] for x in res["trace, samples in its thread only"]["all of them"])
    now = statistics.median(x[0] for x in res["trace"]["all of them"])
    print(f"  the trace's samplers, handed the GIL / racing for it: x{one / max(base, 1e-9):.2f}")
    per_s = in_ticks[0] / (rounds * seconds) if in_ticks[0] else 0.0
    on_loop = in_ticks[1] / max(1, in_ticks[0]) * 1e6
    print(
        f"  ... and with samples in the main thread's CPU ticks / in its thread only: "
        f"x{now / max(one, 1e-9):.2f}; the tick samples: ~{per_s:.0f} a second (counted over "
        f"each whole capture), {on_loop:.0f} us of the loop's CPU each "
        f"({per_s * on_loop / 1e4:.2f} % of a core)"
    )
    base = statistics.median(x[0] for x in res["CPU profile, rescans every 250 ms"]["all of them"])
    now = statistics.median(x[0] for x in res["CPU profile"]["all of them"])
    print(
        f"  the CPU profile's sampler, idle rescans every {idle_rescan:g} s / every 250 ms: "
        f"x{now / max(base, 1e-9):.2f}"
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
    print(
        "== in-process: cost per event-loop step of each step hook "
        "(await asyncio.sleep(0) loop, 100 000 steps, 7 rounds alternated)"
    )
    n = 100_000
    hooks = {"C hook": True, "Python hook": False}
    if not trace_hook.available():
        print(f"  (no C hook: {trace_hook.unavailable_reason()})")
        del hooks["C hook"]

    async def main() -> dict[str, list[float]]:
        res: dict[str, list[float]] = {"no trace": []}
        for label in hooks:
            res[label] = []
            res[label + ", 1000 Hz sampler"] = []
        for i in range(7):
            res["no trace"].append(await _steps(n))
            for label, native in hooks.items() if i % 2 == 0 else reversed(hooks.items()):
                tracing._native_hook = native
                try:
                    for tail, hz in (("", 1), (", 1000 Hz sampler", 1000)):
                        w = _During(n)
                        await tracing.capture(0, w, Options(trace_sample_hz=hz))
                        res[label + tail].append(w.took)
                finally:
                    tracing._native_hook = None
        return res

    res = asyncio.run(main())
    base = statistics.median(res["no trace"])
    for label, xs in res.items():
        per = [x / n * 1e9 for x in xs]
        print(
            f"  {label:30s} {med(per)} ns per step "
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


def _hooks_only_cycles(mode: str, n: int) -> None:
    """Run ``n`` request-like cycles with no trace (``none``) or with only a step hook
    (``native``, ``python``: no samplers), the recorder installed directly (no JSON)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if mode == "none":
            await _cycles(loop, n)
            return
        tracing._native_hook = mode == "native"
        tracing._Recorder._sample = lambda self: self._stop.wait()  # type: ignore[method-assign]
        tracing.get_sampler = lambda hz, si: _NoCPU()  # type: ignore[assignment, misc, return-value]
        rec = tracing._Recorder(loop, Options())
        rec.install()
        await _cycles(loop, n)
        rec.uninstall()
        assert len(rec.all_records()) >= 4 * n

    asyncio.run(main())


def _instructions(mode: str, n: int) -> int:
    """Return the CPU instructions a process running ``n`` cycles executes (callgrind)."""
    out = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--cycles",
            mode,
            str(n),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    found = re.search(r"Collected : (\d+)", out.stderr)
    assert found, out.stderr
    return int(found.group(1))


def instructions() -> None:
    print(
        "== in-process, deterministic: CPU instructions per request-like cycle (3 loop steps, "
        "1 task) of each step hook alone (callgrind, 6000 - 2000 cycles)"
    )
    if shutil.which("valgrind") is None:
        print("  (valgrind not installed)")
        return
    modes = ["none", "python"] + (["native"] if trace_hook.available() else [])
    per = {}
    for mode in modes:
        per[mode] = (_instructions(mode, 6000) - _instructions(mode, 2000)) / 4000
    for mode in modes:
        extra = per[mode] - per["none"]
        print(
            f"  {mode:7s} {per[mode]:9,.0f} instructions per cycle "
            f"(+{extra:,.0f}, x{per[mode] / per['none']:.3f})"
        )


def server_instructions(n: int = 300, path: str = "/hello", rounds: int = 3) -> None:
    print(
        f"== the reference app under callgrind, deterministic: CPU instructions per request "
        f"({path}, {n} sequential requests per round, {rounds} rounds alternated), no trace vs "
        f"a trace with each step hook alone, and the whole trace (C hook and both samplers: "
        f"they cost per second, and valgrind stretches a second of the app ~50 times, so their "
        f"share here is an upper bound; the timed run above has their real share)"
    )
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("  (valgrind not installed)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/callgrind"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "UVICORN_LOOP": "asyncio", "BENCH_TRACE_VARIANTS": "1"}
        proc = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}.%p",
                sys.executable,
                "-m",
                "uvicorn",
                "bench.refapp:app",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            cwd=Path(__file__).resolve().parent.parent,
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            _server_instructions(proc, url, out, n, path, rounds)
        finally:
            proc.terminate()
            proc.wait(60)


SERVER_VARIANTS: dict[str, str | None] = {
    "no trace": None,
    "C hook": "hook=native&without=wall,cpu",
    "Python hook": "hook=python&without=wall,cpu",
    "whole trace": "hook=native",
}
"""What the callgrind run of the reference app compares (``/bench/trace-variant``'s query)."""


def _server_instructions(
    proc: subprocess.Popen[bytes], url: str, out: str, n: int, path: str, rounds: int
) -> None:
    deadline = time.monotonic() + 300
    while True:
        try:
            httpx.get(url + "/hello", timeout=5)
            break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)

    def requests(k: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(k):
                client.get(path).raise_for_status()

    def per_request() -> float:
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        requests(n)
        before = set(glob.glob(out + "*"))
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        dump = max(set(glob.glob(out + "*")) - before, key=os.path.getmtime)
        found = re.search(r"^(?:summary|totals): (\d+)", Path(dump).read_text(), re.M)
        assert found, dump
        return int(found.group(1)) / n

    requests(50)  # warm up
    res: dict[str, list[float]] = {v: [] for v in SERVER_VARIANTS}
    for i in range(rounds):
        for name in list(SERVER_VARIANTS) if i % 2 == 0 else list(reversed(SERVER_VARIANTS)):
            query = SERVER_VARIANTS[name]
            if query is None:
                res[name].append(per_request())
                continue
            httpx.get(f"{url}/bench/trace-variant?{query}", timeout=60).raise_for_status()
            with during(lambda: httpx.get(trace_url_of(url, 30), timeout=300)):
                time.sleep(2)
                res[name].append(per_request())
    base = statistics.median(res["no trace"])
    for name, xs in res.items():
        print(
            f"  {name:12s} {statistics.median(xs):9,.0f} instructions per request "
            f"({' '.join(f'{x:,.0f}' for x in xs)}; {statistics.median(xs) / base - 1:+.1%} "
            f"against no trace in the same run)"
        )


def trace_url_of(url: str, seconds: float) -> str:
    return f"{url}/debug/pprof/trace?seconds={seconds}"


def main() -> int:
    if sys.argv[1:2] == ["--cycles"]:
        _hooks_only_cycles(sys.argv[2], int(sys.argv[3]))
        return 0
    if sys.argv[1:2] == ["--callgrind"]:
        server_instructions()
        return 0
    if sys.argv[1:2] == ["--side-by-side"]:
        side_by_side()
        return 0
    if sys.argv[1:2] == ["--samplers"]:
        sampler_cost()
        return 0
    side_by_side()
    throughput()
    server_instructions()
    instructions()
    cycle_cost()
    sampler_cost()
    step_cost()
    encode_stall()
    after_trace()
    trace_size()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
