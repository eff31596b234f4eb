"""The reference app the benchmarks load: a light JSON route and a CPU route, pprof mounted."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route

from asgi_pprof import create_app


def render_items(n: int) -> list[dict[str, object]]:
    """Return n small dicts: the kind of work a JSON handler does."""
    return [{"id": i, "name": f"item-{i}", "tags": ["a", "b"], "score": i * 0.5} for i in range(n)]


served = 0
"""Requests the two load routes answered (``/bench/served``: windows count their own)."""


async def items(request: Request) -> JSONResponse:
    global served
    served += 1
    return JSONResponse(render_items(int(request.query_params.get("n", "50"))))


async def hello(request: Request) -> JSONResponse:
    global served
    served += 1
    return JSONResponse({"hello": "world"})


# BENCH_TRACEMALLOC=N starts tracemalloc with N frames (the heap benchmark's variants);
# BENCH_TRACE_HZ=N sets the trace's wall-clock sampling rate, BENCH_TRACE_CPU_HZ=N its CPU
# ticks' (the trace benchmark's variants).
_frames = int(os.environ.get("BENCH_TRACEMALLOC", "0"))
_trace_hz = int(os.environ.get("BENCH_TRACE_HZ", "250"))
_trace_cpu_hz = int(os.environ.get("BENCH_TRACE_CPU_HZ", "100"))

app = Starlette(
    routes=[
        Route("/items", items),
        Route("/hello", hello),
        Mount(
            "/debug/pprof",
            app=create_app(
                tracemalloc_frames=_frames, trace_sample_hz=_trace_hz, trace_cpu_hz=_trace_cpu_hz
            ),
        ),
    ]
)


_without: set[str] = set()
"""Parts of the trace that captures leave out (``/bench/trace-variant``)."""


def _variants() -> None:
    """Let ``/bench/trace-variant`` choose what the next captures do (bench only): which
    step hook (``hook=python|native``) and which parts they leave out (``without=hook,
    wall,cpu,switch``), so one server process measures every variant, alternated."""
    import asyncio
    import types

    from asgi_pprof import sampler, trace_hook, tracing

    class _NoCPU:
        period_ns = 10_000_000

        def subscribe(
            self, timeline: bool = False, on_main_tick: object = None, tick_ns: int = 0
        ) -> sampler.Capture:
            return sampler.Capture(period_ns=self.period_ns, timeline=[])

        def tick_period_ns(self) -> int:
            return self.period_ns

        def unsubscribe(self, cap: sampler.Capture) -> None:
            pass

        def release_signal(self) -> None:
            pass

    real_sample, real_get_sampler = tracing._Recorder._sample, tracing.get_sampler
    real_tick = tracing._Recorder._on_main_tick
    real_install = trace_hook.install

    def sample(self: tracing._Recorder) -> None:
        if "wall" in _without:
            self._stopped.acquire()  # held until the capture ends: no samples
        else:
            real_sample(self)

    def on_main_tick(self: tracing._Recorder, frame: types.FrameType) -> None:
        if "wall" not in _without:
            real_tick(self, frame)

    def get_sampler(hz: int, si: float | None) -> sampler.Sampler:
        return _NoCPU() if "cpu" in _without else real_get_sampler(hz, si)  # type: ignore[return-value]

    def install(rec: trace_hook.StepRecorder, native: bool | None = None) -> trace_hook.Hook:
        if "hook" in _without:
            run = asyncio.Handle.__dict__["_run"]
            return trace_hook.Hook(False, run, run, None, frozenset(), rec)
        return real_install(rec, native)

    real_want = sampler._switch.want

    def want(key: int, value: float | None) -> None:
        real_want(key, None if "switch" in _without else value)

    sampler._switch.want = want  # type: ignore[method-assign]
    tracing._Recorder._sample = sample  # type: ignore[method-assign]
    tracing._Recorder._on_main_tick = on_main_tick  # type: ignore[method-assign]
    tracing.get_sampler = get_sampler  # type: ignore[assignment]
    trace_hook.install = install  # type: ignore[assignment]


async def trace_variant(request: Request) -> JSONResponse:
    from asgi_pprof import tracing

    _without.clear()
    _without.update(p for p in request.query_params.get("without", "").split(",") if p)
    hook = request.query_params.get("hook", "")
    tracing._native_hook = None if not hook else hook == "native"
    return JSONResponse({"without": sorted(_without), "hook": hook})


async def served_count(request: Request) -> PlainTextResponse:
    return PlainTextResponse(str(served))


if os.environ.get("BENCH_TRACE_VARIANTS"):
    _variants()
    app.router.routes.insert(0, Route("/bench/trace-variant", trace_variant))
    app.router.routes.insert(0, Route("/bench/served", served_count))
