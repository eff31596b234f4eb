"""Seeing waits on threading and asyncio primitives, for the ``block`` and ``mutex`` profiles.

:func:`install` puts the hooks in while either profile is on; :func:`uninstall` takes
every one of them out again, so "off" costs nothing. Exactly what is seen:

* **threading.Lock / threading.RLock**: C types whose methods cannot be hooked, so while
  the profiles are on, ``threading.Lock`` and ``threading.RLock`` make profiled wrappers.
  Only locks made through those names *after* switching on are seen (this includes the
  locks inside every ``Condition``, ``Semaphore``, ``Event``, ``Barrier`` and
  ``queue.Queue`` made after switching on, and those of logging handlers). Locks made
  before, or through ``_thread.allocate_lock`` or a ``from threading import Lock`` done
  before switching on, are not. Switch on early (the environment variables, read at
  ``import asgi_pprof``) to see module-level locks. Wrappers made while on stay
  wrappers after switching off and then only pass calls through.
* **threading.Condition.wait** (and so ``Semaphore``/``BoundedSemaphore.acquire``,
  ``Event.wait``, ``Barrier.wait``, ``queue.Queue.get``/``put``, which all wait there)
  and **Thread.join**: hooked on the class, so every instance is seen, old or new.
* **asyncio** ``Lock``, ``Semaphore``/``BoundedSemaphore``, ``Condition.wait``,
  ``Event.wait``, ``Queue`` (and subclasses) ``get``/``put``, ``Barrier.wait``: hooked on
  the class, every instance is seen. The wait timed is the time the task was suspended
  in the ``await`` (an acquire that does not suspend records nothing), and the stack is
  the task's await chain.

A wait inside another profiled wait (the lock a ``Condition.wait`` takes back, the
``Condition`` inside a ``Barrier``) is part of the outer one and is not recorded again.
"""

from __future__ import annotations

import _thread
import asyncio
import contextvars
import sys
import threading
import time
import types
from collections.abc import Callable, Generator
from typing import Any

from . import contention
from .model import Frame

__all__ = ["install", "installed", "uninstall"]

_now = time.perf_counter_ns
_allocate = _thread.allocate_lock
_RLockType: Callable[[], Any] = _thread.RLock
_acct = _allocate()
"""Guards the waiter accounting of threading wrappers (a raw lock: never profiled)."""
_local = threading.local()
_MY_FILE = __file__


def _caller(frame: types.FrameType | None) -> types.FrameType | None:
    """Return the first frame outside this module (the user's side of the call)."""
    while frame is not None and frame.f_code.co_filename == _MY_FILE:
        frame = frame.f_back
    return frame


class _Waits:
    """Waiting accrued on one lock while it was held: Go 1.22's per-waiter mutex delay.

    ``accrued`` grows at ``waiting`` ns per ns; a release charges it to the releaser and
    starts again; an acquire by a waiter drops what accrued while nobody held the lock.
    """

    __slots__ = ("accrued", "mark", "waiting")

    def __init__(self) -> None:
        self.waiting = 0
        self.mark = 0
        self.accrued = 0

    def accrue(self, now: int) -> None:
        if self.waiting:
            self.accrued += self.waiting * (now - self.mark)
        self.mark = now

    def start(self, now: int) -> None:
        self.accrue(now)
        self.waiting += 1

    def end(self, now: int, acquired: bool) -> None:
        self.accrue(now)
        self.waiting -= 1
        if acquired:
            self.accrued = 0

    def drop(self, now: int) -> None:
        """Forget what accrued while the lock was free (nobody to charge it to)."""
        self.accrue(now)
        self.accrued = 0

    def take(self, now: int) -> int:
        self.accrue(now)
        out, self.accrued = self.accrued, 0
        return out


# --- threading ------------------------------------------------------------------------------


def _inside() -> bool:
    return getattr(_local, "inside", False)


def _named(name: str) -> Frame:
    return Frame(name, threading.__file__, 0, 0)


class _ProfiledLock:
    """``threading.Lock`` while the profiles are on: times acquires that really block."""

    __slots__ = ("__weakref__", "_lock", "_waits")
    _ACQUIRE = _named("threading.Lock.acquire")
    _RELEASE = _named("threading.Lock.release")

    def __init__(self) -> None:
        self._lock = self._make()
        self._waits = _Waits()

    @staticmethod
    def _make() -> Any:
        return _allocate()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Acquire the lock as ``threading.Lock.acquire`` does."""
        if self._lock.acquire(False):
            if self._waits.waiting:
                self._barged()
            return True
        if not blocking:
            return False
        return self._blocked(timeout, sys._getframe(1))

    def _barged(self) -> None:
        # Took a free lock ahead of its waiters: what accrued since the release is nobody's.
        with _acct:
            self._waits.drop(_now())

    def _blocked(self, timeout: float, frame: types.FrameType | None) -> bool:
        w = self._waits
        t0 = _now()
        with _acct:
            w.start(t0)
        ok = False
        try:
            ok = bool(self._lock.acquire(True, timeout))
        finally:
            t1 = _now()
            with _acct:
                w.end(t1, ok)
        if not _inside():
            contention.record_block(_caller(frame), t1 - t0, None, self._ACQUIRE)
        return ok

    def __enter__(self) -> bool:
        if self._lock.acquire(False):
            if self._waits.waiting:
                self._barged()
            return True
        return self._blocked(-1, sys._getframe(1))

    def _final(self) -> bool:
        return True

    def release(self) -> None:
        """Release the lock; charge the waiting it caused to this stack (mutex)."""
        if not self._waits.waiting or not self._final():
            self._lock.release()
            return
        with _acct:
            delay = self._waits.take(_now())
        self._lock.release()
        if delay:
            contention.record_mutex(_caller(sys._getframe(1)), delay, None, self._RELEASE)

    def __exit__(self, *exc: object) -> None:
        self.release()

    def locked(self) -> bool:
        """Return True when the lock is held."""
        return bool(self._lock.locked())

    def _at_fork_reinit(self) -> None:
        self._lock._at_fork_reinit()
        self._waits = _Waits()

    def __repr__(self) -> str:
        return f"<asgi_pprof profiled {self._lock!r}>"


class _ProfiledRLock(_ProfiledLock):
    """``threading.RLock`` while the profiles are on; speaks ``Condition``'s private protocol."""

    __slots__ = ()
    _ACQUIRE = _named("threading.RLock.acquire")
    _RELEASE = _named("threading.RLock.release")

    @staticmethod
    def _make() -> Any:
        return _RLockType()

    def _final(self) -> bool:
        return bool(self._lock._recursion_count() == 1)

    def locked(self) -> bool:  # RLock has no locked() before 3.14
        """Return True when some thread holds the lock."""
        if self._lock.acquire(False):
            held = bool(self._lock._recursion_count() > 1)
            self._lock.release()
            return held
        return True

    def _is_owned(self) -> bool:
        return bool(self._lock._is_owned())

    def _release_save(self) -> Any:
        # Condition.wait lets go of the lock entirely: the end of a critical section.
        if self._waits.waiting:
            with _acct:
                delay = self._waits.take(_now())
            state = self._lock._release_save()
            if delay:
                contention.record_mutex(_caller(sys._getframe(1)), delay, None, self._RELEASE)
            return state
        return self._lock._release_save()

    def _acquire_restore(self, state: Any) -> None:
        w = self._waits
        with _acct:
            w.start(_now())
        try:
            self._lock._acquire_restore(state)
        finally:
            with _acct:
                w.end(_now(), True)

    def _recursion_count(self) -> int:
        return int(self._lock._recursion_count())


def _cond_wait(orig: Callable[..., bool]) -> Callable[..., bool]:
    def wait(self: threading.Condition, timeout: float | None = None) -> bool:
        if _inside():
            return orig(self, timeout)
        _local.inside = True
        t0 = _now()
        try:
            return orig(self, timeout)
        finally:
            _local.inside = False
            contention.record_block(_caller(sys._getframe(1)), _now() - t0, None, leaf)

    leaf = contention.leaf_of(orig)
    wait.__doc__ = orig.__doc__
    return wait


def _thread_join(orig: Callable[..., None]) -> Callable[..., None]:
    def join(self: threading.Thread, timeout: float | None = None) -> None:
        if not self.is_alive() or _inside():
            return orig(self, timeout)
        t0 = _now()
        try:
            return orig(self, timeout)
        finally:
            contention.record_block(_caller(sys._getframe(1)), _now() - t0, None, leaf)

    leaf = contention.leaf_of(orig)
    join.__doc__ = orig.__doc__
    return join


# --- asyncio ---------------------------------------------------------------------------------

_in_wait: contextvars.ContextVar[bool] = contextvars.ContextVar("asgi_pprof_in_wait", default=False)
_WAITS_ATTR = "_asgi_pprof_waits"


@types.coroutine
def _rest(coro: Any, first: Any, on_end: Callable[[bool], None]) -> Generator[Any, Any, Any]:
    """Return what ``coro`` returns, driving it on from its first suspension (``first``).

    ``on_end(ok)`` runs when the wait ends, in the task, however it ends. asyncio always
    resumes a task with ``send(None)``; exceptions (cancellation) are thrown in.
    """
    ok = False
    try:
        y = first
        while True:
            try:
                sent = yield y
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    y = coro.throw(exc)
                except StopIteration as stop:
                    ok = True
                    return stop.value
            else:
                try:
                    y = coro.send(sent)
                except StopIteration as stop:
                    ok = True
                    return stop.value
    finally:
        on_end(ok)


def _timed_async(orig: Callable[..., Any], nests: bool = False) -> Callable[..., Any]:
    """Return an ``async def`` that runs ``orig`` and records the time it was suspended.

    ``nests``: ``orig`` waits on other profiled primitives, which then record nothing.
    """

    async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        nested = _in_wait.get()
        token = _in_wait.set(True) if nests and not nested else None
        try:
            coro = orig(self, *args, **kwargs)
            try:
                first = coro.send(None)
            except StopIteration as stop:
                return stop.value  # did not suspend: not a blocking event
            if nested:
                return await _rest(coro, first, _ignore)
            t0 = _now()
            frame = _caller(sys._getframe(0))
            stop_at = contention.task_frame()

            def on_end(ok: bool) -> None:
                contention.record_block(frame, _now() - t0, stop_at, leaf)

            return await _rest(coro, first, on_end)
        finally:
            if token is not None:
                _in_wait.reset(token)

    leaf = contention.leaf_of(orig)
    method.__doc__ = orig.__doc__
    method.__name__ = orig.__name__
    method.__qualname__ = orig.__qualname__
    return method


def _ignore(ok: bool) -> None:
    pass


def _waits_of(lock: asyncio.Lock) -> _Waits:
    w: _Waits | None = lock.__dict__.get(_WAITS_ATTR)
    if w is None:
        w = lock.__dict__[_WAITS_ATTR] = _Waits()
    return w


def _alock_acquire(orig: Callable[..., Any]) -> Callable[..., Any]:
    async def acquire(self: asyncio.Lock) -> bool:
        coro = orig(self)
        try:
            first = coro.send(None)
        except StopIteration as stop:
            w0: _Waits | None = self.__dict__.get(_WAITS_ATTR)
            if w0 is not None and w0.waiting:  # took a free lock ahead of waiters
                w0.drop(_now())
            return bool(stop.value)
        t0 = _now()
        w = _waits_of(self)
        w.start(t0)
        frame = _caller(sys._getframe(0))
        stop_at = contention.task_frame()

        def on_end(ok: bool) -> None:
            t1 = _now()
            w.end(t1, ok)
            if not _in_wait.get():
                contention.record_block(frame, t1 - t0, stop_at, leaf)

        return bool(await _rest(coro, first, on_end))

    leaf = contention.leaf_of(orig)
    acquire.__doc__ = orig.__doc__
    return acquire


def _alock_release(orig: Callable[..., None]) -> Callable[..., None]:
    def release(self: asyncio.Lock) -> None:
        w: _Waits | None = self.__dict__.get(_WAITS_ATTR)
        if w is None or not w.waiting:
            return orig(self)
        delay = w.take(_now())
        orig(self)
        if delay:
            frame = _caller(sys._getframe(1))
            contention.record_mutex(frame, delay, contention.task_frame(), leaf)

    leaf = contention.leaf_of(orig)
    release.__doc__ = orig.__doc__
    return release


# --- installing ------------------------------------------------------------------------------

_saved: list[tuple[object, str, object]] = []
_install_lock = _allocate()


def _targets() -> list[tuple[object, str, object]]:
    import queue

    out: list[tuple[object, str, object]] = [
        (threading, "Lock", _ProfiledLock),
        (threading, "RLock", _ProfiledRLock),
        (threading.Condition, "wait", _cond_wait(threading.Condition.wait)),
        (threading.Thread, "join", _thread_join(threading.Thread.join)),
        (asyncio.Lock, "acquire", _alock_acquire(asyncio.Lock.acquire)),
        (asyncio.Lock, "release", _alock_release(asyncio.Lock.release)),
        (asyncio.Semaphore, "acquire", _timed_async(asyncio.Semaphore.acquire)),
        (asyncio.Condition, "wait", _timed_async(asyncio.Condition.wait, nests=True)),
        (asyncio.Event, "wait", _timed_async(asyncio.Event.wait)),
        (asyncio.Queue, "get", _timed_async(asyncio.Queue.get)),
        (asyncio.Queue, "put", _timed_async(asyncio.Queue.put)),
        (asyncio.Barrier, "wait", _timed_async(asyncio.Barrier.wait, nests=True)),
    ]
    del queue  # queue.Queue waits in threading.Condition.wait: nothing of its own to hook
    return out


def installed() -> bool:
    """Return True while the hooks are in."""
    return bool(_saved)


def install() -> None:
    """Put every hook in (idempotent)."""
    with _install_lock:
        if _saved:
            return
        for owner, attr, new in _targets():
            _saved.append((owner, attr, owner.__dict__[attr]))
            setattr(owner, attr, new)


def uninstall() -> None:
    """Take every hook out again (idempotent): the originals are back, nothing is wrapped."""
    with _install_lock:
        while _saved:
            owner, attr, old = _saved.pop()
            setattr(owner, attr, old)
