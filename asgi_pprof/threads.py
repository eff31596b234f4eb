"""Where threads come from: the data behind ``/debug/pprof/threadcreate``.

Go's threadcreate profile counts every OS thread the runtime ever made, each with the
stack that made it. Here: every thread started since the first pprof app was created
(:func:`install`, called by ``create_app``; importing asgi_pprof changes nothing), each
with the stack that called ``Thread.start()``, plus the threads that already existed
then (and threads started with the low-level ``_thread`` module), counted under an
honest "creation site unknown" stack. Counts only grow, as in Go, so ``seconds=N``
deltas show the threads created during the window.

Recording a site costs one short stack walk per ``Thread.start()`` (see the README).
"""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Callable
from typing import Any

from .model import Frame, ProfileData, Sample, Stack, ValueType, function_name

__all__ = ["UNKNOWN_SITE", "created_count", "install", "installed", "profile"]

UNKNOWN_SITE: Stack = (
    Frame(
        function="[creation site unknown: thread started before the pprof app was created "
        "or through _thread]",
        filename="<unknown>",
        start_line=0,
        line=0,
    ),
)
"""The stack of threads whose creation was not seen (pprof cannot read an empty stack)."""

_MAX_FRAMES = 32

RawFrame = tuple[types.CodeType, int, str | None]
"""A frame as recorded at creation time: cheap to take, turned into a Frame on demand."""

_lock = threading.Lock()
_sites: dict[tuple[RawFrame, ...], int] = {}
_unknown = 0
_seen_raw: set[int] = set()
_orig_start: Callable[[threading.Thread], None] | None = None

start_listeners: list[Callable[[], None]] = []
"""Called after each ``Thread.start()`` once :func:`install` ran, and when a pool thread of
ours starts (the CPU samplers: they look for the new thread at once instead of at their
next rescan, up to a second later while no other thread runs)."""


def _raw_stack(frame: types.FrameType | None) -> tuple[RawFrame, ...]:
    out: list[RawFrame] = []
    while frame is not None and len(out) < _MAX_FRAMES:
        mod = frame.f_globals.get("__name__")
        out.append((frame.f_code, frame.f_lineno or 0, mod if isinstance(mod, str) else None))
        frame = frame.f_back
    return tuple(out)


def _start(self: threading.Thread, *args: Any, **kwargs: Any) -> None:
    site = _raw_stack(sys._getframe(1))
    assert _orig_start is not None
    _orig_start(self, *args, **kwargs)  # raises for a second start(): then nothing is counted
    with _lock:
        _sites[site] = _sites.get(site, 0) + 1
    announce_started()


def announce_started() -> None:
    """Tell the :data:`start_listeners` a thread has started (``Thread.start()`` does, and
    our pool's bare threads, which ``Thread.start()`` never sees, once they are named)."""
    for listener in start_listeners:
        listener()


def install() -> None:
    """Start recording creation sites (idempotent); ``create_app`` calls it.

    Wraps ``threading.Thread.start`` so the creating stack is taken in the creating
    thread, which is the only place it exists. Not done at import: a process-wide hook
    is installed only by the app that needs it.
    """
    global _orig_start, _unknown
    with _lock:
        if _orig_start is not None:
            return
        _orig_start = threading.Thread.start
        # Everything alive now was created before we could see it.
        _unknown = len(sys._current_frames())
        _seen_raw.update(sys._current_frames())
    threading.Thread.start = _start  # type: ignore[method-assign]


def installed() -> bool:
    """Return True once creation sites are being recorded."""
    return _orig_start is not None


def _reconcile() -> None:
    """Count threads started without ``Thread.start()`` (``_thread``) once, as unknown."""
    global _unknown
    active = threading._active  # type: ignore[attr-defined]
    with _lock:
        for ident in sys._current_frames():
            t = active.get(ident)
            if (t is None or isinstance(t, threading._DummyThread)) and ident not in _seen_raw:
                _seen_raw.add(ident)
                _unknown += 1


def created_count() -> int:
    """Return the number of threads created so far (Go's threadcreate count)."""
    install()  # a profile made without create_app: count from now on
    _reconcile()
    with _lock:
        return _unknown + sum(_sites.values())


def _frames(site: tuple[RawFrame, ...]) -> Stack:
    return tuple(
        Frame(function_name(code, mod), code.co_filename, code.co_firstlineno, line)
        for code, line, mod in site
    )


def profile() -> ProfileData:
    """Return the threadcreate profile: one sample per creation stack, valued by count."""
    install()
    _reconcile()
    with _lock:
        sites = list(_sites.items())
        unknown = _unknown
    samples = [Sample(UNKNOWN_SITE, [unknown])] if unknown else []
    samples.extend(Sample(_frames(site), [n]) for site, n in sites)
    vt = ValueType("threadcreate", "count")
    return ProfileData(sample_types=[vt], period_type=vt, period=1, samples=samples).merged()
