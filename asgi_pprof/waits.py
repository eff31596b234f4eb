"""What a task or a thread waits on, read from its stack: Go's "[chan receive]" for asyncio.

A suspended task's innermost known coroutine says what it waits on (``asyncio.sleep``,
``Event.wait``, ``Queue.get``, a TaskGroup's exit); failing that, the future it is
blocked on does (another task, a gather). A thread's wait is inferred from its
innermost frames. Only suspended coroutine frames are read here: nothing runs them
while the reader holds the GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import types
from collections.abc import Sequence
from typing import Any, NamedTuple

from .model import Stack

__all__ = ["TASK_WAITS", "THREAD_WAITS", "Wait", "classify", "thread_wait"]

TASK_WAITS: dict[str, str] = {
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
"""Innermost known coroutine -> what the task waits on (one word, for labels)."""

THREAD_WAITS: dict[str, str] = {
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
"""A thread's innermost frames -> what it waits on (inferred)."""


class Wait(NamedTuple):
    """What one suspended task waits on."""

    wait: str
    """One word for labels: sleep, event, queue, lock, task, gather, runnable, future, ..."""
    detail: str
    """For people: ``asyncio.sleep(10), 8.2 s left``."""
    waiting: float | None
    """Seconds it has waited, where knowable."""
    children: tuple[str, Any] | None
    """Tasks it waits for as a group: ("TaskGroup", set) or ("wait", set of futures)."""


def _locals(frame: types.FrameType) -> dict[str, Any]:
    # Only for suspended coroutine frames: nothing runs them while the GIL is ours.
    try:
        return dict(frame.f_locals)
    except Exception:
        return {}


def _fmt_s(s: float) -> str:
    return f"{s:.3g} s"


def classify(
    coro_frames: Sequence[types.FrameType],
    stack: Stack,
    waiter: Any,
    fresh: bool,
    loop_time: float | None,
) -> Wait:
    """Return what a suspended task waits on.

    ``coro_frames`` is its await chain, outermost first; ``stack`` the same chain as
    Frames, leaf first; ``waiter`` its ``_fut_waiter``; ``fresh`` is True for a task
    not started yet; ``loop_time`` its loop's clock now (None if unknown).
    """
    for fr, frame in zip(reversed(coro_frames), stack, strict=False):
        kind = TASK_WAITS.get(frame.function)
        if kind is not None:
            return _known(kind, frame.function, _locals(fr), loop_time)
    if fresh:
        return Wait("runnable", "not started yet", None, None)
    if waiter is None:
        return Wait("runnable", "scheduled to resume", None, None)
    if isinstance(waiter, asyncio.Task):
        return Wait("task", f"await task {id(waiter):#x} {waiter.get_name()!r}", None, None)
    if hasattr(waiter, "_children"):
        kids = list(waiter._children)
        done = sum(1 for k in kids if k.done())
        return Wait("gather", f"gather of {len(kids)} ({done} done)", None, None)
    return Wait("future", f"await {type(waiter).__name__}", None, None)


def _known(kind: str, function: str, loc: dict[str, Any], loop_time: float | None) -> Wait:
    short = function.split(".", 2)[-1]
    if kind == "sleep":
        delay = loc.get("delay", 0)
        handle = loc.get("h")
        if handle is not None and loop_time is not None and hasattr(handle, "when"):
            left = max(0.0, handle.when() - loop_time)
            waiting = None
            if isinstance(delay, int | float):
                waiting = max(0.0, float(delay) - left)
            return Wait(kind, f"asyncio.sleep({delay!r}), {_fmt_s(left)} left", waiting, None)
        return Wait(kind, f"asyncio.sleep({delay!r})", None, None)
    if kind in ("lock", "semaphore", "event", "condition", "queue", "barrier"):
        return Wait(kind, f"{short} on {_describe(loc.get('self'))}", None, None)
    if kind == "taskgroup":
        tg_tasks = getattr(loc.get("self"), "_tasks", None)
        n = len(tg_tasks) if tg_tasks is not None else 0
        detail = f"TaskGroup exit, {n} task{'s' if n != 1 else ''} left"
        return Wait(kind, detail, None, ("TaskGroup", tg_tasks))
    if kind == "wait":
        fs = loc.get("fs")
        detail = f"asyncio.wait on {len(fs) if fs is not None else '?'} futures"
        return Wait(kind, detail, None, ("wait", fs))
    return Wait(kind, short, None, None)


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


def thread_wait(stack: Stack) -> str:
    """Return what a thread waits on, inferred from its two innermost frames; "" if none."""
    return next((THREAD_WAITS[f.function] for f in stack[:2] if f.function in THREAD_WAITS), "")
