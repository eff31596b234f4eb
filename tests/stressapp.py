"""A service that exercises the CPU sampler's hardest case: a ``def`` route in Starlette's
threadpool and a JSON-heavy async route, both saturated while CPU profiles run back to back.

Serve it with ``python -m uvicorn tests.stressapp:app``. Used by the stress and churn tests.
"""

from __future__ import annotations

import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route

from asgi_pprof import create_app

_DOC = {"items": [{"id": i, "name": f"n{i}", "tags": ["a", "b"], "x": i * 1.5} for i in range(40)]}


def _nested_json(depth: int) -> str:
    return json.dumps(_DOC) if depth == 0 else _nested_json(depth - 1)


def _chunks() -> object:
    for depth in range(6):
        yield _nested_json(depth)


def sync_route(request: Request) -> PlainTextResponse:
    """A ``def`` route: Starlette runs it in anyio's worker threads."""
    n = sum(len(s) for s in _chunks())
    return PlainTextResponse(str(n))


async def cpu_route(request: Request) -> JSONResponse:
    """An async route doing JSON work on the event loop."""
    return JSONResponse(json.loads(_nested_json(4)))


app = Starlette(
    routes=[
        Route("/sync", sync_route),
        Route("/cpu", cpu_route),
        # Every churned request really opens a window (the default limit is 8 at once).
        Mount("/debug/pprof", app=create_app(max_windows=1000)),
    ]
)
