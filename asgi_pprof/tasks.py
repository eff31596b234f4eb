"""Every asyncio task of every running event loop, and every Python thread.

This is what the goroutine profile shows. :func:`snapshot` runs in a worker thread,
never on an event loop: it reads tasks the way a debugger does, under the GIL, and
checks each await chain twice so a task that moved while being read is read again
instead of being reported half-read. The event loops keep running meanwhile; the
worker only takes the GIL for a switch interval at a time.

For a suspended task the stack is its await chain (``cr_await``, ``gi_yieldfrom``,
``ag_await``), task coroutine outermost, with the line each coroutine is at; for the
task running at that moment, the real frames of the thread running it. For a thread,
its current stack.

Creation sites are recorded by a task factory (:func:`track_task_creation`), off by
default: a factory runs for every task created.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
import types
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from . import concurrency
from .model import Frame, Stack, frame_of, function_name, stack_of

__all__ = [
    "Creation",
    "Link",
    "StackRecord",
    "count",
    "note_loop",
    "snapshot",
    "track_task_creation",
]

_MAX_DEPTH = 256
_READ_ATTEMPTS = 4

# --- records --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Creation:
    """Where a task was created: the creating frame, and the task that ran it."""

    frame: Frame
    task_id: int
    task_name: str
    age: float
    """Seconds since creation."""


@dataclass(frozen=True, slots=True)
class Link:
    """An awaited-by link: task ``task_id`` waits for this one, through ``how``."""

    task_id: int
    task_name: str
    how: str
    """``await``, ``gather``, ``TaskGroup`` or ``wait``."""


@dataclass(slots=True)
class StackRecord:
    """One "goroutine": an asyncio task or a Python thread, as seen at one moment."""

    kind: str
    """``task`` or ``thread``."""
    ident: int
    name: str
    state: str
    """Tasks: running, runnable, pending, cancelling. Threads: running or waiting (inferred)."""
    stack: Stack
    """Leaf first."""
    wait: str
    """What it waits on, one word for labels: sleep, event, queue, lock, task, gather, ..."""
    detail: str = ""
    """What it waits on, for people: ``asyncio.sleep(10), 8.2 s left``."""
    waiting: float | None = None
    """Seconds it has waited, where knowable."""
    loop: str = ""
    """Name of the thread running the task's loop; the thread's own name for threads."""
    awaited_by: list[Link] = field(default_factory=list)
    created: Creation | None = None
    tracked: bool = False
    """True when creation tracking was on for this task's loop."""


# --- which loops run where ------------------------------------------------------------

_loop_threads: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, str] = (
    weakref.WeakKeyDictionary()
)
_factory_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
_installing: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def note_loop(track_creation: bool = False) -> None:
    """Remember the running loop's thread; with ``track_creation``, track its tasks.

    Called on the loop by each profile request: a mounted app gets no lifespan events,
    so this is the first moment it can see its loop.
    """
    loop = asyncio.get_running_loop()
    _loop_threads[loop] = threading.current_thread().name
    if track_creation:
        track_task_creation(loop)


def _thread_name(ident: int | None) -> str | None:
    if ident is None:
        return None
    t = threading._active.get(ident)  # type: ignore[attr-defined]
    return t.name if t is not None else f"thread {ident}"


def _loop_label(loop: asyncio.AbstractEventLoop) -> str:
    name = _loop_threads.get(loop)
    if name is None:
        # asyncio loops know their thread; uvloop does not say, and is learnt on requests
        # or when one of its tasks is seen running.
        name = _thread_name(getattr(loop, "_thread_id", None))
        if name is None:
            return f"{type(loop).__name__}@{id(loop):#x}"
    return name


# --- creation tracking ----------------------------------------------------------------

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


def _creation_of(task: asyncio.Task[Any], now: float) -> Creation | None:
    raw = _creations.get(task)
    if raw is None:
        return None
    code, line, mod, pid, pname, when = raw
    if code is None:
        frame = Frame("[created outside any Python frame]", "<unknown>", 0, 0)
    else:
        frame = Frame(function_name(code, mod), code.co_filename, code.co_firstlineno, line)
    return Creation(frame, pid, pname, max(0.0, now - when))


# --- finding every task ---------------------------------------------------------------


def _copy(container: Any) -> list[Any]:
    """Return the items of a set or WeakSet that another thread may be changing."""
    data = getattr(container, "data", None)
    if isinstance(data, set):
        # set.copy() is one C call under the GIL: atomic, unlike iterating a WeakSet.
        return [t for t in (r() for r in data.copy()) if t is not None]
    if isinstance(container, set):
        return list(container.copy())
    return []


def _known_loops() -> list[asyncio.AbstractEventLoop]:
    loops = list(_loop_threads.keys()) + list(_factory_loops)
    # Loops running in other threads show up in their thread's frames (the self of
    # run_forever, or a Runner's loop). Reading locals of running frames is only safe
    # with 3.13's snapshot-free f_locals proxies, and only 3.14 needs it.
    if sys.version_info >= (3, 14):
        for top in sys._current_frames().values():
            f: types.FrameType | None = top
            while f is not None:
                if f.f_code.co_name in ("run_forever", "run_until_complete", "run"):
                    obj = f.f_locals.get("self")
                    cand = getattr(obj, "_loop", obj)
                    if isinstance(cand, asyncio.AbstractEventLoop):
                        loops.append(cand)
                f = f.f_back
    out: dict[int, asyncio.AbstractEventLoop] = {}
    for loop in loops:
        out.setdefault(id(loop), loop)
    return list(out.values())


def _all_tasks() -> list[asyncio.Task[Any]]:
    """Return every task object in the process, each once."""
    mod = asyncio.tasks
    found: list[Any] = []
    for attr in ("_scheduled_tasks", "_all_tasks", "_eager_tasks"):
        container = getattr(mod, attr, None)
        if container is not None and not callable(container):
            found.extend(_copy(container))
    if sys.version_info >= (3, 14):
        # 3.14 keeps native tasks in per-thread lists that only all_tasks(loop) walks.
        for loop in _known_loops():
            # A loop closing under us: its tasks are gone anyway.
            with contextlib.suppress(Exception):
                found.extend(asyncio.all_tasks(loop))
    seen: set[int] = set()
    out = []
    for t in found:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _live(task: asyncio.Task[Any]) -> bool:
    try:
        loop = task.get_loop()
        return not task.done() and loop.is_running() and not loop.is_closed()
    except Exception:
        return False


def count() -> int:
    """Return the number of live tasks of running loops plus threads. Cheap: O(tasks)."""
    return sum(1 for t in _all_tasks() if _live(t)) + len(sys._current_frames())


# --- reading one task -----------------------------------------------------------------

_CORO = types.CoroutineType
_GEN = types.GeneratorType
_AGEN = types.AsyncGeneratorType

_WAITS: dict[str, str] = {
    "asyncio.tasks.sleep": "sleep",
    "asyncio.tasks.__sleep0": "sleep",
    "asyncio.locks.Event.wait": "event",
    "asyncio.locks.Lock.acquire": "lock",
    "asyncio.locks.Semaphore.acquire": "semaphore",
    "asyncio.locks.Condition.wait": "condition",
    "asyncio.locks.Barrier.wait": "barrier",
    "asyncio.queues.Queue.get": "queue",
    "asyncio.queues.Queue.put": "queue",
    "asyncio.queues.Queue.join": "queue",
    "asyncio.streams.StreamReader._wait_for_data": "socket read",
    "asyncio.streams.FlowControlMixin._drain_helper": "socket write",
    "asyncio.selector_events.BaseSelectorEventLoop.sock_recv": "socket read",
    "asyncio.selector_events.BaseSelectorEventLoop.sock_recv_into": "socket read",
    "asyncio.selector_events.BaseSelectorEventLoop.sock_accept": "socket accept",
    "asyncio.selector_events.BaseSelectorEventLoop.sock_sendall": "socket write",
    "asyncio.selector_events.BaseSelectorEventLoop.sock_connect": "socket connect",
    "asyncio.taskgroups.TaskGroup.__aexit__": "taskgroup",
    "asyncio.taskgroups.TaskGroup._aexit": "taskgroup",
    "asyncio.tasks._wait": "wait",
    "asyncio.base_events.BaseEventLoop.run_in_executor": "executor",
}
"""Innermost known coroutine -> what the task waits on."""


class _Moved(Exception):
    """The task changed while it was being read."""


@dataclass(slots=True)
class _Raw:
    task: Any
    coro_frames: list[types.FrameType]
    frames: Stack
    waiter: Any
    running: bool
    created: bool
    kids: tuple[str, Any] | None = None
    """Tasks this one waits for as a group: ("TaskGroup", set) or ("wait", set)."""


def _links(coro: Any) -> tuple[list[tuple[Any, types.FrameType, int]], Any, bool, bool]:
    """Return the await chain of ``coro`` (outermost first), its leaf, running, not-started."""
    chain: list[tuple[Any, types.FrameType, int]] = []
    c = coro
    running = False
    fresh = False
    while c is not None and len(chain) < _MAX_DEPTH:
        t = type(c)
        if t is _CORO:
            fr, nxt, run = c.cr_frame, c.cr_await, c.cr_running
            if not run and not c.cr_suspended and fr is not None:
                # Neither running nor suspended: not started (still at its first line),
                # or finished a moment ago while its task has not yet recorded it.
                if fr.f_lineno != fr.f_code.co_firstlineno:
                    raise _Moved
                fresh = True
        elif t is _GEN:
            fr, nxt, run = c.gi_frame, c.gi_yieldfrom, c.gi_running
        elif t is _AGEN:
            fr, nxt, run = c.ag_frame, c.ag_await, c.ag_running
        else:
            return chain, c, running, fresh
        if fr is None:
            if chain:  # awaiting a coroutine that just finished: the awaiter moves on next
                raise _Moved
            break
        running = running or run
        chain.append((c, fr, fr.f_lasti))
        if nxt is None and t is _CORO and not fresh and not run:
            # A suspended coroutine always awaits something: caught between states
            # (3.13 shows this while the loop thread is mid-step).
            raise _Moved
        c = nxt
    return chain, c, running, fresh


def _next_of(c: Any) -> Any:
    t = type(c)
    if t is _CORO:
        return c.cr_await
    if t is _GEN:
        return c.gi_yieldfrom
    return c.ag_await


def _mid_step(task: Any) -> bool:
    """Return True while the task's loop is running a step of it (it is not suspended).

    Its coroutine can look suspended or finished then without being either: between
    the coroutine returning and the task recording it, for example.
    """
    try:
        return asyncio.current_task(task.get_loop()) is task
    except RuntimeError:
        return False


def _read_suspended(task: Any) -> _Raw:
    if _mid_step(task):
        raise _Moved
    waiter = task._fut_waiter
    coro = task.get_coro()
    chain, leaf, running, fresh = _links(coro)
    if running:
        raise _Moved
    frames = tuple(frame_of(fr) for _, fr, _ in reversed(chain))
    # Read again: the same objects, the same instruction, the same waiter means the
    # chain did not move while it was read (each object is held, so none is recycled).
    if task._fut_waiter is not waiter or task.done() or _mid_step(task):
        raise _Moved
    for i, (c, fr, lasti) in enumerate(chain):
        if fr.f_lasti != lasti:
            raise _Moved
        # The last link too: an awaiter back at the same instruction of a loop awaits a
        # new object, and a chain read across that step would mix two moments.
        nxt = chain[i + 1][0] if i + 1 < len(chain) else leaf
        if _next_of(c) is not nxt:
            raise _Moved
    return _Raw(task, [fr for _, fr, _ in chain], frames, waiter, False, fresh)


def _other_threads() -> dict[int, types.FrameType]:
    """Return the current frame of every thread but this one.

    Never this thread's own frame: kept in a local, it would tie this frame, its
    callers and all their locals into a cycle only a full garbage collection frees,
    and that collection stalls the loop.
    """
    me = threading.get_ident()
    return {k: v for k, v in sys._current_frames().items() if k != me}


def _read_running(task: Any) -> tuple[_Raw, int] | None:
    coro = task.get_coro()
    top = getattr(coro, "cr_frame", None)
    if top is None:
        return None
    for ident, leaf in _other_threads().items():
        depth = 0
        f: types.FrameType | None = leaf
        while f is not None and depth < _MAX_DEPTH:
            if f is top:
                frames = stack_of(leaf, depth + 1)
                if getattr(coro, "cr_running", False):
                    return _Raw(task, [], frames, None, True, False), ident
                return None
            f = f.f_back
            depth += 1
    return None


def _read(task: Any) -> tuple[_Raw | None, int | None]:
    """Return a consistent reading of ``task``, None for a task that finished."""
    for _ in range(_READ_ATTEMPTS):
        if task.done():
            return None, None
        try:
            return _read_suspended(task), None
        except _Moved:
            pass
        got = _read_running(task)
        if got is not None:
            return got
        time.sleep(0)  # let the loop finish the step we caught it in
    return _Raw(task, [], (), None, False, False), None


# --- what a task waits on ---------------------------------------------------------------


def _locals(frame: types.FrameType) -> dict[str, Any]:
    # Only for suspended coroutine frames: nothing runs them while the GIL is ours.
    try:
        return dict(frame.f_locals)
    except Exception:
        return {}


def _fmt_s(s: float) -> str:
    return f"{s:.3g} s"


def _classify(raw: _Raw, rec: StackRecord, now_loop: float | None) -> tuple[str, Any] | None:
    """Fill ``rec.wait``/``detail``/``waiting``; return a TaskGroup or wait set to link."""
    waiter = raw.waiter
    children: tuple[str, Any] | None = None
    for fr, frame in zip(reversed(raw.coro_frames), raw.frames, strict=False):
        kind = _WAITS.get(frame.function)
        if kind is None:
            continue
        rec.wait = kind
        loc = _locals(fr)
        short = frame.function.split(".", 2)[-1]
        rec.detail = short
        if kind == "sleep":
            delay = loc.get("delay", 0)
            handle = loc.get("h")
            if handle is not None and now_loop is not None and hasattr(handle, "when"):
                left = max(0.0, handle.when() - now_loop)
                rec.detail = f"asyncio.sleep({delay!r}), {_fmt_s(left)} left"
                if isinstance(delay, int | float):
                    rec.waiting = max(0.0, float(delay) - left)
            else:
                rec.detail = f"asyncio.sleep({delay!r})"
        elif kind in ("lock", "semaphore", "event", "condition", "queue", "barrier"):
            obj = loc.get("self")
            rec.detail = f"{short} on {_describe(obj)}"
        elif kind == "taskgroup":
            tg_tasks = getattr(loc.get("self"), "_tasks", None)
            n = len(tg_tasks) if tg_tasks is not None else 0
            rec.detail = f"TaskGroup exit, {n} task{'s' if n != 1 else ''} left"
            children = ("TaskGroup", tg_tasks)
        elif kind == "wait":
            fs = loc.get("fs")
            children = ("wait", fs)
            rec.detail = f"asyncio.wait on {len(fs) if fs is not None else '?'} futures"
        break
    else:
        if raw.created:
            rec.wait, rec.detail = "runnable", "not started yet"
        elif waiter is None:
            rec.wait, rec.detail = "runnable", "scheduled to resume"
        elif isinstance(waiter, asyncio.Task):
            rec.wait = "task"
            rec.detail = f"await task {id(waiter):#x} {waiter.get_name()!r}"
        elif hasattr(waiter, "_children"):
            kids = list(waiter._children)
            done = sum(1 for k in kids if k.done())
            rec.wait = "gather"
            rec.detail = f"gather of {len(kids)} ({done} done)"
        else:
            rec.wait = "future"
            rec.detail = f"await {type(waiter).__name__}"
    if not rec.wait:
        rec.wait = "future"
    return children


def _describe(obj: Any) -> str:
    if obj is None:
        return "?"
    name = type(obj).__name__
    bits = []
    if hasattr(obj, "locked") and hasattr(obj, "_waiters"):
        bits.append("locked" if obj.locked() else "unlocked")
    if hasattr(obj, "qsize"):
        bits.append(f"size {obj.qsize()}")
    waiters = getattr(obj, "_waiters", None) or getattr(obj, "_getters", None)
    if waiters is not None:
        with contextlib.suppress(TypeError):
            bits.append(f"{len(waiters)} waiting")
    return f"{name} {id(obj):#x}" + (f" ({', '.join(bits)})" if bits else "")


# --- threads ----------------------------------------------------------------------------

_THREAD_WAITS: dict[str, str] = {
    "selectors.EpollSelector.select": "IO wait",
    "selectors.PollSelector.select": "IO wait",
    "selectors.SelectSelector.select": "IO wait",
    "selectors.KqueueSelector.select": "IO wait",
    "selectors.DevpollSelector.select": "IO wait",
    "threading.Condition.wait": "lock wait",
    "threading.Event.wait": "lock wait",
    "threading.Semaphore.acquire": "lock wait",
    "threading.Thread._wait_for_tstate_lock": "join",
    "threading.Thread.join": "join",
    "queue.Queue.get": "queue",
    "concurrent.futures.thread._worker": "idle worker",
}


def _thread_records(frames: dict[int, types.FrameType]) -> list[StackRecord]:
    """Return a record per thread: those in ``frames`` and this one (Go lists itself too)."""
    stacks = {ident: stack_of(top) for ident, top in frames.items()}
    stacks[threading.get_ident()] = stack_of(sys._getframe())
    out = []
    for ident, stack in stacks.items():
        wait = next(
            (_THREAD_WAITS[f.function] for f in stack[:2] if f.function in _THREAD_WAITS), ""
        )
        name = _thread_name(ident) or f"thread {ident}"
        out.append(
            StackRecord(
                kind="thread",
                ident=ident,
                name=name,
                state="waiting" if wait else "running",
                stack=stack,
                wait=wait or "none",
                detail=f"{wait} (inferred from the innermost frame)" if wait else "",
                loop=name,
            )
        )
    return out


# --- the snapshot ---------------------------------------------------------------------


def snapshot(track_creation: bool = False) -> list[StackRecord]:
    """Return every live task of every running loop and every thread, each once.

    Runs in a worker thread; safe while tasks start and finish on their loops. With
    ``track_creation``, loops seen here get the creation-tracking factory too (each
    from its own thread), so tasks they create from now on have a creation site.
    """
    with concurrency.gc_deferred():
        return _snapshot(track_creation)


def _snapshot(track_creation: bool) -> list[StackRecord]:
    frames = _other_threads()
    now = time.monotonic()
    loop_now: dict[int, float | None] = {}
    records: list[StackRecord] = []
    raws: list[tuple[_Raw, StackRecord]] = []
    for task in _all_tasks():
        if not _live(task):
            continue
        raw, ident = _read(task)
        if raw is None:
            continue  # finished while we looked: no longer a goroutine
        loop = task.get_loop()
        if ident is not None and loop not in _loop_threads:
            with contextlib.suppress(TypeError):
                _loop_threads[loop] = _thread_name(ident) or ""
        state = "pending"
        if raw.running:
            state = "running"
        elif task.cancelling() if hasattr(task, "cancelling") else False:
            state = "cancelling"
        rec = StackRecord(
            kind="task",
            ident=id(task),
            name=task.get_name(),
            state=state,
            stack=raw.frames,
            wait="",
            loop=_loop_label(loop),
            created=_creation_of(task, now),
            tracked=loop in _factory_loops,
        )
        if raw.running:
            rec.wait, rec.detail = "running", "running now"
        elif not raw.frames:
            rec.wait, rec.detail = "unknown", "its stack kept changing while it was read"
            rec.stack = (Frame("[stack changed while being read]", "<unknown>", 0, 0),)
        else:
            if id(loop) not in loop_now:
                try:
                    loop_now[id(loop)] = loop.time()
                except Exception:
                    loop_now[id(loop)] = None
            raw.kids = _classify(raw, rec, loop_now[id(loop)])
            if rec.state == "pending" and rec.wait == "runnable":
                rec.state = "runnable"
        records.append(rec)
        raws.append((raw, rec))
    _link(raws)
    if track_creation:
        _track_foreign_loops(r for r, _ in raws)
    records.sort(key=lambda r: (r.state != "running", r.loop, r.ident))
    return records + _thread_records(frames)


def _link(raws: list[tuple[_Raw, StackRecord]]) -> None:
    """Fill ``awaited_by``: who waits for whom, through await, gather, TaskGroup, wait."""
    by_task = {id(r.task): rec for r, rec in raws}
    by_waiter: dict[int, list[tuple[str, StackRecord]]] = {}
    for raw, rec in raws:
        task, kids = raw.task, raw.kids
        w = raw.waiter
        if w is not None:
            if isinstance(w, asyncio.Task):
                by_waiter.setdefault(id(w), []).append(("await", rec))
            for child in list(getattr(w, "_children", ()) or ()):
                by_waiter.setdefault(id(child), []).append(("gather", rec))
        if kids is not None:
            how, coll = kids
            for child in _copy(coll) if isinstance(coll, set) else list(coll or ()):
                by_waiter.setdefault(id(child), []).append((how, rec))
        # 3.14 records who awaits whom on the future itself.
        for parent in list(getattr(task, "_asyncio_awaited_by", None) or ()):
            prec = by_task.get(id(parent))
            if prec is not None:
                by_waiter.setdefault(id(task), []).append(("await", prec))
    for tid, rec in by_task.items():
        seen: set[int] = set()
        for how, parent in by_waiter.get(tid, ()):
            if parent.ident not in seen and parent is not rec:
                seen.add(parent.ident)
                rec.awaited_by.append(Link(parent.ident, parent.name, how))


def _track_foreign_loops(raws: Iterable[_Raw]) -> None:
    """Install the factory on loops seen in the snapshot, each from its own thread."""
    for raw in raws:
        loop = raw.task.get_loop()
        if loop not in _factory_loops and loop not in _installing:
            try:
                loop.call_soon_threadsafe(track_task_creation, loop)
                _installing.add(loop)  # the callback runs soon: don't queue it twice
            except RuntimeError:
                pass
