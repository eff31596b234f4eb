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

import importlib
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from .app import create_app
    from .block import set_block_profile_rate, set_mutex_profile_fraction
    from .handlers import handler
    from .labelling import LabelMiddleware, labels
    from .loopstall import set_loopstall_threshold
    from .loopstall import watch as watch_event_loop
    from .memprofile import set_memory_profile_rate
    from .server import PprofServer, start_server
    from .tasks import track_task_creation
    from .tracemalloc_owner import start_tracing, stop_tracing

    pprof_app: Starlette

__version__ = "0.1.0"

# Everything is loaded on first use (PEP 562): `import asgi_pprof` costs a few
# milliseconds and installs nothing (no hook, no thread, no app) until a name is used.
_LAZY = {
    "LabelMiddleware": ("labelling", "LabelMiddleware"),
    "PprofServer": ("server", "PprofServer"),
    "create_app": ("app", "create_app"),
    "handler": ("handlers", "handler"),
    "labels": ("labelling", "labels"),
    "set_block_profile_rate": ("block", "set_block_profile_rate"),
    "set_loopstall_threshold": ("loopstall", "set_loopstall_threshold"),
    "set_memory_profile_rate": ("memprofile", "set_memory_profile_rate"),
    "set_mutex_profile_fraction": ("block", "set_mutex_profile_fraction"),
    "start_server": ("server", "start_server"),
    "start_tracing": ("tracemalloc_owner", "start_tracing"),
    "stop_tracing": ("tracemalloc_owner", "stop_tracing"),
    "track_task_creation": ("tasks", "track_task_creation"),
    "watch_event_loop": ("loopstall", "watch"),
}


def __getattr__(name: str) -> Any:
    if name == "pprof_app":
        from .app import create_app

        app = create_app()
        globals()["pprof_app"] = app  # made once: every later access gets the same app
        return app
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'asgi_pprof' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{where[0]}", __name__), where[1])
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def _configure_from_env() -> None:
    """Switch on what the environment asks for, so an unmodified program can (Go's runtime
    settings, as variables): nothing is imported or installed when none is set."""
    env = os.environ
    if env.get("ASGI_PPROF_BLOCK_PROFILE_RATE") or env.get("ASGI_PPROF_MUTEX_PROFILE_FRACTION"):
        from . import block

        block.configure_from_env()
    if env.get("ASGI_PPROF_LOOPSTALL_THRESHOLD"):
        from . import loopstall

        loopstall.configure_from_env()
    if env.get("ASGI_PPROF_MEMORY_PROFILE_RATE"):
        from . import memprofile  # reads its variable when loaded

        del memprofile


_configure_from_env()

__all__ = [
    "LabelMiddleware",
    "PprofServer",
    "__version__",
    "create_app",
    "handler",
    "labels",
    "pprof_app",
    "set_block_profile_rate",
    "set_loopstall_threshold",
    "set_memory_profile_rate",
    "set_mutex_profile_fraction",
    "start_server",
    "start_tracing",
    "stop_tracing",
    "track_task_creation",
    "watch_event_loop",
]
