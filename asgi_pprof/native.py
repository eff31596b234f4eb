"""The one place that loads asgi_pprof's optional C helpers, and the switch that refuses them.

``_wire`` encodes profile.proto samples (used by :mod:`.builder`); ``_traces`` groups and
names tracemalloc's traces (used by :mod:`.heap_groups` and :mod:`.heap_names`). Each is
None when it was not built (no compiler at install time), under ``ASGI_PPROF_NO_NATIVE=1``,
or on a free-threaded build (importing a module that needs the GIL would turn the GIL back
on for the whole process); its users then take their pure-Python path, which gives the
same results. (``_memsample`` has its own loader, :mod:`.memprofile`: it reports why.)
"""

from __future__ import annotations

import importlib
import os
import sysconfig
import types

__all__ = ["load", "traces", "wire"]


def load(name: str) -> types.ModuleType | None:
    """Return the extension ``asgi_pprof.<name>``, or None: not built, or refused."""
    if os.environ.get("ASGI_PPROF_NO_NATIVE", "") not in ("", "0"):
        return None
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return None
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError:
        return None


wire = load("_wire")
"""The C sample encoder, or None."""

traces = load("_traces")
"""The C trace grouper and namer, or None."""
