"""The one home of "run this off the event loop" and "wait, unless the client leaves".

Heavy work (snapshots, encoding, gzip, rendering) runs in anyio worker threads that are
renamed ``asgi_pprof-work`` while they work for us, so the CPU sampler leaves them out
and tests can see that none is left behind.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import threading
from collections.abc import Callable, Iterator
from typing import ParamSpec, Protocol, TypeVar

import anyio
import anyio.to_thread

__all__ = ["THREAD_PREFIX", "Window", "gc_deferred", "is_own_thread", "run_in_thread"]

THREAD_PREFIX = "asgi_pprof-"

P = ParamSpec("P")
T = TypeVar("T")

# Our own limiter: profile rendering must not queue behind (or starve) the app's
# sync routes, which share anyio's default limiter of 40.
_limiter: anyio.CapacityLimiter | None = None


def _get_limiter() -> anyio.CapacityLimiter:
    global _limiter
    if _limiter is None:
        _limiter = anyio.CapacityLimiter(4)
    return _limiter


def is_own_thread(name: str) -> bool:
    """Return True for the threads asgi_pprof runs (the sampler leaves them out)."""
    return name.startswith(THREAD_PREFIX)


def _as_own_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    me = threading.current_thread()
    old = me.name
    me.name = THREAD_PREFIX + "work"
    try:
        return fn(*args, **kwargs)
    finally:
        me.name = old


async def run_in_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Return ``fn(*args, **kwargs)``, computed in a worker thread, not on the event loop."""
    call = functools.partial(_as_own_thread, fn, *args, **kwargs)
    return await anyio.to_thread.run_sync(call, limiter=_get_limiter())


class Window(Protocol):
    """Waits out a capture window; ends early when the client disconnects."""

    async def wait(self, seconds: float) -> bool:
        """Return True when ``seconds`` passed, False when the client went away first."""
        ...


class SleepWindow:
    """A :class:`Window` with no client to watch (tests, programmatic use)."""

    async def wait(self, seconds: float) -> bool:
        """Return True after sleeping ``seconds``."""
        await anyio.sleep(seconds)
        return True


# --- garbage collection ------------------------------------------------------------------

_gc_lock = threading.Lock()
_gc_holders = 0
_gc_was_enabled = False


@contextlib.contextmanager
def gc_deferred() -> Iterator[None]:
    """Hold off automatic garbage collection while a snapshot is read and formatted.

    Reading 10 000 tasks or a big tracemalloc snapshot allocates enough to trigger full
    collections, and a full collection over such a heap holds the GIL for 100+ ms: the
    loop would stall behind it. Collections are only deferred, never skipped: the state
    the collector found is restored when the last concurrent holder ends. The one
    owner of the collector's enabled state in asgi_pprof.
    """
    global _gc_holders, _gc_was_enabled
    with _gc_lock:
        if _gc_holders == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_holders += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_holders -= 1
            if _gc_holders == 0 and _gc_was_enabled:
                gc.enable()
