"""asgi_pprof serves runtime profiling data in the format expected by Go's pprof tool."""

from __future__ import annotations

from .app import create_app

__version__ = "0.1.0"

pprof_app = create_app()
"""A ready pprof app with default options: ``app.mount("/debug/pprof", pprof_app)``."""

__all__ = ["__version__", "create_app", "pprof_app"]
