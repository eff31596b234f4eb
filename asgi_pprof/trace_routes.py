"""Which HTTP request a loop step serves: ``GET /items/{item_id}`` from the ASGI scope.

Every request an ASGI server handles is one task whose coroutine was called with the
request's scope (``app(scope, receive, send)``), or with an object that holds it
(uvicorn: ``RequestResponseCycle.run_asgi(self, app)``, ``self.scope``). The trace's task
factory sees each task before its first step: its coroutine has not started, so its
frame's locals are exactly its arguments. :func:`find_scope` looks there, once per task,
and only while a coroutine's code keeps yielding scopes (:class:`Requests` remembers
codes that do not). No server or framework internals are read: only the ASGI scope,
which routing fills in place (Starlette and FastAPI set ``route``, ``endpoint`` and
``path_params`` in the scope they were given).

The label is computed when the request's task finishes (or when the capture ends), from
the path with its path parameters put back as ``{name}``: ``/items/42`` routed with
``path_params={"item_id": 42}`` is ``/items/{item_id}``, mounts included. Paths that no
route matched would make one label per URL (a scanner): at most ``MAX_UNROUTED`` of them
are kept, then they share one label; the total is bounded by ``MAX_LABELS``.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Iterator
from typing import Any, TypeGuard

__all__ = ["MAX_LABELS", "MAX_UNROUTED", "Requests", "find_scope", "template"]

MAX_LABELS = 500
"""Most distinct request labels one trace keeps."""
MAX_UNROUTED = 50
"""Most distinct labels of requests no route matched (their label is their path)."""

_KINDS = frozenset({"http", "websocket"})
_UNKNOWN: Any = ("", False)  # a coroutine code not seen yet (compared by identity)


def _is_scope(value: object) -> TypeGuard[dict[str, Any]]:
    return type(value) is dict and value.get("type") in _KINDS and "path" in value


_getattribute = object.__getattribute__
_in_class: dict[type, bool] = {}
"""Per type: whether a class of its MRO defines ``scope`` (a property, a slot, a default)."""


def _scope_attr(value: object) -> object:
    """Return ``value``'s own instance attribute ``scope``, None when it has none.

    Never a class's: no property or ``__getattr__`` runs. Read without making the
    instance's ``__dict__`` where it has none yet (3.11+ keep plain attributes inline until
    ``__dict__`` is read, and every later attribute read of the object would be slower).
    """
    tp = type(value)
    in_class = _in_class.get(tp)
    if in_class is None:
        in_class = any("scope" in vars(base) for base in tp.__mro__)
        if len(_in_class) < 10_000:
            _in_class[tp] = in_class
    try:
        if not in_class:
            return _getattribute(value, "scope")  # no descriptor: the instance's own
        d = _getattribute(value, "__dict__")
    except (AttributeError, TypeError):
        return None
    return d.get("scope") if type(d) is dict else None


Where = tuple[str, bool]
"""Where a coroutine's scope was found: (argument name, whether it is that argument's ``scope``)."""


def find_scope(coro: object) -> tuple[dict[str, Any], Where] | None:
    """Return the ASGI http/websocket scope a not yet started coroutine was called with,
    and where it was, or None when there is none.

    Looks at the coroutine's arguments and at the plain attributes (``scope``) of its
    arguments.
    """
    frame = getattr(coro, "cr_frame", None)
    if not isinstance(frame, types.FrameType):
        return None
    for name, value in frame.f_locals.items():
        if _is_scope(value):
            return value, (name, False)
        scope = _scope_attr(value)
        if _is_scope(scope):
            return scope, (name, True)
    return None


_FrameType = types.FrameType


def _scope_at(coro: object, where: Where) -> dict[str, Any] | None:
    """Return the scope where the same coroutine code had it last time, or None.

    Once per request task: :func:`_is_scope` written out.
    """
    frame = getattr(coro, "cr_frame", None)
    if type(frame) is not _FrameType:
        return None
    value = frame.f_locals.get(where[0])
    if where[1]:
        value = _scope_attr(value)
    if type(value) is dict and value.get("type") in _KINDS and "path" in value:
        return value
    return None


def template(path: str, params: object) -> str:
    """Return ``path`` with each path parameter's value replaced by ``{name}``.

    ``/users/7/items/42`` with ``{"user": 7, "item_id": 42}`` is
    ``/users/{user}/items/{item_id}``. A value is replaced only where it is whole path
    segments, the rightmost such place first (routes put parameters after fixed parts).
    """
    if type(params) is not dict or not params:
        return path
    out = path
    for name, value in reversed(params.items()):
        text = str(value)
        if not text:
            continue
        end = len(out)
        while True:
            at = out.rfind(text, 0, end)
            if at < 0:
                break
            stop = at + len(text)
            if (at == 0 or out[at - 1] == "/") and (stop == len(out) or out[stop] == "/"):
                out = f"{out[:at]}{{{name}}}{out[stop:]}"
                break
            end = at + len(text) - 1
            if end <= 0:
                break
    return out


def _mount_template(scope: dict[str, Any]) -> str | None:
    """Return ``<mount prefix>/{path}`` when the request went to a mounted plain ASGI app.

    Routers record the route they matched (Starlette: ``scope["route"]``, a ``Mount`` for a
    mounted app; FastAPI only for its own routes); a mount also moves its prefix into
    ``root_path``. Whatever path follows the prefix is the mounted app's business, one
    label per URL if kept: it becomes ``{path}``.
    """
    route = scope.get("route")
    if route is not None and type(route).__name__ not in ("Mount", "Host"):
        return None
    root = scope.get("root_path")
    top = scope.get("app_root_path", "")
    path = scope.get("path")
    if not isinstance(root, str) or not isinstance(path, str) or root == top:
        return None
    if not path.startswith(root) or len(path) <= len(root) + 1:
        return None
    return template(root, scope.get("path_params")) + "/{path}"


class Requests:
    """One capture's requests: task -> request number, and each request's label.

    Used on the loop's thread only (the task factory and the step hook).
    """

    def __init__(self) -> None:
        # The C step hook (``_tracestep``) reads and fills the public dicts below in
        # place (they are never rebound): both hooks number and label requests as one.
        self.of_task: dict[int, int] = {}
        """``id(task) -> request number`` for live request tasks."""
        self.labels: dict[int, str] = {}
        """``request number -> label``, once the request finished or the capture ended."""
        self.scopes: dict[int, dict[str, Any]] = {}
        """``request number -> scope`` of requests not labelled yet."""
        self.by_path: dict[tuple[str, str], str] = {}
        """``(method, path) -> label``: the same method and path route the same way."""
        self.scope_at: dict[types.CodeType, int | bool] = {}
        """The C hook's memo per coroutine code: where its scope was, False for none."""
        self.numbers: Iterator[int] = itertools.count(1)
        """The request numbers still free (shared by both hooks)."""
        self._codes: dict[types.CodeType, Where | None] = {}
        """Per coroutine code: where its scope is, or None when it has none."""
        self._distinct: set[str] = set()
        self._unrouted = 0

    def task_created(self, key: int, coro: object, code: types.CodeType | None) -> int | None:
        """Return the request number of a new task (``key``: its id), None if it serves none."""
        where = self._codes.get(code, _UNKNOWN) if code is not None else None
        if where is None:
            self.of_task.pop(key, None)  # an id of a task gone before it finished
            return None
        scope = _scope_at(coro, where) if where is not _UNKNOWN else None
        if scope is None:
            found = find_scope(coro)
            if found is None:
                if where is _UNKNOWN and code is not None:
                    self._codes[code] = None  # this coroutine is not a server's request
                self.of_task.pop(key, None)
                return None
            scope, new_where = found
            if code is not None:
                self._codes[code] = new_where
        n = next(self.numbers)
        self.of_task[key] = n
        self.scopes[n] = scope
        return n

    def finished(self, n: int) -> None:
        """Compute the label of request ``n`` (its task finished) and forget its scope."""
        scope = self.scopes.pop(n, None)
        if scope is not None:
            self.labels[n] = self.label(scope)

    def finish_all(self) -> None:
        """Label every request still running (the capture ends)."""
        for n in list(self.scopes):
            self.finished(n)
        self.of_task.clear()
        self._codes.clear()
        self.scope_at.clear()

    def label(self, scope: dict[str, Any]) -> str:
        """Return ``METHOD /route/{param}`` for a scope, bounded in number (see the module)."""
        method = scope.get("method")
        if not isinstance(method, str):
            method = "WEBSOCKET" if scope.get("type") == "websocket" else "?"
        path = scope.get("path")
        if not isinstance(path, str):
            path = "?"
        # The same method and path route the same way: most requests are a lookup.
        key = (method, path)
        text = self.by_path.get(key)
        if text is None:
            text = self._label(scope, method, path)
            if len(self.by_path) < 10_000:
                self.by_path[key] = text
        return text

    def _label(self, scope: dict[str, Any], method: str, path: str) -> str:
        routed = "endpoint" in scope or "route" in scope
        tail = _mount_template(scope) if routed else None
        if tail is None:
            tail = template(path, scope.get("path_params")) if routed else path
        text = f"{method} {tail}"
        if text in self._distinct:
            return text
        if not routed:
            if self._unrouted >= MAX_UNROUTED:
                return f"{method} (a path no route matched)"
            self._unrouted += 1
        if len(self._distinct) >= MAX_LABELS:
            return f"{method} (more routes than the trace labels)"
        self._distinct.add(text)
        return text
