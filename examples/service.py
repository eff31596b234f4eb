"""An example service with pprof mounted at /debug/pprof, and something worth profiling.

Run it with ``make run``, then in another shell::

    go tool pprof -top 'http://127.0.0.1:8000/debug/pprof/profile?seconds=5'

``crunch_numbers`` (a route) and ``background_checksum`` (a task) burn CPU, so they show.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from asgi_pprof import pprof_app


def crunch_numbers(n: int) -> int:
    """Return a sum of squares: a deliberately CPU-bound handler body."""
    return sum(i * i for i in range(n))


async def crunch(request: Request) -> JSONResponse:
    n = int(request.query_params.get("n", "200000"))
    return JSONResponse({"n": n, "result": crunch_numbers(n)})


async def background_checksum() -> None:
    """Hash a little data every 100 ms: steady background CPU on the event loop."""
    data = b"x" * 65536
    while True:
        for _ in range(20):
            data = hashlib.sha256(data).digest() * 2048
        await asyncio.sleep(0.1)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    task = asyncio.create_task(background_checksum(), name="background_checksum")
    yield
    task.cancel()


app = Starlette(
    routes=[Route("/crunch", crunch), Mount("/debug/pprof", app=pprof_app)],
    lifespan=lifespan,
)
