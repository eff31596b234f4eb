"""Go's custom registration: each pprof handler on your own router, at your own paths.

Run: PYTHONTRACEMALLOC=1 uvicorn mux_app:app --port 8000   (the heap profile reads tracemalloc)
Then: go tool pprof http://127.0.0.1:8000/custom/heap
"""

import time

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from asgi_pprof import handler


def mux_app_busy_work() -> int:
    n, end = 0, time.process_time() + 0.05
    while time.process_time() < end:
        n += sum(range(200))
    return n


async def hello(request):
    return PlainTextResponse("hello\n")


async def spin(request):
    return PlainTextResponse(f"{mux_app_busy_work()}\n")


app = Starlette(
    routes=[
        Route("/", hello),
        Route("/spin", spin),
        # Go: mux.HandleFunc("/custom/profile", pprof.Profile) and so on.
        Route("/custom/cmdline", handler("cmdline")),
        Route("/custom/profile", handler("profile")),
        Route("/custom/symbol", handler("symbol")),
        Route("/custom/trace", handler("trace")),
        # Go: mux.Handle("/custom/heap", pprof.Handler("heap")).
        Route("/custom/heap", handler("heap")),
        # Go: mux.HandleFunc("/custom/", pprof.Index): the index and every named profile.
        Mount("/custom", handler("")),
    ]
)
