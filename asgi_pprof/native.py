"""The one place that loads asgi_pprof's optional C helpers, and the switch that refuses them.

``_wire`` encodes profile.proto samples (used by :mod:`.builder`); ``_traces`` groups and
names tracemalloc's traces (used by :mod:`.heap_groups` and :mod:`.heap_names`). Each is
None when it was not built (no compiler at install time), under ``ASGI_PPROF_NO_NATIVE=1``,
or on a free-threaded build (importing a module that needs the GIL would turn the GIL back
on for the whole process); its users then take their pure-Python path, which gives the
same results. :mod:`.memprofile` (``_memsample``) and :mod:`.trace_hook` (``_tracestep``)
load theirs here too, and report why when they could not.
"""

from __future__ import annotations

import importlib
import os
import platform
import sysconfig
import types
from typing import Protocol, TypeVar

__all__ = ["ENV_NO_NATIVE", "load", "load_or_why", "refusal", "traces", "untracked", "wire"]

ENV_NO_NATIVE = "ASGI_PPROF_NO_NATIVE"


def refusal() -> str:
    """Return why no C extension of ours may be loaded here ("" when they may)."""
    if os.environ.get(ENV_NO_NATIVE, "") not in ("", "0"):
        return f"{ENV_NO_NATIVE} is set"
    if platform.python_implementation() != "CPython":
        return f"{platform.python_implementation()} is not CPython"
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return "the free-threaded build is not supported"
    return ""


def load_or_why(name: str) -> tuple[types.ModuleType | None, str]:
    """Return the extension ``asgi_pprof.<name>`` and "", or None and why not."""
    why = refusal()
    if why:
        return None, why
    try:
        return importlib.import_module(f"{__package__}.{name}"), ""
    except ImportError as exc:
        return None, f"the native extension is not available ({exc})"


def load(name: str) -> types.ModuleType | None:
    """Return the extension ``asgi_pprof.<name>``, or None: not built, or refused."""
    return load_or_why(name)[0]


wire = load("_wire")
"""The C sample encoder, or None."""

traces = load("_traces")
"""The C trace grouper and namer, or None."""

_T = TypeVar("_T")


def _same(obj: _T) -> _T:
    return obj


class _Untrack(Protocol):
    def __call__(self, obj: _T, /) -> _T: ...


untracked: _Untrack = wire.untrack if wire is not None else _same
"""``untracked(obj) -> obj``: an immutable cache entry (a Frame, a stack, a location)
taken out of the cyclic collector's sight when it can be in no cycle (``_wire.untrack``),
so a first read that names 100 000 stacks leaves no big young generation behind it.
Without the C encoder: obj unchanged (the collector scans it once, as before)."""
