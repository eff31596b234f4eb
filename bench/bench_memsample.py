"""The sampled allocation profiler's cost, against tracemalloc's, in one run.

Prints (1) the reference app's throughput, p99 and server CPU per request with sampling
at 512 KiB vs off, and with tracemalloc at 1 and 16 frames (target for sampling: >= 0.98,
Go's "minimal overhead"), each variant its own server process; then sampling against no
hooks at all in one server process, switched between rounds (the fairer comparison);
(2) an allocation-heavy micro-benchmark, each variant in fresh
processes, alternated (target: <= 5 % slower): no hooks, hooks on at 512 KiB, hooks on
but the rate 0, tracemalloc 1 and 16 frames; (3) memory per sampled allocation and the
table after an hour-equivalent of the reference app's traffic; (4) the time to serve
``heap`` (proto and text) and the worst loop stall while serving it, for a small and a
very large table (target: < 5 ms stall).

Medians with (min..max) over alternated rounds. ``BENCH_QUICK=1`` runs fewer rounds.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    ROOT,
    LagMonitor,
    RefServer,
    ab_rounds,
    compare_to_base,
    load,
    measure,
    med,
    report,
)
from tests.workloads import distinct_stacks

QUICK = os.environ.get("BENCH_QUICK") == "1"
ROUND_S = 1.0 if QUICK else 2.0
ROUNDS = 2 if QUICK else 3
MICRO_ROUNDS = 3 if QUICK else 7
RATE = 512 * 1024


class SampledRefServer(RefServer):
    """bench/refapp.py plus the sampled heap/allocs at /sampled/debug/pprof (memsample_app)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        super().__init__(env, app="bench.memsample_app:app")


# --- (1) the reference app ------------------------------------------------------------------


def throughput() -> None:
    print(
        f"== reference app: memory sampling at {RATE // 1024} KiB vs off, and tracemalloc "
        f"({ROUNDS} rounds of {ROUND_S:.0f} s each side, alternated)"
    )
    variants = {
        "off": {"ASGI_PPROF_MEMORY_PROFILE_RATE": "0"},
        "sampled 512 KiB": {"ASGI_PPROF_MEMORY_PROFILE_RATE": str(RATE)},
        "tracemalloc 1": {"ASGI_PPROF_MEMORY_PROFILE_RATE": "0", "BENCH_TRACEMALLOC": "1"},
        "tracemalloc 16": {"ASGI_PPROF_MEMORY_PROFILE_RATE": "0", "BENCH_TRACEMALLOC": "16"},
    }
    servers = {name: SampledRefServer(env) for name, env in variants.items()}
    for s in servers.values():
        s.__enter__()
    try:
        compare_to_base(servers, "off", ("/items?n=50", "/hello"), ROUNDS, ROUND_S)
    finally:
        for s in servers.values():
            s.__exit__(None, None, None)


def throughput_in_process(rounds: int = 5 if QUICK else 12) -> None:
    print(
        f"== reference app, one server process: the hooks off (uninstalled) vs sampling at "
        f"{RATE // 1024} KiB, switched between rounds ({rounds} rounds of {ROUND_S:.0f} s "
        "each side, alternated): paired ratios of adjacent rounds, then the medians"
    )
    env = {"ASGI_PPROF_MEMORY_PROFILE_RATE": "0", "BENCH_MEMSAMPLE_TOGGLE": "1"}
    with SampledRefServer(env) as srv:

        def side(rate: int, path: str) -> Callable[[], dict[str, float]]:
            def run() -> dict[str, float]:
                httpx.get(f"{srv.url}/bench/memsample?rate={rate}").raise_for_status()
                return measure(srv, path, ROUND_S)

            return run

        for path in ("/items?n=50", "/hello"):
            measure(srv, path, 0.5)  # warm up
            off, on = ab_rounds(rounds, side(0, path), side(RATE, path))
            print(f" route {path}: hooks off vs sampled {RATE // 1024} KiB")
            for key in ("rps", "cpu_ms_per_req"):
                pairs = [b[key] / a[key] for a, b in zip(off, on, strict=True)]
                print(f"  {key:15s} paired ratio {med(pairs)}")
            report(f"sampled {RATE // 1024} KiB", off, on)


# --- (2) the allocation-heavy micro-benchmark ------------------------------------------------


def render_rows(n: int) -> list[dict[str, object]]:
    """Small dicts, lists, strings and floats: what a JSON handler allocates."""
    return [{"id": i, "name": f"item-{i}", "tags": ["a", "b"], "score": i * 0.5} for i in range(n)]


def _time_runs(runs: int = 7) -> float:
    """Return the least CPU seconds of ``runs`` runs of the workload (least: the run the
    other processes on a loaded machine disturbed least)."""
    times = []
    for _ in range(runs):
        t0 = time.thread_time()
        for _ in range(200):
            render_rows(200)
        times.append(time.thread_time() - t0)
    return min(times)


MICRO_VARIANTS = ["no hooks", "sampled", "hooked, rate 0", "tracemalloc 1", "tracemalloc 16"]


def micro_child() -> None:
    """Run in a child: time every variant, alternated in this process; print JSON seconds.

    Ratios are taken within one process (processes differ by more than the effect): the
    hooks go on and off between runs (``_memsample.uninstall``, a benchmark-only call).
    """
    import tracemalloc

    from asgi_pprof import _memsample, memprofile

    def variant(v: str) -> None:
        if v == "no hooks":
            memprofile.set_memory_profile_rate(0)
            _memsample.uninstall()
        else:
            _memsample.reset()
            memprofile.set_memory_profile_rate(RATE)  # puts the hooks (back) on
            if v == "hooked, rate 0":
                memprofile.set_memory_profile_rate(0)

    _time_runs(5)  # warm up: arenas, caches
    out: dict[str, list[float]] = {v: [] for v in MICRO_VARIANTS}
    plain = MICRO_VARIANTS[:3]
    for i in range(6):
        for v in plain if i % 2 == 0 else plain[::-1]:
            variant(v)
            out[v].append(_time_runs(3))
    variant("no hooks")
    for frames in (1, 16):
        tracemalloc.start(frames)
        out[f"tracemalloc {frames}"].append(_time_runs(3))
        tracemalloc.stop()
    print(json.dumps({v: min(t) for v, t in out.items()}))


def micro() -> None:
    print(
        "== allocation-heavy micro-benchmark: 200 x render_rows(200) (~40 k dicts), least CPU "
        f"time of its runs; ratios to 'no hooks' within each of {MICRO_ROUNDS} processes"
    )
    ratios: dict[str, list[float]] = {v: [] for v in MICRO_VARIANTS}
    ms: dict[str, list[float]] = {v: [] for v in MICRO_VARIANTS}
    env = {**os.environ, "ASGI_PPROF_MEMORY_PROFILE_RATE": "0"}
    for _ in range(MICRO_ROUNDS):
        out = subprocess.run(
            [sys.executable, __file__, "--micro"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            env=env,
            timeout=300,
        )
        r = json.loads(out.stdout)
        for v in MICRO_VARIANTS:
            ratios[v].append(r[v] / r["no hooks"])
            ms[v].append(r[v] * 1e3)
    for v in MICRO_VARIANTS:
        pct = [100 * (x - 1) for x in ratios[v]]
        print(f"  {v:15s} {med(ms[v]):30s} ms   slower by {med(pct)} %")


# --- (3) the table's memory -------------------------------------------------------------------


def table_child() -> None:
    """Run in a child: bytes of table per live sample at rate 1, 100 k live objects."""
    from asgi_pprof import _memsample, memprofile

    memprofile.set_memory_profile_rate(1)
    kept = [bytes(100) for _ in range(100_000)]
    memprofile.set_memory_profile_rate(0)
    st = memprofile.stats()
    print(json.dumps({"live": st["live"], "table_bytes": st["table_bytes"], "n": len(kept)}))
    del _memsample


def table() -> None:
    print("== the table's memory")
    out = subprocess.run(
        [sys.executable, __file__, "--table"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=300,
    )
    r = json.loads(out.stdout)
    print(
        f"  100 k live sampled objects (rate 1, one stack): table {r['table_bytes'] / 1e6:.1f} MB, "
        f"{r['table_bytes'] / r['live']:.0f} B per live sampled allocation"
    )
    # An hour of the reference app at 512 KiB has as many samples as a run sampled at
    # 512 KiB * (run seconds / 3600) of the same traffic: sample densely for a short run.
    seconds = 5.0 if QUICK else 10.0
    dense = max(1, int(RATE * seconds / 3600))
    with SampledRefServer({"ASGI_PPROF_MEMORY_PROFILE_RATE": str(dense)}) as srv:
        r0 = load(srv.url + "/items?n=50", seconds)
        text = httpx.get(srv.url + "/sampled/debug/pprof/allocs?debug=1", timeout=60).text
    facts = dict(
        line[2:].split(" = ", 1)
        for line in text.splitlines()
        if line.startswith("# ") and " = " in line
    )
    rps = r0["requests"] / r0["seconds"]
    print(
        f"  /items?n=50 for {seconds:.0f} s at rate {dense} B ({rps:.0f} "
        f"rps there): as many samples as an hour at 512 KiB at that throughput: "
        f"{facts.get('sampler.samples')} samples, {facts.get('sampler.buckets')} buckets, "
        f"{facts.get('sampler.stacks')} stacks, {facts.get('sampler.live')} live, "
        f"table {int(facts.get('sampler.table_bytes', '0')) / 1e6:.2f} MB"
    )


# --- (4) serving heap -------------------------------------------------------------------------


def serve_child() -> None:
    """Run in a child: serve heap (proto, text) with a small and a very large table."""
    asyncio.run(_serve())


_CLIENT = """
import sys, time, urllib.request
for url in sys.stdin:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url.strip(), timeout=600) as r:
        size = len(r.read())
    print(time.perf_counter() - t0, size, flush=True)
"""


class _Client:
    """A client in another process, started once: no fork while the stall is measured."""

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CLIENT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )

    async def get(self, url: str) -> tuple[float, int]:
        """Return (seconds, body bytes) of one GET."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(url.encode() + b"\n")
        await self.proc.stdin.drain()
        took, size = (await self.proc.stdout.readline()).split()
        return float(took), int(size)

    async def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        await self.proc.wait()


async def _serve() -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from asgi_pprof import create_app, memprofile
    from asgi_pprof.sampled_heap import SampledAllocsProfile, SampledHeapProfile

    app = Starlette(
        routes=[
            Mount(
                "/debug/pprof",
                app=create_app(profiles=[SampledHeapProfile(), SampledAllocsProfile()]),
            )
        ]
    )
    # A real server on this loop, a client in another process: the stall measured is the
    # server's alone (an in-process client joins a 140 MB body on the loop itself, and
    # starting a client per request forks this process on the loop).
    config = uvicorn.Config(app, host="127.0.0.1", port=0, loop="asyncio", log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    client = _Client()
    await client.start()
    kept = []
    for n_funcs in (100, 2_000, 10_000):
        memprofile.set_memory_profile_rate(1)  # every allocation: buckets = stacks x sizes
        for fn in distinct_stacks(n_funcs):
            kept.append(fn())
        memprofile.set_memory_profile_rate(0)
        buckets = memprofile.stats()["buckets"]
        for path in ("heap", "heap?debug=1"):
            # The first read of new stacks names them and fills the encoder's caches (one
            # young collection then sees those caches); later reads are a scraper's.
            runs = []
            for _ in range(3):
                with LagMonitor() as lag:
                    await asyncio.sleep(0.01)
                    took, size = await client.get(f"http://127.0.0.1:{port}/debug/pprof/{path}")
                    await asyncio.sleep(0.01)
                runs.append((took, lag.worst, size))
            first, later = runs[0], min(runs[1:])
            print(
                f"  {buckets:>7,} buckets {path:13s} body {first[2] / 1e6:6.2f} MB: first read "
                f"{first[0] * 1e3:7.1f} ms, stall {first[1] * 1e3:5.1f} ms; later read "
                f"{later[0] * 1e3:7.1f} ms, stall {later[1] * 1e3:5.1f} ms (best of 2)"
            )
    await client.close()
    server.should_exit = True
    await task


def serve() -> None:
    print("== serving the sampled heap (loop stall: a 1 ms timer's lateness on the loop)")
    out = subprocess.run(
        [sys.executable, __file__, "--serve"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=600,
    )
    print(out.stdout, end="")


def main() -> None:
    if len(sys.argv) > 1:
        mode = sys.argv[1]
        if mode == "--micro":
            micro_child()
        elif mode == "--table":
            table_child()
        elif mode == "--serve":
            serve_child()
        return
    from asgi_pprof import memprofile

    if not memprofile.available():
        print(f"native sampler unavailable ({memprofile.unavailable_reason()}): nothing to measure")
        return
    print("(the machine may be loaded: compare ratios within this run only)")
    micro()
    table()
    serve()
    throughput()
    throughput_in_process()


if __name__ == "__main__":
    main()
