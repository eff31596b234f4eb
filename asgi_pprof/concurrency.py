"""The one home of "run this off the event loop" and "wait, unless the client leaves or
the server shuts down".

Heavy work (snapshots, encoding, gzip, rendering) runs in asgi_pprof's own worker
threads, named ``asgi_pprof-work`` while they work (``asgi_pprof-pool`` while idle), so
the CPU sampler leaves them out and tests can see that none is left behind.
"""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import contextvars
import functools
import gc
import os
import queue
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, ParamSpec, Protocol, TypeVar

import anyio
import anyio._backends._asyncio  # see below
import anyio.to_thread

from . import threads

# anyio loads its asyncio backend at the first ``to_thread.run_sync``, on the event loop:
# a 40-60 ms stall at the first request that runs work off the loop (issue 8, item 11).
# Loaded here instead, when an app is made, at the host's start-up.

__all__ = [
    "POOL_NAME",
    "THREAD_PREFIX",
    "WORK_NAME",
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
    me.name = WORK_NAME
    try:
        return fn(*args, **kwargs)
    finally:
        me.name = old


async def run_in_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Return ``fn(*args, **kwargs)``, computed in a worker thread, not on the event loop.

    At most 4 at a time (our own limiter). Like anyio's ``to_thread.run_sync``, a
    cancelled caller still waits for the call to end, and the call sees the caller's
    context variables.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # another anyio backend (trio): anyio's threads
        call = functools.partial(_as_own_thread, fn, *args, **kwargs)
        return await anyio.to_thread.run_sync(call, limiter=_get_limiter())
    async with _get_limiter():
        fut: asyncio.Future[T] = loop.create_future()
        ctx = contextvars.copy_context()
        _pool.submit((loop, fut, ctx, fn, args, kwargs))
        with anyio.CancelScope(shield=True):
            result = await fut
        return result


# --- our worker threads ----------------------------------------------------------------
#
# Not anyio's (nor threading.Thread's): under tracemalloc every allocation records its
# stack's file:line pairs, up to 16 frames, and CPython finds a frame's line by scanning
# its code's line table from the start. A threading.Thread's bootstrap frames (long
# functions, called from deep inside them) and anyio's worker loop made each allocation
# of our work cost 3-4 times what it costs at the bottom of a bare thread (300 000
# allocations at 16 frames: 1.9-2.4 s against 0.4-0.6 s), and the exact heap of a large
# app makes hundreds of thousands of them. So the pool's threads are started with
# ``_thread.start_new_thread``: the work runs one short frame from the bottom. Each
# thread takes a ``threading`` name (its ``current_thread()``), so every reader of thread
# names sees ours; there are at most 4 and they live as long as the process.

WORK_NAME = THREAD_PREFIX + "work"
POOL_NAME = THREAD_PREFIX + "pool"
"""A pool thread's name while it waits for work."""
POOL_SIZE = 4


def _settle_soon(
    loop: asyncio.AbstractEventLoop,
    fut: asyncio.Future[Any],
    result: object,
    exc: BaseException | None,
) -> None:
    # RuntimeError: the loop closed, nobody is waiting. Nothing may end a pool thread.
    with contextlib.suppress(Exception):
        loop.call_soon_threadsafe(_settle, fut, result, exc)


def _settle(fut: asyncio.Future[Any], result: object, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(result)
    else:
        fut.set_exception(exc)


Job = tuple[
    asyncio.AbstractEventLoop,
    "asyncio.Future[Any]",
    contextvars.Context,
    Callable[..., Any],
    tuple[Any, ...],
    dict[str, Any],
]
"""A call for the pool: the caller's loop and future, its context, the function and its
arguments."""


def _pool_main(pool: _Pool) -> None:
    # Short, and the call near its start, on purpose: this frame's line is looked up for
    # every allocation of the work (see above).
    # What threading.Thread does for its threads, so debuggers, profilers and coverage
    # (threading.settrace / setprofile) see our work as they saw it in anyio's threads.
    if (trace := threading.gettrace()) is not None:
        sys.settrace(trace)
    if (prof := threading.getprofile()) is not None:
        sys.setprofile(prof)
    me = threading.current_thread()
    me.name = POOL_NAME
    # Started with _thread, so Thread.start() never told the CPU samplers: a capture that
    # runs would find this thread only at its next rescan, after the work it came for.
    threads.announce_started()
    while True:
        loop, fut, ctx, fn, args, kwargs = pool.jobs.get()
        me.name = WORK_NAME
        try:
            result, exc = ctx.run(fn, *args, **kwargs), None
        except BaseException as e:  # handed to the caller, as anyio's threads do
            result, exc = None, e
        # Idle before the caller can see the result: it then finds no thread at work.
        me.name = POOL_NAME
        pool.finished()
        _settle_soon(loop, fut, result, exc)
        del loop, fut, ctx, fn, args, kwargs, result, exc  # an idle thread holds nothing


class _Pool:
    """Up to :data:`POOL_SIZE` bare threads taking jobs from one queue."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._busy = 0

    def submit(self, job: Job) -> None:
        """Queue ``job``; start a thread if every one is busy and there is room."""
        with self._lock:
            self._busy += 1
            start = self._busy > self._threads and self._threads < POOL_SIZE
            if start:
                self._threads += 1
        self.jobs.put(job)
        if start:
            _thread.start_new_thread(_pool_main, (self,))

    def finished(self) -> None:
        """Count one job done (a pool thread calls it)."""
        with self._lock:
            self._busy -= 1

    def threads(self) -> int:
        """Return how many pool threads were started (they never end)."""
        return self._threads


_pool = _Pool()


def _pool_after_fork_in_child() -> None:
    # The parent's pool threads do not exist in the child (threading forgets their names).
    global _pool
    _pool = _Pool()


os.register_at_fork(after_in_child=_pool_after_fork_in_child)


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
