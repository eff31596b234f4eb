"""Views, fgprof and labels: what each costs.

1. fgprof's cost at 99 Hz on the reference app with 1 000 live tasks (sleeping, waiting on
   events and queues): throughput and CPU per request of ``/items`` while a capture runs,
   against the same server with no capture, rounds alternated (target: under 2 %).
2. The label middleware's cost per request: the reference app with and without
   ``LabelMiddleware``, two servers, rounds alternated; and the middleware alone, called
   in-process on a trivial ASGI app (microseconds per request, A/B alternated).
3. Rendering a 30 s profile of the reference app under load (fgprof, CPU): time and
   size of each page (html, speedscope, folded).

Standalone: ``python bench/bench_views.py [fgprof] [labels] [pages]`` (``make bench`` runs
all three).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asgi_pprof import builder, create_app, fgprof, views
from asgi_pprof.concurrency import SleepWindow
from asgi_pprof.labelling import LabelMiddleware
from bench.common import RefServer, ab_rounds, measure, med, report
from bench.refapp import hello, items

ROUNDS = 5
ROUND_S = 3.0
LIVE_TASKS = 1000
PAGE_S = 30.0

# --- the app under test (uvicorn bench.bench_views:app) ---------------------------------

_live: list[asyncio.Task[None]] = []


async def _idle(kind: int, ev: asyncio.Event, q: asyncio.Queue[int]) -> None:
    if kind == 0:
        await asyncio.sleep(3600)
    elif kind == 1:
        await ev.wait()
    else:
        await q.get()


async def _start_tasks() -> None:
    n = int(os.environ.get("BENCH_TASKS", "0"))
    ev: asyncio.Event = asyncio.Event()
    q: asyncio.Queue[int] = asyncio.Queue()
    _live.extend(asyncio.create_task(_idle(i % 3, ev, q)) for i in range(n))


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    await _start_tasks()
    yield


async def fgprof_route(request: Request) -> Response:
    got = await fgprof.profile(float(request.query_params["seconds"]), SleepWindow())
    assert got is not None
    return Response(builder.encode(got), media_type="application/octet-stream")


app = Starlette(
    routes=[
        Route("/items", items),
        Route("/hello", hello),
        Route("/fgprof", fgprof_route),
        Mount("/debug/pprof", app=create_app()),
    ],
    middleware=[Middleware(LabelMiddleware)] if os.environ.get("BENCH_LABELS") == "1" else [],
    lifespan=_lifespan,
)


class ViewsServer(RefServer):
    """This module's app under uvicorn in its own process (RefServer's plumbing)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        super().__init__(env, app="bench.bench_views:app")


def _fetch(url: str, out: list[bytes], timeout: float) -> None:
    out.append(httpx.get(url, timeout=timeout).content)


def bench_fgprof_cost() -> None:
    print(f"fgprof at 99 Hz, {LIVE_TASKS} live tasks: /items with and without a capture")
    with ViewsServer(env={"BENCH_TASKS": str(LIVE_TASKS)}) as server:
        measure(server, "/items", 1.0)  # warm up

        def with_capture() -> dict[str, float]:
            got: list[bytes] = []
            t = threading.Thread(
                target=_fetch,
                args=(f"{server.url}/fgprof?seconds={ROUND_S + 1}", got, ROUND_S + 30),
            )
            t.start()
            time.sleep(0.3)  # the capture is running
            try:
                return measure(server, "/items", ROUND_S)
            finally:
                t.join()

        base, other = ab_rounds(ROUNDS, lambda: measure(server, "/items", ROUND_S), with_capture)
        report("fgprof", base, other)


def bench_label_middleware() -> None:
    print("LabelMiddleware: the reference app with and without it (two servers)")
    with ViewsServer() as plain, ViewsServer(env={"BENCH_LABELS": "1"}) as labelled:
        measure(plain, "/items", 1.0)
        measure(labelled, "/items", 1.0)
        base, other = ab_rounds(
            ROUNDS,
            lambda: measure(plain, "/items", ROUND_S),
            lambda: measure(labelled, "/items", ROUND_S),
        )
        report("labels", base, other)
    print("LabelMiddleware alone, in-process, on a trivial ASGI app (us per request)")

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        scope["route"] = route

    route = Route("/items/{id}", items)
    wrapped = LabelMiddleware(inner)
    scope = {"type": "http", "method": "GET", "path": "/items/1", "root_path": ""}

    async def per_request(target: Any, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            await target(dict(scope), None, None)
        return (time.perf_counter() - t0) / n * 1e6

    async def rounds() -> tuple[list[float], list[float]]:
        a: list[float] = []
        b: list[float] = []
        for i in range(2 * ROUNDS):
            if i % 2 == 0:
                a.append(await per_request(inner, 20_000))
                b.append(await per_request(wrapped, 20_000))
            else:
                b.append(await per_request(wrapped, 20_000))
                a.append(await per_request(inner, 20_000))
        return a, b

    a, b = asyncio.run(rounds())
    extra = [y - x for x, y in zip(a, b, strict=True)]
    print(f"  bare {med(a)} us, with middleware {med(b)} us, added {med(extra)} us per request")


def bench_pages() -> None:
    print(f"Pages of {PAGE_S:.0f} s profiles of the reference app under load")
    with ViewsServer(env={"BENCH_TASKS": str(LIVE_TASKS)}) as server:
        fg: list[bytes] = []
        cpu: list[bytes] = []
        threads = [
            threading.Thread(
                target=_fetch, args=(f"{server.url}/fgprof?seconds={PAGE_S}", fg, PAGE_S + 60)
            ),
            threading.Thread(
                target=_fetch,
                args=(f"{server.url}/debug/pprof/profile?seconds={PAGE_S}", cpu, PAGE_S + 60),
            ),
        ]
        for t in threads:
            t.start()
        time.sleep(0.3)
        measure(server, "/items", PAGE_S - 0.5)
        for t in threads:
            t.join()
    for name, body in (("fgprof", fg[0]), ("cpu", cpu[0])):
        data = builder.decode(body)
        print(f"  {name}: {len(data.samples)} samples, proto {len(body) / 1024:.0f} KiB")
        for fmt, render in (
            ("html", lambda d, title=name: views.render_html(d, title)),
            ("speedscope", views.render_speedscope),
            ("folded", views.render_folded),
        ):
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                page = render(data)
                times.append((time.perf_counter() - t0) * 1e3)
            print(
                f"    {fmt:10s} {len(page) / 1024:8.0f} KiB, render {med(times)} ms"
                f" (median of {len(times)})"
            )


def main() -> None:
    print(f"machine: {os.cpu_count()} cpus; loaded machines give noisy numbers")
    t0 = time.monotonic()
    parts = {"fgprof": bench_fgprof_cost, "labels": bench_label_middleware, "pages": bench_pages}
    for name, part in parts.items():
        if len(sys.argv) < 2 or name in sys.argv[1:]:
            part()
    print(f"(took {time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
