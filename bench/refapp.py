"""The reference app the benchmarks load: a light JSON route and a CPU route, pprof mounted."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from asgi_pprof import create_app


def render_items(n: int) -> list[dict[str, object]]:
    """Return n small dicts: the kind of work a JSON handler does."""
    return [{"id": i, "name": f"item-{i}", "tags": ["a", "b"], "score": i * 0.5} for i in range(n)]


async def items(request: Request) -> JSONResponse:
    return JSONResponse(render_items(int(request.query_params.get("n", "50"))))


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"hello": "world"})


# BENCH_TRACEMALLOC=N starts tracemalloc with N frames (the heap benchmark's variants);
# BENCH_TRACE_HZ=N sets the trace's sampling rate (the trace benchmark's variants).
_frames = int(os.environ.get("BENCH_TRACEMALLOC", "0"))
_trace_hz = int(os.environ.get("BENCH_TRACE_HZ", "250"))

app = Starlette(
    routes=[
        Route("/items", items),
        Route("/hello", hello),
        Mount(
            "/debug/pprof", app=create_app(tracemalloc_frames=_frames, trace_sample_hz=_trace_hz)
        ),
    ]
)


def _leave_out_trace_parts(parts: str) -> None:
    """BENCH_TRACE_WITHOUT=hook,wall,cpu: captures run without those parts (the trace
    benchmark's breakdown of what a capture costs the server). Bench only."""
    import asyncio

    from asgi_pprof import sampler, trace_hook, tracing

    if "wall" in parts:
        tracing._Recorder._sample = lambda self: self._stop.wait()  # type: ignore[method-assign]
    if "cpu" in parts:

        class _NoCPU:
            period_ns = 10_000_000

            def subscribe(self, timeline: bool = False) -> sampler.Capture:
                return sampler.Capture(period_ns=self.period_ns, timeline=[])

            def unsubscribe(self, cap: sampler.Capture) -> None:
                pass

            def release_signal(self) -> None:
                pass

        tracing.get_sampler = lambda hz, si: _NoCPU()  # type: ignore[assignment, return-value]
    if "hook" in parts:

        def no_hook(rec: trace_hook.StepRecorder, native: bool | None = None) -> trace_hook.Hook:
            run = asyncio.Handle.__dict__["_run"]
            return trace_hook.Hook(False, run, run, None, frozenset(), rec)

        trace_hook.install = no_hook  # type: ignore[assignment]


_leave_out_trace_parts(os.environ.get("BENCH_TRACE_WITHOUT", ""))
# BENCH_TRACE_HOOK=python|native: which step hook captures use (default: native if built).
_hook = os.environ.get("BENCH_TRACE_HOOK", "")
if _hook:
    from asgi_pprof import tracing

    tracing._native_hook = _hook == "native"
