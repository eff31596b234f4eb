"""A service with pprof mounted and a ``/state`` route that reports what a capture may leave on.

Serve it with ``python -m uvicorn tests.httpapp:app``. Used by the HTTP hardening tests
(abandoned captures, shutdown during captures). ``/state`` answers from the loop, cheaply.
"""

from __future__ import annotations

import gc
import resource
import signal
import sys
import threading
import tracemalloc

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route

from asgi_pprof import create_app
from asgi_pprof.concurrency import open_window_count

SWITCH_INTERVAL_AT_START = sys.getswitchinterval()


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def state(request: Request) -> JSONResponse:
    """What a capture turns on process-wide, and whether it is back as it was."""
    handler = signal.getsignal(signal.SIGPROF)
    return JSONResponse(
        {
            "tracemalloc": tracemalloc.is_tracing(),
            "switch_interval": sys.getswitchinterval(),
            "switch_interval_at_start": SWITCH_INTERVAL_AT_START,
            "sigprof_default": handler in (signal.SIG_DFL, signal.SIG_IGN, None),
            "itimer_prof": signal.getitimer(signal.ITIMER_PROF)[0],
            "gc_enabled": gc.isenabled(),
            "busy_work_threads": sorted(
                t.name for t in threading.enumerate() if t.name == "asgi_pprof-work"
            ),
            "rss_kb": _rss_kb(),
            "open_windows": open_window_count(),
        }
    )


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


app = Starlette(
    routes=[
        Route("/state", state),
        Route("/hello", hello),
        Mount("/debug/pprof", app=create_app(max_windows=1000)),
    ]
)
