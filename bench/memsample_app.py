"""The reference app (bench/refapp.py) with the sampled heap and allocs mounted beside it.

``ASGI_PPROF_MEMORY_PROFILE_RATE`` (read when asgi_pprof.memprofile is imported) sets
the sampling rate. The sampled profiles are at /sampled/debug/pprof (the refapp's own
/debug/pprof keeps whatever heap/allocs the registry gives it).
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import Mount

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
