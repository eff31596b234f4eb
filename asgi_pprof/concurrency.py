"""The one home of "run this off the event loop" and "wait, unless the client leaves or
the server shuts down".

Heavy work (snapshots, encoding, gzip, rendering) runs in anyio worker threads that are
renamed ``asgi_pprof-work`` while they work for us, so the CPU sampler leaves them out
and tests can see that none is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, ParamSpec, Protocol, TypeVar

import anyio
import anyio._backends._asyncio  # see below
import anyio.to_thread

# anyio loads its asyncio backend at the first ``to_thread.run_sync``, on the event loop:
# a 40-60 ms stall at the first request that runs work off the loop (issue 8, item 11).
# Loaded here instead, when an app is made, at the host's start-up.

__all__ = [
    "THREAD_PREFIX",
    "RequestWindow",
    "SleepWindow",
    "Window",
    "end_windows",
    "gc_checkpoint",
    "gc_deferred",
    "gc_enabled",
    "is_own_thread",
    "open_window_count",
    "run_in_thread",
    "yield_gil",
]

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


# --- windows that end on disconnect and on shutdown --------------------------------------
#
# uvicorn (and gunicorn's UvicornWorker, which runs uvicorn's Server) shuts down gracefully:
# on SIGTERM/SIGINT it stops accepting, lets in-flight requests finish, and sends them no
# http.disconnect. A 30 s window would hold the exit for 30 s. So every window a request
# opens is registered here with its loop, and shutdown ends them all at once: a SIGTERM or
# SIGINT handler chained on the main thread (the previous handler still runs) and
# PprofServer.stop() both call end_windows(). An ended window returns True early, so the
# client gets what was captured so far.

_windows_lock = threading.RLock()  # re-entrant: end_windows() runs in signal handlers
_windows: dict[asyncio.AbstractEventLoop, set[RequestWindow]] = {}
_ending: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
# SIGQUIT too: gunicorn's quick shutdown sends it to workers, and uvicorn's worker class
# answers it with the same graceful shutdown (through loop.add_signal_handler).
_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGQUIT") if hasattr(signal, name)
)
_chained: dict[int, Any] = {}  # signal -> the handler ours replaced


class RequestWindow:
    """The :class:`Window` of one request: ends early on disconnect or server shutdown."""

    def __init__(self) -> None:
        self._wake: anyio.Event | None = None
        self.client_left = False

    def leave(self) -> None:
        """Record that the client disconnected and end the window (call on its loop)."""
        self.client_left = True
        if self._wake is not None:
            self._wake.set()

    async def wait(self, seconds: float) -> bool:
        """Return True when ``seconds`` passed or the server is shutting down, False when
        the client left first."""
        if self.client_left:
            return False
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # another anyio backend (trio): no shutdown hook there
            loop = None
        _chain_signal_handlers()
        self._wake = anyio.Event()
        if loop is not None:
            with _windows_lock:
                if loop in _ending:
                    return True
                _windows.setdefault(loop, set()).add(self)
        try:
            with anyio.move_on_after(max(0.0, seconds)):
                await self._wake.wait()
        finally:
            if loop is not None:
                with _windows_lock:
                    open_here = _windows.get(loop)
                    if open_here is not None:
                        open_here.discard(self)
                        if not open_here:
                            del _windows[loop]
            self._wake = None
        return not self.client_left

    def _end(self) -> None:
        if self._wake is not None:
            self._wake.set()


def end_windows(loop: asyncio.AbstractEventLoop | None = None) -> int:
    """End every open window of ``loop`` (all loops when None) and the ones it opens later.

    Safe from any thread and from a signal handler; returns how many windows it ended.
    """
    with _windows_lock:
        loops = [loop] if loop is not None else list(_windows)
        if loop is None:
            with contextlib.suppress(RuntimeError):
                loops.append(asyncio.get_running_loop())
        ended: list[tuple[asyncio.AbstractEventLoop, RequestWindow]] = []
        for lp in loops:
            _ending.add(lp)
            ended += [(lp, w) for w in _windows.get(lp, ())]
    for lp, w in ended:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            lp.call_soon_threadsafe(w._end)
    return len(ended)


def open_window_count() -> int:
    """Return how many request windows are waiting now, over all loops."""
    with _windows_lock:
        return sum(len(ws) for ws in _windows.values())


def _on_shutdown_signal(signum: int, frame: FrameType | None) -> None:
    end_windows()
    previous = _chained.get(signum)
    if callable(previous):
        previous(signum, frame)


def _chain_signal_handlers() -> None:
    """Put our shutdown handler in front of SIGINT/SIGTERM/SIGQUIT's Python handler.

    Only where a Python handler is installed (a server that shuts down gracefully:
    uvicorn, gunicorn's uvicorn worker); a default or ignored signal is left alone, as
    its action does not wait for requests. Main thread only. Called when a window opens,
    so it lands after the server installed its handler (uvicorn installs its handlers
    when it starts serving and restores the old ones when it stops, dropping ours).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in _SIGNALS:
        current = signal.getsignal(sig)
        if current is _on_shutdown_signal or not callable(current):
            continue
        _chained[sig] = current
        signal.signal(sig, _on_shutdown_signal)


# --- the GIL ---------------------------------------------------------------------------


_YIELD_EVERY = 0.0005
_last_yield = threading.local()


def yield_gil() -> None:
    """Let a thread waiting for the GIL (the event loop) take it, if 0.5 ms have passed.

    A worker thread converting a big table holds the GIL for the switch interval (5 ms)
    at a time, and the loop, which drops it for every poll, waits that long each time it
    wants it back: stalls add up to tens of ms. Offering it every ~0.5 ms of work bounds
    the loop's wait by that (measured: a 1 ms timer's median lateness 7 ms without,
    0.15 ms with). Cheap to call often: it only gives the GIL up when due, because on a
    loaded machine each offer also gives the CPU away (0.5 ms a time, measured).
    """
    now = time.perf_counter()
    if now - getattr(_last_yield, "at", 0.0) < _YIELD_EVERY:
        return
    time.sleep(0)
    _last_yield.at = time.perf_counter()


# --- garbage collection ------------------------------------------------------------------

GC_MAX_OFF_SECONDS = 1.0
"""Longest stretch automatic collection stays off for us, however many holders overlap."""

_gc_lock = threading.Lock()
_gc_holders = 0
_gc_was_enabled = False
_gc_off_since: float | None = None  # monotonic time we turned it off; None while it is on
_gc_expired = False  # the bound passed: stay on until no holder is left (the gap)


def _gc_expire_locked(now: float) -> None:
    global _gc_off_since, _gc_expired
    if _gc_off_since is not None and now - _gc_off_since >= GC_MAX_OFF_SECONDS:
        # Past the bound: collect again even though holders remain, and stay on for the
        # rest of this run of overlapping holders (no new deferral until none is left).
        _gc_off_since = None
        _gc_expired = True
        if _gc_was_enabled:
            gc.enable()


def gc_checkpoint() -> None:
    """Turn automatic collection back on if our deferral has lasted its bound.

    Long loops inside :func:`gc_deferred` call this every few thousand steps, so no
    single holder keeps collection off longer than ``GC_MAX_OFF_SECONDS`` plus one step.
    """
    if _gc_off_since is not None:
        with _gc_lock:
            _gc_expire_locked(time.monotonic())


def gc_enabled() -> bool:
    """Return whether automatic collection is on, as the process set it (not our deferral)."""
    with _gc_lock:
        return _gc_was_enabled if _gc_off_since is not None else gc.isenabled()


@contextlib.contextmanager
def gc_deferred() -> Iterator[None]:
    """Hold off automatic garbage collection while a snapshot is read and formatted.

    Reading 10 000 tasks or a big tracemalloc snapshot allocates enough to trigger full
    collections, and a full collection over such a heap holds the GIL for 100+ ms: the
    loop would stall behind it. Collections are only deferred, never skipped: the state
    the collector found is restored when the last concurrent holder ends. Never for
    long: after ``GC_MAX_OFF_SECONDS`` in total (checked when a holder enters or leaves
    and at :func:`gc_checkpoint`), collection is back on even if holders remain, and
    overlapping holders do not turn it off again until all of them are gone. The one
    owner of the collector's enabled state in asgi_pprof.
    """
    global _gc_holders, _gc_was_enabled, _gc_off_since, _gc_expired
    with _gc_lock:
        now = time.monotonic()
        _gc_expire_locked(now)
        if _gc_holders == 0:
            _gc_expired = False
        if _gc_off_since is None and not _gc_expired and _gc_holders == 0:
            _gc_was_enabled = gc.isenabled()
            if _gc_was_enabled:
                gc.disable()
            _gc_off_since = now
        _gc_holders += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_holders -= 1
            _gc_expire_locked(time.monotonic())
            if _gc_holders == 0:
                _gc_expired = False
                if _gc_off_since is not None:
                    _gc_off_since = None
                    if _gc_was_enabled:
                        gc.enable()
