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
