"""Where asyncio tasks come from: a task factory that records each task's creation site.

Off by default (a factory runs for every task created): ``track_task_creation`` installs
it on one loop, ``create_app(track_task_creation=True)`` on every loop that serves a
profile request. The goroutine dump shows the site as Go shows "created by".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import types
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .model import Frame, function_name

__all__ = [
    "Creation",
    "is_tracked",
    "site_frame",
    "site_of",
    "track_loops",
    "track_task_creation",
    "tracked_loops",
]


@dataclass(frozen=True, slots=True)
class Creation:
    """Where a task was created: the creating frame, and the task that ran it."""

    frame: Frame
    task_id: int
    task_name: str
    age: float
    """Seconds since creation."""


_factory_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
_installing: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
_creations: weakref.WeakKeyDictionary[asyncio.Task[Any], tuple[Any, ...]] = (
    weakref.WeakKeyDictionary()
)


def _dir_of(module: types.ModuleType | None) -> tuple[str, ...]:
    path = getattr(module, "__file__", None)
    return (os.path.dirname(os.path.abspath(path)) + os.sep,) if path else ()


def _skip_dirs() -> tuple[str, ...]:
    """Return the directories whose frames never count as a creation site.

    asyncio and we create tasks for our callers; so does anyio (start_soon, task
    groups): the caller is the site people want to see.
    """
    return (
        _dir_of(asyncio)
        + _dir_of(sys.modules.get(__name__.rpartition(".")[0]))
        + _dir_of(sys.modules.get("anyio"))
    )


_skip = _skip_dirs()


_FACTORY_RENAMES = (3, 13, 0) <= sys.version_info[:3] < (3, 13, 3)
"""3.13.0-3.13.2 call ``task.set_name(name)`` after any custom task factory, even when no
name was given, so every unnamed task would be called "None" (CPython gh-130033)."""


class _UnrenamedTask(asyncio.Task):  # type: ignore[type-arg]
    """A Task that ignores the ``set_name(None)`` of 3.13.0-3.13.2 (gh-130033)."""

    def set_name(self, value: object) -> None:
        if value is not None:
            super().set_name(value)


_task_type: type[asyncio.Task[Any]] = _UnrenamedTask if _FACTORY_RENAMES else asyncio.Task


def _factory_for(loop: asyncio.AbstractEventLoop, previous: Any) -> Any:
    def task_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        if previous is not None:
            task = previous(loop, coro, **kwargs)
        else:
            task = _task_type(coro, loop=loop, **kwargs)
        f: types.FrameType | None = sys._getframe(1)
        while f is not None and f.f_code.co_filename.startswith(_skip):
            f = f.f_back
        parent = asyncio.current_task(loop)
        # A factory may return something that takes no weak reference: no site then.
        with contextlib.suppress(TypeError):
            _creations[task] = (
                f.f_code if f is not None else None,
                f.f_lineno if f is not None else 0,
                f.f_globals.get("__name__") if f is not None else None,
                id(parent) if parent is not None else 0,
                parent.get_name() if parent is not None else "",
                time.monotonic(),
            )
        return task

    task_factory.__asgi_pprof__ = True  # type: ignore[attr-defined]
    return task_factory


def track_task_creation(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Record where each task created from now on on ``loop`` comes from (idempotent).

    ``loop`` defaults to the running loop. Call it from the thread running ``loop``
    (for example in a lifespan handler); an existing task factory is kept and wrapped.
    """
    if loop is None:
        loop = asyncio.get_running_loop()
    if loop in _factory_loops:
        return
    previous = loop.get_task_factory()
    if getattr(previous, "__asgi_pprof__", False):
        _factory_loops.add(loop)
        return
    loop.set_task_factory(_factory_for(loop, previous))
    _factory_loops.add(loop)


def is_tracked(loop: asyncio.AbstractEventLoop) -> bool:
    """Return True when ``loop`` records creation sites."""
    return loop in _factory_loops


def tracked_loops() -> list[asyncio.AbstractEventLoop]:
    """Return the loops that record creation sites (any thread may call this)."""
    # The WeakSet's own set, copied in one C call: iterating the WeakSet itself from
    # another thread can meet a change of size.
    data: set[weakref.ref[asyncio.AbstractEventLoop]] = _factory_loops.data  # type: ignore[attr-defined]
    return [loop for loop in (r() for r in data.copy()) if loop is not None]


Site = tuple[Any, int, Any]
"""Where a task was created, as recorded: (code or None, line, module name)."""

_OUTSIDE = Frame("[created outside any Python frame]", "<unknown>", 0, 0)


def site_of(task: asyncio.Task[Any]) -> tuple[Site, int, str, float] | None:
    """Return (site, creating task id or 0, its name, monotonic time) or None if unrecorded."""
    raw = _creations.get(task)
    if raw is None:
        return None
    code, line, mod, pid, pname, when = raw
    return (code, line, mod), pid, pname, when


def site_frame(site: Site) -> Frame:
    """Return the Frame of a recorded creation site."""
    code, line, mod = site
    if code is None:
        return _OUTSIDE
    return Frame(function_name(code, mod), code.co_filename, code.co_firstlineno, line)


def track_loops(loops: Iterable[asyncio.AbstractEventLoop]) -> None:
    """Install the factory on ``loops``, each from its own thread, soon (from any thread)."""
    for loop in loops:
        if loop not in _factory_loops and loop not in _installing:
            try:
                loop.call_soon_threadsafe(track_task_creation, loop)
                _installing.add(loop)  # the callback runs soon: don't queue it twice
            except RuntimeError:
                pass
