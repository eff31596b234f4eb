"""Reading the stacks of running threads without racing them.

A frame object of another thread is a view of that thread's live interpreter frame. If
the thread runs while we hold the view (our thread let go of the GIL: a blocking call,
or a forced hand-off between two bytecodes when the switch interval expires), the frames
we walk next can be gone or reused. On CPython 3.11 that reads freed memory: ``f_back``
returned code objects, dicts, strings and ``Handle`` objects in a stress test of the CPU
sampler, and once corrupted asyncio's own state (issue 8, item 2; the 0.1 ms switch
interval of a capture made the hand-offs frequent enough to see it within a minute).

So the whole read, from ``sys._current_frames()`` to the last ``(code, line)`` pair, is
one call into C that runs no bytecode: a chain of C iterators (``starmap``, ``map``,
``accumulate`` with ``getattr``, ``takewhile``) driven by a single ``list()``. The
interpreter only hands the GIL to another thread at bytecode boundaries, so no thread
runs between the first frame read and the last. On 3.11 an allocation can also start a
garbage collection whose finalizers run Python code (3.12 moved collections to the eval
breaker), so there the collector is paused for the few microseconds of the read.

What comes out holds no frame: code objects, line numbers and module globals, which
stay valid whatever the thread does next.
"""

from __future__ import annotations

import gc
import operator
import sys
import types
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from itertools import accumulate, chain, islice, repeat, starmap, takewhile, tee
from typing import Any

from . import native
from .model import Frame, Stack, function_name

__all__ = [
    "MAX_DEPTH",
    "RawFrame",
    "RawStack",
    "code_stack",
    "current_code_stacks",
    "current_stacks",
    "resolve",
    "stack_now",
]

MAX_DEPTH = 256
"""Deepest stack read (innermost frames kept)."""

RawFrame = tuple[types.CodeType, int | None, dict[str, Any]]
"""(code, line, module globals) of one frame, as read."""

RawStack = tuple[RawFrame, ...]
"""Raw frames, leaf first."""

_READ = operator.attrgetter("f_code", "f_lineno", "f_globals")
_CODE_OF = operator.attrgetter("f_code")
_NOT_NONE = partial(operator.is_not, None)
_F_BACK = repeat("f_back")  # infinite and stateless: one iterator can feed every walk
_GC_IN_ALLOCATION = sys.version_info < (3, 12)


def _walks(
    leaves: Iterable[types.FrameType | None], read: Callable[[types.FrameType], Any] = _READ
) -> Iterable[tuple[Any, ...]]:
    """Return a lazy iterator of stacks, one per leaf, each frame as ``read`` reads it
    (raw frames by default); only C code runs when consumed."""
    # chain((leaf,), "f_back", "f_back", ...) fed to accumulate(getattr) yields leaf,
    # leaf.f_back, leaf.f_back.f_back ...; takewhile stops at None before getattr(None).
    walks = map(accumulate, map(chain, zip(leaves), repeat(_F_BACK)), repeat(getattr))
    bounded = map(takewhile, repeat(_NOT_NONE), map(islice, walks, repeat(MAX_DEPTH)))
    return map(tuple, map(map, repeat(read), bounded))


def _in_c(pipeline: Iterable[Any]) -> list[Any]:
    """Return ``list(pipeline)`` with the collector paused where allocation may collect."""
    if not _GC_IN_ALLOCATION or not gc.isenabled():
        return list(pipeline)
    gc.disable()
    try:
        return list(pipeline)
    finally:
        gc.enable()


def current_stacks(idents: Sequence[int] | None = None) -> dict[int, RawStack]:
    """Return {thread ident: raw stack} of every thread (or of ``idents``), read at one instant.

    Threads in ``idents`` that no longer run are left out.
    """
    frames_now = starmap(sys._current_frames, ((),))  # called lazily, inside the C pipeline
    if idents is None:
        return _every_thread(frames_now, _READ)
    wanted = tuple(idents)
    leaves_of = chain.from_iterable(
        map(map, map(operator.attrgetter("get"), frames_now), repeat(wanted, 1))
    )
    stacks = _in_c(_walks(leaves_of))
    return {i: s for i, s in zip(wanted, stacks, strict=True) if s}


def current_code_stacks() -> dict[int, tuple[types.CodeType, ...]]:
    """Return {thread ident: code objects of its stack, leaf first} of every thread, read at
    one instant like :func:`current_stacks`, in half its time: no line number is computed."""
    return _every_thread(starmap(sys._current_frames, ((),)), _CODE_OF)


def code_stack(frame: types.FrameType | None) -> tuple[types.CodeType, ...]:
    """Return the code objects of ``frame`` and its callers, leaf first, read in C like
    :func:`current_code_stacks`: for this thread's own frames (a signal handler's
    interrupted frame) or suspended ones, as :func:`stack_now`."""
    codes: tuple[types.CodeType, ...] = _in_c(_walks((frame,), _CODE_OF))[0]
    return codes


def _every_thread(
    frames_now: Iterable[dict[int, types.FrameType]], read: Callable[[types.FrameType], Any]
) -> dict[int, Any]:
    pairs = chain.from_iterable(map(operator.methodcaller("items"), frames_now))
    a, b = tee(pairs)
    keys: Iterable[int] = map(operator.itemgetter(0), a)
    leaves = map(operator.itemgetter(1), b)
    return dict(_in_c(zip(keys, _walks(leaves, read), strict=True)))


_frames: dict[tuple[types.CodeType, int], Frame] = {}
_FRAME_CACHE_MAX = 200_000


def _frame_of(code: types.CodeType, line: int, module_globals: dict[str, Any]) -> Frame:
    """Return the one Frame of (code, line), made on first sight."""
    key = (code, line)
    fr = _frames.get(key)
    if fr is None:
        if len(_frames) > _FRAME_CACHE_MAX:
            _frames.clear()
        mod = module_globals.get("__name__")
        fr = _frames[key] = Frame(
            function=function_name(code, mod if isinstance(mod, str) else None),
            filename=code.co_filename,
            start_line=code.co_firstlineno,
            line=line,
        )
    return fr


def resolve(raw: RawStack) -> Stack:
    """Return the :data:`Stack` of a raw stack, reusing one Frame per (code, line)."""
    cache = _frames
    out: list[Frame] = []
    for code, line, module_globals in raw:
        fr = cache.get((code, line or 0))
        out.append(fr if fr is not None else _frame_of(code, line or 0, module_globals))
    return tuple(out)


_stacks = native.load("_stacks")
_table = _stacks.FrameTable(_frame_of, _FRAME_CACHE_MAX) if _stacks is not None else None
"""The C stack reader (``_stacks``) and its table of known frames, or None: the Python twin."""


def stack_now(frame: types.FrameType | None) -> Stack:
    """Return the stack of ``frame`` and its callers, read in one C call.

    Safe for the calling thread's own frames and for frames that are not running
    (suspended coroutines). For other threads use :func:`current_stacks`: holding
    another thread's frame between two calls is the race this module exists to avoid.
    The CPU tick calls it 100 times per second of the main thread's CPU: the C reader
    takes about a tenth of the Python twin's time (no allocation for known frames).
    """
    if _table is not None:
        stack: Stack = _table.stack(frame, MAX_DEPTH)
        return stack
    return resolve(_in_c(_walks((frame,)))[0])
