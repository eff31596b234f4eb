"""Profiler labels (Go's ``pprof.Do`` / ``pprof.Labels``) for sync and async code.

:func:`labels` sets labels for the code it wraps (a ``with`` block, sync or async); they
live in a :class:`contextvars.ContextVar`, so each asyncio task has its own and they nest
and restore. :class:`LabelMiddleware` labels every request of the parent app with
``http.method`` and ``http.route`` (the route's template, ``/items/{id}``, learnt after
routing from ``scope["route"]`` as Starlette and FastAPI set it).

Reading them, for samplers:

- :func:`current_labels`: the calling context's labels (a ``SIGPROF`` handler on the main
  thread runs in the interrupted task's context, so it gets that task's).
- :func:`context_labels`: the labels of a ``contextvars.Context`` (a suspended task's).
- :func:`thread_labels`: another thread's labels, for a sampler thread. Recorded per
  thread by :func:`labels` outside an event loop, and by the threadpool hop of sync
  routes (``anyio.to_thread.run_sync``, which Starlette and FastAPI use) once a
  :class:`LabelMiddleware` exists: the worker records the labels of the context it runs.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .model import Labels

__all__ = [
    "LabelMiddleware",
    "all_thread_labels",
    "context_labels",
    "current_labels",
    "labels",
    "task_labels",
    "thread_labels",
]


class _LabelSet:
    """One level of labels: its own pairs over its parent's; a request's are read lazily."""

    __slots__ = ("_done", "pairs", "parent", "request")

    def __init__(
        self, parent: _LabelSet | None, pairs: Labels, request: _Request | None = None
    ) -> None:
        self.parent = parent
        self.pairs = pairs
        self.request = request
        self._done: Labels | None = None

    def resolve(self) -> Labels:
        """Return the labels in effect at this level, sorted by key."""
        done = self._done
        if done is not None:
            return done
        merged: dict[str, str] = {}
        final = True
        if self.parent is not None:
            merged.update(self.parent.resolve())
            final = self.parent._done is not None
        if self.request is not None:
            pairs, known = self.request.pairs()
            merged.update(pairs)
            final = final and known
        merged.update(self.pairs)
        out = tuple(sorted(merged.items()))
        if final:  # a request level before routing is read again next time
            self._done = out
        return out


_current: contextvars.ContextVar[_LabelSet | None] = contextvars.ContextVar(
    "asgi_pprof_labels", default=None
)

_by_thread: dict[int, _LabelSet] = {}
"""Thread ident -> labels in effect there, for threads without a running event loop."""

_TASK_CONTEXT = hasattr(asyncio.Task, "get_context")  # 3.12+
_by_task: dict[Any, _LabelSet] = {}
"""3.11 only, where a task's context cannot be read: task -> labels set in it. A plain
dict (no weak references to make per request): every entry is removed when its block
ends, which a task that is dropped mid-block still does (its coroutine is closed)."""


def _enter_task(level: _LabelSet) -> tuple[Any, _LabelSet | None]:
    task = asyncio.current_task()
    if task is None:
        return None, None
    before = _by_task.get(task)
    _by_task[task] = level
    return task, before


def _leave_task(task: Any, before: _LabelSet | None) -> None:
    if task is None:
        return
    if before is None:
        _by_task.pop(task, None)
    else:
        _by_task[task] = before


@contextmanager
def labels(**kv: str) -> Iterator[None]:
    """Label the samples of the code in this ``with`` block (nested labels override).

    ``with asgi_pprof.labels(tenant="acme"):`` works in sync and async code; each task
    has its own labels. Keys and values are strings.
    """
    for k, v in kv.items():
        if not isinstance(v, str):
            raise TypeError(f"label {k!r} must be a str, not {type(v).__name__}")
    level = _LabelSet(_current.get(), tuple(sorted(kv.items())))
    token = _current.set(level)
    # Outside an event loop (a worker thread) the thread is the unit a sampler thread
    # sees: record it there too. On a loop thread many tasks interleave, so only the
    # context (read by the SIGPROF handler and from each task) is right.
    per_thread = asyncio._get_running_loop() is None
    ident = threading.get_ident()
    before = _by_thread.get(ident) if per_thread else None
    if per_thread:
        _by_thread[ident] = level
    task, task_before = (None, None) if per_thread or _TASK_CONTEXT else _enter_task(level)
    try:
        yield
    finally:
        _current.reset(token)
        _leave_task(task, task_before)
        if per_thread:
            if before is None:
                _by_thread.pop(ident, None)
            else:
                _by_thread[ident] = before


def current_labels() -> Labels:
    """Return the labels of the calling context, sorted by key (``()`` when none)."""
    level = _current.get()
    return () if level is None else level.resolve()


def context_labels(ctx: contextvars.Context | None) -> Labels:
    """Return the labels of ``ctx`` (a task's context); ``()`` when none or no context."""
    if ctx is None:
        return ()
    level = ctx.get(_current)
    return () if level is None else level.resolve()


def task_labels(task: Any) -> Labels:
    """Return the labels of an asyncio task, running or suspended, from any thread.

    3.12+: read from the task's context (every task, inherited labels too). 3.11, whose
    tasks do not show their context: the labels set in the task itself (:func:`labels`,
    :class:`LabelMiddleware`), else, for a suspended task, the context its wake-up
    callback will run in; a running task that only inherited its labels shows none.
    """
    if _TASK_CONTEXT:
        return context_labels(task.get_context())
    level = _by_task.get(task)
    if level is not None:
        return level.resolve()
    waiter = getattr(task, "_fut_waiter", None)
    for callback, ctx in getattr(waiter, "_callbacks", None) or ():
        if getattr(callback, "__self__", None) is task:
            return context_labels(ctx)
    return ()


def thread_labels(ident: int) -> Labels:
    """Return the labels recorded for thread ``ident`` now, ``()`` when none.

    Safe from any thread (one dict lookup). Covers code in :func:`labels` blocks outside
    an event loop, and sync routes in the threadpool once a :class:`LabelMiddleware`
    exists; not other context copies (``asyncio.to_thread``, ``run_in_executor``).
    """
    level = _by_thread.get(ident)
    return () if level is None else level.resolve()


def all_thread_labels() -> dict[int, Labels]:
    """Return {thread ident: labels} of every thread that has some now (one C copy first:
    call it right after reading the threads' stacks)."""
    return {ident: level.resolve() for ident, level in _by_thread.copy().items()}


# --- the request's labels ----------------------------------------------------------------


class _Request:
    """``http.method`` and ``http.route`` of one request; the route is known after routing."""

    __slots__ = ("method", "prefix", "scope")

    def __init__(self, scope: dict[str, Any]) -> None:
        self.scope = scope
        self.method = str(scope.get("method", ""))
        self.prefix = str(scope.get("root_path", ""))

    def pairs(self) -> tuple[Labels, bool]:
        """Return the labels and whether the route is known (they will not change)."""
        route = route_template(self.scope, self.prefix)
        if route is None:
            return (("http.method", self.method),), False
        return (("http.method", self.method), ("http.route", route)), True


def route_template(scope: dict[str, Any], prefix: str = "") -> str | None:
    """Return the template of the route ``scope`` was routed to (``/items/{id}``), or None.

    Mounts below the middleware add their (literal) path: the root path gained since
    ``prefix``.
    """
    route = scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return None
    root = scope.get("root_path", "")
    mounted = root[len(prefix) :] if isinstance(root, str) and root.startswith(prefix) else ""
    return mounted + path


class LabelMiddleware:
    """ASGI middleware: label each HTTP request with ``http.method`` and ``http.route``.

    ``app.add_middleware(LabelMiddleware)`` on the parent app (FastAPI or Starlette).
    The route is the template (bounded cardinality); a request no route matched has no
    ``http.route``. Creating one also makes the threadpool hop of sync routes record
    the request's labels for the worker thread (:func:`thread_labels`).
    """

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        install_thread_hop()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        level = _LabelSet(_current.get(), (), _Request(scope))
        token = _current.set(level)
        task, before = (None, None) if _TASK_CONTEXT else _enter_task(level)
        try:
            await self.app(scope, receive, send)
        finally:
            _current.reset(token)
            _leave_task(task, before)


# --- the threadpool hop ----------------------------------------------------------------

_hop_lock = threading.Lock()
_hop_installed = False


def _run_labelled(level: _LabelSet, func: Callable[..., Any], *args: Any) -> Any:
    ident = threading.get_ident()
    before = _by_thread.get(ident)
    _by_thread[ident] = level
    try:
        return func(*args)
    finally:
        if before is None:
            _by_thread.pop(ident, None)
        else:
            _by_thread[ident] = before


def install_thread_hop() -> None:
    """Wrap ``anyio.to_thread.run_sync`` so a labelled caller's worker thread is recorded.

    Starlette's ``run_in_threadpool`` (sync routes, FastAPI's sync dependencies) calls it
    by attribute at each call, so the wrapper sees them all. Unlabelled calls pass
    straight through. Idempotent.
    """
    global _hop_installed
    import anyio.to_thread

    with _hop_lock:
        if _hop_installed:
            return
        original = anyio.to_thread.run_sync

        @functools.wraps(original)
        async def run_sync(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            level = _current.get()
            if level is not None:
                func = functools.partial(_run_labelled, level, func)
            return await original(func, *args, **kwargs)

        anyio.to_thread.run_sync = run_sync  # type: ignore[assignment]
        _hop_installed = True
