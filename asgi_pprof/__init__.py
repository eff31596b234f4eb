"""asgi_pprof: Go's net/http/pprof for Python ASGI services.

Mount it in any Starlette or FastAPI app::

    from asgi_pprof import pprof_app
    app.mount("/debug/pprof", pprof_app)

or serve it from any Python program, in a background thread::

    from asgi_pprof import start_server
    start_server()  # http://127.0.0.1:6060/debug/pprof/

Then use the real tools: ``go tool pprof -top http://HOST/debug/pprof/profile?seconds=10``,
``curl HOST/debug/pprof/goroutine?debug=2``, or a browser on the index.

Endpoints (Go's): ``/`` index, ``/profile`` CPU profile (``seconds``, default 30),
``/trace`` execution trace as Chrome Trace Event JSON (``seconds``, default 1),
``/cmdline``, ``/symbol``, and the named profiles ``goroutine`` (asyncio tasks and
threads), ``threadcreate``, ``heap`` and ``allocs`` (tracemalloc), with ``debug=N``,
``seconds=N`` (delta) and ``gc=1`` as in Go.
"""

from __future__ import annotations

from .app import create_app
from .heap import start_tracing, stop_tracing
from .server import PprofServer, start_server
from .tasks import track_task_creation

__version__ = "0.1.0"

pprof_app = create_app()
"""A ready pprof app with default options: ``app.mount("/debug/pprof", pprof_app)``."""

__all__ = [
    "PprofServer",
    "__version__",
    "create_app",
    "pprof_app",
    "start_server",
    "start_tracing",
    "stop_tracing",
    "track_task_creation",
]
