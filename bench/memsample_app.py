"""The reference app (bench/refapp.py) with the sampled heap and allocs mounted beside it.

``ASGI_PPROF_MEMORY_PROFILE_RATE`` (read when asgi_pprof.memprofile is imported) sets
the sampling rate. The sampled profiles are at /sampled/debug/pprof (the refapp's own
/debug/pprof keeps whatever heap/allocs the registry gives it).
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from asgi_pprof import create_app, memprofile
from asgi_pprof.sampled_heap import SampledAllocsProfile, SampledHeapProfile
from bench.refapp import app as refapp

RATE = memprofile.memory_profile_rate()
"""The rate the environment set (0: off)."""

app = Starlette(
    routes=[
        Mount(
            "/sampled/debug/pprof",
            app=create_app(profiles=[SampledHeapProfile(), SampledAllocsProfile()]),
        ),
        Mount("", app=refapp),
    ]
)


async def set_sampling(request: Request) -> JSONResponse:
    """``/bench/memsample?rate=N`` (bench only): 0 takes the hooks off the allocator
    (``_memsample.uninstall``), N > 0 puts them back and samples at N: one server process
    measures both sides, alternated (processes differ by more than the effect)."""
    from asgi_pprof import _memsample

    n = int(request.query_params["rate"])
    memprofile.set_memory_profile_rate(n)
    if n == 0:
        _memsample.uninstall()
    return JSONResponse({"rate": memprofile.memory_profile_rate(), "hooked": _memsample.hooked()})


if os.environ.get("BENCH_MEMSAMPLE_TOGGLE"):
    app.router.routes.insert(0, Route("/bench/memsample", set_sampling))
