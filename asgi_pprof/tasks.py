"""Every asyncio task of every running event loop, and every Python thread.

This is what the goroutine profile shows. :func:`snapshot` runs in a worker thread,
never on an event loop: it finds every task, reads each the way a debugger does, under
the GIL (:mod:`chains`: the await chain, read twice), and links who awaits whom. The
event loops keep running meanwhile: the reader gives the GIL back every millisecond,
makes no long C call, and keeps tasks as rows of plain values the
garbage collector soon stops tracking (stacks and frames are shared), so reading
10 000 tasks brings on no full collection and needs no deferred one.

What each waits on comes from :mod:`waits`; where each was created, from
:mod:`creation` (off by default); the loops we know of, from :func:`known_loops`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import operator
import sys
import threading
import time
import types
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import chains, creation, waits
from .creation import Creation, track_task_creation
from .labelling import task_labels, thread_labels
from .model import Frame, Labels, Stack
from .sampler import sample_stack

__all__ = [
    "Creation",
    "Link",
    "Snapshot",
    "StackRecord",
    "count",
    "known_loops",
    "loop_thread",
    "note_loop",
    "snapshot",
    "task_loops",
    "track_task_creation",
]

# --- records --------------------------------------------------------------------------


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
    awaited_by: tuple[Link, ...] = ()
    created: Creation | None = None
    tracked: bool = False
    """True when creation tracking was on for this task's loop."""
    labels: Labels = ()
    """The code's own labels (``asgi_pprof.labels``, ``LabelMiddleware``)."""


# --- which loops run where ------------------------------------------------------------

_loop_threads: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[str, int]] = (
    weakref.WeakKeyDictionary()
)
"""Loop -> (name, ident) of the thread running it, learnt on requests and from tasks."""
_seen_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
"""Loops whose tasks a snapshot has seen."""


def note_loop(track_creation: bool = False) -> None:
    """Remember the running loop's thread; with ``track_creation``, track its tasks.

    Call it on the loop. Each profile request does: a mounted app gets no lifespan
    events, so this is the first moment it can see its loop.
    """
    loop = asyncio.get_running_loop()
    me = threading.current_thread()
    _loop_threads[loop] = (me.name, threading.get_ident())
    if track_creation:
        track_task_creation(loop)


def _alive(container: Any) -> list[Any]:
    """Return the live keys of a WeakSet or WeakKeyDictionary another thread may change."""
    # Their own dict or set, copied in one C call: iterating the weak container itself
    # from another thread can meet a change of size.
    return [x for x in map(operator.call, container.data.copy()) if x is not None]


def known_loops() -> list[asyncio.AbstractEventLoop]:
    """Return the running, not closed event loops of this process we know of, each once.

    Any thread may call it; it never blocks and calls nothing on a loop but
    ``is_running()`` and ``is_closed()``. Known: loops that served a profile request,
    loops that track creation sites, loops whose tasks a snapshot saw, and on 3.14
    loops found running in threads' frames.
    """
    loops = _alive(_loop_threads) + creation.tracked_loops() + _alive(_seen_loops)
    if sys.version_info >= (3, 14):
        loops += _loops_in_frames()
    out: dict[int, asyncio.AbstractEventLoop] = {}
    for loop in loops:
        with contextlib.suppress(Exception):
            if loop.is_running() and not loop.is_closed():
                out.setdefault(id(loop), loop)
    return list(out.values())


def task_loops() -> list[asyncio.AbstractEventLoop]:
    """Return the running, not closed loops of every asyncio task in the process, each once.

    Any thread may call it. Finds loops nobody told us of (an app's loop in another
    thread), at O(tasks) cost run in C iterators: about 1-2 ms for 10 000 tasks.
    """
    out = []
    for loop in dict.fromkeys(map(_get_loop, _all_tasks())):
        with contextlib.suppress(Exception):
            if loop.is_running() and not loop.is_closed():
                out.append(loop)
    return out


def _loops_in_frames() -> list[asyncio.AbstractEventLoop]:
    # 3.14 keeps native tasks in per-thread lists that only all_tasks(loop) walks, so
    # loops nobody told us of are found in their thread's frames (the self of
    # run_forever, or a Runner's loop). Reading locals of running frames is only safe
    # with the snapshot-free f_locals proxies of 3.13+. Each stack is walked at once.
    found: list[asyncio.AbstractEventLoop] = []
    frames = sys._current_frames()
    frames.pop(threading.get_ident(), None)  # never our own frame (a cycle with this one)
    for f in frames.values():
        found.extend(_loops_in_stack(f))
    del frames
    return found


def _loops_in_stack(f: types.FrameType | None) -> list[asyncio.AbstractEventLoop]:
    found = []
    while f is not None:
        if f.f_code.co_name in ("run_forever", "run_until_complete", "run"):
            obj = f.f_locals.get("self")
            cand = getattr(obj, "_loop", obj)
            if isinstance(cand, asyncio.AbstractEventLoop):
                found.append(cand)
        f = f.f_back
    return found


def _thread_name(ident: int | None) -> str | None:
    if ident is None:
        return None
    t = threading._active.get(ident)  # type: ignore[attr-defined]
    return t.name if t is not None else f"thread {ident}"


def loop_thread(loop: asyncio.AbstractEventLoop) -> str:
    """Return the name of the thread running ``loop``: the goroutine profile's ``loop`` label."""
    known = _loop_threads.get(loop)
    if known is not None:
        return known[0]
    # asyncio loops know their thread; uvloop does not say, and is learnt on requests
    # or when one of its tasks is seen running.
    name = _thread_name(getattr(loop, "_thread_id", None))
    if name is None:
        return f"{type(loop).__name__}@{id(loop):#x}"
    return name


def _loop_ident(loop: asyncio.AbstractEventLoop) -> int | None:
    known = _loop_threads.get(loop)
    if known is not None:
        return known[1]
    ident = getattr(loop, "_thread_id", None)
    return ident if isinstance(ident, int) else None


# --- finding every task ---------------------------------------------------------------


def _copy(container: Any) -> list[Any]:
    """Return the items of a set or WeakSet that another thread may be changing."""
    data = getattr(container, "data", None)
    if isinstance(data, set):
        return _alive(container)
    if isinstance(container, set):
        return list(container.copy())
    return []


def _all_tasks() -> list[asyncio.Task[Any]]:
    """Return every task object in the process, each once."""
    mod = asyncio.tasks
    found: list[Any] = []
    for attr in ("_scheduled_tasks", "_all_tasks", "_eager_tasks"):
        container = getattr(mod, attr, None)
        if container is not None and not callable(container):
            found.extend(_copy(container))
    if sys.version_info >= (3, 14):
        for loop in known_loops():
            # A loop closing under us: its tasks are gone anyway.
            with contextlib.suppress(Exception):
                found.extend(asyncio.all_tasks(loop))
    # Each once (a task may sit in two of them for a moment); tasks hash by identity,
    # so dict.fromkeys dedupes in one C call.
    return list(dict.fromkeys(found))


_done = operator.methodcaller("done")
_get_loop = operator.methodcaller("get_loop")


def count() -> int:
    """Return the number of live tasks of running loops plus threads. Cheap: O(tasks)."""
    # The index page calls this on the loop: the per-task work runs in C iterators and
    # each loop is asked once (10 000 tasks: about 2 ms instead of 8).
    found = _all_tasks()
    pending = itertools.compress(found, map(operator.not_, map(_done, found)))
    n = 0
    for loop, k in collections.Counter(map(_get_loop, pending)).items():
        with contextlib.suppress(Exception):
            if loop.is_running() and not loop.is_closed():
                n += k
    return n + len(sys._current_frames())


# --- threads ----------------------------------------------------------------------------


def _thread_records(threads: chains.ThreadStacks) -> list[StackRecord]:
    """Return a record per thread: the others, and this one (Go lists itself too)."""
    stacks = dict(threads.stacks)
    stacks[threading.get_ident()] = sample_stack(sys._getframe())
    out = []
    for ident, stack in stacks.items():
        wait = waits.thread_wait(stack)
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
                labels=thread_labels(ident),
            )
        )
    return out


# --- the snapshot ---------------------------------------------------------------------

_PACE = 0.001
"""Seconds of reading between two voluntary releases of the GIL."""


class _Pacer:
    """Gives the GIL back about every millisecond of work, the first time after 1 ms.

    (Not :func:`concurrency.yield_gil`, whose clock runs across calls, so its first offer
    can come before any work: in fgprof that let the loop move on between one tick's
    reads, and this reader keeps its own clock as a precaution against the same.)

    A thread that never blocks keeps the GIL until the switch interval (5 ms) forces it
    off, so each time the event loop wakes it waits up to that long. Releasing it
    ourselves every millisecond (``time.sleep(0)``, a real system call) lets a waiting
    loop in at once: measured here, the loop's median wait while a busy thread ran
    went from 5.2 ms to 0.1 ms and its worst from 5-32 ms to 0.5-6 ms, for the same work.
    """

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = time.perf_counter() + _PACE

    def __call__(self) -> None:
        if time.perf_counter() >= self._next:
            time.sleep(0)
            self._next = time.perf_counter() + _PACE


_UNREAD: Stack = (Frame("[stack changed while being read]", "<unknown>", 0, 0),)

_Row = tuple[int, str, str, str, str, float | None, int, int, int, int, str, float, Labels]
"""One task, all plain values: ident, name, state, wait, detail, waiting, loop index,
stack index, creation frame index (-1: none), creating task id, its name, age, labels.

Plain values because a tuple of them is one the garbage collector stops tracking at
its first young collection: 10 000 of them are never walked again, nor promoted, so
they never bring on a full collection (one over a heap that size stalls the loop
50-100 ms). Objects are made one at a time when the snapshot is read."""


class Snapshot:
    """Every live task of every running loop and every thread at one moment.

    Iterate it for one :class:`StackRecord` each, tasks first (the running ones
    first), then threads. Records are made as they are iterated: consume them one at a
    time rather than keeping a list of 10 000.
    """

    def __init__(self) -> None:
        self.rows: list[_Row] = []
        self.stacks: list[Stack] = []
        self.loops: list[str] = []
        self.tracked: list[bool] = []
        self.sites: list[Frame] = []
        self.threads: list[StackRecord] = []
        self._row_of: dict[int, int] = {}
        self._first_edge: dict[int, int] = {}
        self._edges: list[Any] = []
        """Flat (how, parent id, next edge of the same child or -1) triples."""

    def add_edge(self, child: int, how: str, parent: int) -> None:
        """Record that task ``parent`` waits for task ``child`` through ``how``."""
        k = len(self._edges) // 3
        self._edges += (how, parent, self._first_edge.get(child, -1))
        self._first_edge[child] = k

    def awaited_by(self, child: int) -> tuple[Link, ...]:
        """Return who waits for task ``child``: each live parent once."""
        k = self._first_edge.get(child, -1)
        if k < 0:
            return ()
        links: list[Link] = []
        seen: set[int] = set()
        edges = self._edges
        while k >= 0:
            how, pid, k = edges[3 * k], edges[3 * k + 1], edges[3 * k + 2]
            row = self._row_of.get(pid)
            if row is not None and pid != child and pid not in seen:
                seen.add(pid)
                links.append(Link(pid, self.rows[row][1], how))
        links.reverse()  # in the order they were seen
        return tuple(links)

    def record(self, row: _Row) -> StackRecord:
        """Return the :class:`StackRecord` of one row."""
        ident, name, state, wait, detail, waiting, li, si, ci, cpid, cname, age, labs = row
        created = Creation(self.sites[ci], cpid, cname, age) if ci >= 0 else None
        return StackRecord(
            kind="task",
            ident=ident,
            name=name,
            state=state,
            stack=self.stacks[si],
            wait=wait,
            detail=detail,
            waiting=waiting,
            loop=self.loops[li],
            awaited_by=self.awaited_by(ident),
            created=created,
            tracked=self.tracked[li],
            labels=labs,
        )

    def __iter__(self) -> Iterator[StackRecord]:
        pace = _Pacer()  # whoever consumes the records (the dump) gives the GIL back too
        for row in self.rows:
            pace()
            yield self.record(row)
        yield from self.threads


def snapshot(track_creation: bool = False) -> Snapshot:
    """Return every live task of every running loop and every thread, each once.

    Runs in a worker thread; safe while tasks start and finish on their loops. With
    ``track_creation``, loops seen here get the creation-tracking factory too (each
    from its own thread), so tasks they create from now on have a creation site.
    """
    snap = Snapshot()
    threads = chains.ThreadStacks()
    now = time.monotonic()
    loop_index: dict[int, int] = {}
    loop_time: list[float | None] = []
    loop_ident: list[int | None] = []
    loop_live: list[bool] = []
    loop_sites: list[bool] = []
    loops: list[asyncio.AbstractEventLoop] = []
    stack_index: dict[Stack, int] = {}
    site_index: dict[tuple[Any, ...], int] = {}
    running: list[_Row] = []
    others: list[_Row] = []
    pace = _Pacer()
    for task in _all_tasks():
        pace()
        try:
            if task.done():
                continue
            loop = task.get_loop()
        except Exception:
            continue  # not a task after all
        li = loop_index.get(id(loop))
        if li is None:
            # Each loop is asked about itself once per snapshot, not once per task.
            li = loop_index[id(loop)] = len(loops)
            loops.append(loop)
            loop_ident.append(_loop_ident(loop))
            loop_sites.append(creation.is_tracked(loop))
            try:
                loop_live.append(loop.is_running() and not loop.is_closed())
                loop_time.append(loop.time())
            except Exception:
                loop_live.append(False)
                loop_time.append(None)
        if not loop_live[li]:
            continue
        got = chains.read(task, threads, loop_time[li], loop_ident[li])
        if got is None:
            continue  # finished while we looked: no longer a goroutine
        if got.thread is not None and loop not in _loop_threads:
            with contextlib.suppress(TypeError):
                _loop_threads[loop] = (_thread_name(got.thread) or "", got.thread)
        waiting = None
        if got.wait is None and got.thread is not None:
            state, wait, detail, stack = "running", "running", "running now", got.stack
        elif got.wait is None:
            state, wait, stack = "pending", "unknown", _UNREAD
            detail = "its stack kept changing while it was read"
        else:
            state, stack = "pending", got.stack
            wait, detail, waiting = got.wait.wait, got.wait.detail, got.wait.waiting
            if wait == "runnable":
                state = "runnable"
            elif hasattr(task, "cancelling") and task.cancelling():
                state = "cancelling"
        si = stack_index.get(stack)
        if si is None:
            si = stack_index[stack] = len(snap.stacks)
            snap.stacks.append(stack)
        ci, cpid, cname, age = -1, 0, "", 0.0
        site = creation.site_of(task) if loop_sites[li] else None
        if site is not None:
            key, cpid, cname, when = site
            ci = site_index.get(key, -1)
            if ci < 0:
                ci = site_index[key] = len(snap.sites)
                snap.sites.append(creation.site_frame(key))
            age = max(0.0, now - when)
        row: _Row = (
            id(task),
            task.get_name(),
            state,
            wait,
            detail,
            waiting,
            li,
            si,
            ci,
            cpid,
            cname,
            age,
            task_labels(task),
        )
        (running if state == "running" else others).append(row)
        _note_edges(task, got, snap)
        del got
    snap.rows = running + others
    snap._row_of = {row[0]: i for i, row in enumerate(snap.rows)}
    for li, loop in enumerate(loops):
        if not loop_live[li]:
            snap.loops.append("")  # no task of it is in the snapshot
            snap.tracked.append(False)
            continue
        # Labelled at the end: a loop's thread may have been learnt midway.
        snap.loops.append(loop_thread(loop))
        snap.tracked.append(creation.is_tracked(loop))
        with contextlib.suppress(TypeError):
            _seen_loops.add(loop)
    snap.threads = _thread_records(threads)
    if track_creation:
        creation.track_loops(loops)
    return snap


def _note_edges(task: Any, got: chains.Reading, snap: Snapshot) -> None:
    """Record who ``task`` waits for: through await, gather, TaskGroup, asyncio.wait."""
    me = id(task)
    w = got.waiter
    if w is not None:
        if isinstance(w, asyncio.Task):
            snap.add_edge(id(w), "await", me)
        for child in list(getattr(w, "_children", ()) or ()):
            snap.add_edge(id(child), "gather", me)
    kids = got.wait.children if got.wait is not None else None
    if kids is not None:
        how, coll = kids
        for child in _copy(coll) if isinstance(coll, set) else list(coll or ()):
            snap.add_edge(id(child), how, me)
    # 3.14 records who awaits whom on the future itself.
    for parent in list(getattr(task, "_asyncio_awaited_by", None) or ()):
        snap.add_edge(me, "await", id(parent))
