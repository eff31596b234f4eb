"""Reading one asyncio task from another thread: its await chain, or its real frames.

For a suspended task the stack is its await chain (``cr_await``, ``gi_yieldfrom``,
``ag_await``), task coroutine outermost, each coroutine at its current line. The chain
is read twice and compared (same objects, same instruction, same awaited future): a
task that moved while being read is read again, never reported half-read. For the task
a loop is running at that moment, the stack is its thread's real frames down to the
task's coroutine, taken from :class:`ThreadStacks`, which walks every other thread the
moment the frames are taken and keeps none of them.
"""

from __future__ import annotations

import asyncio
import threading
import time
import types
from dataclasses import dataclass
from typing import Any

from . import waits
from .frames import current_stacks, resolve
from .model import Frame, Stack, function_name

__all__ = ["Reading", "ThreadStacks", "read"]

_MAX_DEPTH = 256
_READ_ATTEMPTS = 4
_THREAD_REFRESHES = 16
"""Most times one snapshot walks every thread again to find a task that began running."""


# --- other threads' stacks ------------------------------------------------------------


class ThreadStacks:
    """The stacks of every other thread, each walked the moment the frames were taken.

    No frame of another thread is kept: such frames, held across a release of the GIL,
    can be freed and reused under us on 3.11 (issue 8, item 2).
    """

    def __init__(self) -> None:
        self.stacks: dict[int, Stack] = {}
        self.refreshes = 0
        self.refresh()

    def refresh(self) -> None:
        # One C call reads every thread (frames.current_stacks): no thread moves mid-read,
        # and what comes back holds code objects and lines, no frame.
        raw = current_stacks()
        raw.pop(threading.get_ident(), None)
        self.stacks = {ident: resolve(stack) for ident, stack in raw.items()}

    def running(self, code: types.CodeType, prefer: int | None) -> tuple[Stack, int] | None:
        """Return the stack down to the outermost frame of ``code`` and its thread, or None."""
        idents = list(self.stacks)
        if prefer in self.stacks:
            idents.remove(prefer)
            idents.insert(0, prefer)
        for ident in idents:
            stack = self.stacks[ident]
            for depth in range(len(stack) - 1, -1, -1):
                f = stack[depth]
                if f.start_line == code.co_firstlineno and f.filename == code.co_filename:
                    return stack[: depth + 1], ident
        return None


# --- reading one task -----------------------------------------------------------------

_CORO = types.CoroutineType
_GEN = types.GeneratorType
_AGEN = types.AsyncGeneratorType


class _Moved(Exception):
    """The task changed while it was being read."""


_frames: dict[tuple[types.CodeType, int], Frame] = {}
"""One Frame per code and line, shared by every task at that line."""


def _frame_at(fr: types.FrameType) -> Frame:
    code = fr.f_code
    key = (code, fr.f_lineno or 0)
    got = _frames.get(key)
    if got is None:
        if len(_frames) > 100_000:  # exec()'d code makes new code objects without end
            _frames.clear()
        mod = fr.f_globals.get("__name__")
        got = _frames[key] = Frame(
            function_name(code, mod if isinstance(mod, str) else None),
            code.co_filename,
            code.co_firstlineno,
            key[1],
        )
    return got


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


@dataclass(slots=True)
class Reading:
    """One consistent reading of a task: freed as soon as its record is made."""

    stack: Stack
    waiter: Any = None
    wait: waits.Wait | None = None
    """None for a running task."""
    thread: int | None = None
    """The thread running it, for a running task."""


def _read_suspended(task: Any, loop_time: float | None) -> Reading:
    if _mid_step(task):
        raise _Moved
    waiter = task._fut_waiter
    coro = task.get_coro()
    chain, leaf, running, fresh = _links(coro)
    if running:
        raise _Moved
    frames = [fr for _, fr, _ in chain]
    stack = tuple(_frame_at(fr) for fr in reversed(frames))
    wait = waits.classify(frames, stack, waiter, fresh, loop_time)
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
    return Reading(stack, waiter, wait)


def _read_running(task: Any, threads: ThreadStacks, prefer: int | None) -> Reading | None:
    coro = task.get_coro()
    if not getattr(coro, "cr_running", False):
        return None
    got = threads.running(coro.cr_code, prefer)
    if got is None and threads.refreshes < _THREAD_REFRESHES:
        # It began running after the threads were walked: walk them again.
        threads.refreshes += 1
        threads.refresh()
        got = threads.running(coro.cr_code, prefer)
    if got is None or not getattr(coro, "cr_running", False):
        return None
    return Reading(got[0], thread=got[1])


def read(
    task: Any, threads: ThreadStacks, loop_time: float | None, prefer: int | None
) -> Reading | None:
    """Return a consistent reading of ``task``, None for a task that finished.

    ``loop_time`` is its loop's clock (for the time left in a sleep); ``prefer`` the
    thread that runs its loop, if known (where to look first should it be running).
    """
    for _ in range(_READ_ATTEMPTS):
        if task.done():
            return None
        try:
            return _read_suspended(task, loop_time)
        except _Moved:
            pass
        got = _read_running(task, threads, prefer)
        if got is not None:
            return got
        time.sleep(0)  # let the loop finish the step we caught it in
    return Reading(())
