"""Two routes burning CPU in distinctively named functions, labelled by LabelMiddleware.

Serve with ``python -m uvicorn tests.labelsapp:app`` (the loop on the main thread).
"""

from __future__ import annotations

import time

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from asgi_pprof import create_app
from asgi_pprof.labelling import LabelMiddleware


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def burn_for_items() -> None:
    _spin(0.002)


def burn_for_reports() -> None:
    _spin(0.002)


async def item(request: Request) -> PlainTextResponse:
    """An async route: runs on the event loop."""
    burn_for_items()
    return PlainTextResponse(request.path_params["item_id"])


def report(request: Request) -> PlainTextResponse:
    """A sync route: Starlette runs it in its threadpool."""
    burn_for_reports()
    return PlainTextResponse("ok")


app = Starlette(
    routes=[
        Route("/items/{item_id}", item),
        Route("/reports", report),
        Mount("/debug/pprof", app=create_app()),
    ],
    middleware=[Middleware(LabelMiddleware)],
)
