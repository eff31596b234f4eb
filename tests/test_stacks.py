"""The C stack reader of the CPU tick (``_stacks.FrameTable``) against its Python twin.

``frames.stack_now`` reads the calling thread's stack 100 times per second of the main
thread's CPU while a CPU profile or a trace runs; the C reader must give exactly the Frames
the Python one gives, share them with the Python cache, and stay bounded.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import types
from typing import Any

import pytest

from asgi_pprof import frames
from asgi_pprof.model import Frame

stacks = pytest.importorskip("asgi_pprof._stacks") if frames._table is not None else None
pytestmark = pytest.mark.skipif(stacks is None, reason="the C stack reader is not built")


def python_stack(frame: types.FrameType | None) -> tuple[Frame, ...]:
    """The Python twin of ``stack_now``."""
    return frames.resolve(frames._in_c(frames._walks((frame,)))[0])


def nested(depth: int) -> types.FrameType:
    if depth:
        return nested(depth - 1)
    return sys._getframe()


def test_the_c_reader_gives_the_python_readers_frames_the_same_objects() -> None:
    def leaf() -> tuple[tuple[Frame, ...], tuple[Frame, ...]]:
        f = sys._getframe()
        return frames.stack_now(f), python_stack(f)

    c_stack, py_stack = leaf()
    assert c_stack == py_stack
    assert all(a is b for a, b in zip(c_stack, py_stack, strict=True))  # one Frame each
    assert c_stack[0].function.endswith("leaf")
    assert c_stack[0].line == leaf.__code__.co_firstlineno + 2
    again = leaf()[0]
    assert again[0] is c_stack[0]  # a known (code, line): the same Frame, nothing made
    assert again[2:] == c_stack[2:]


def test_depth_is_bounded_innermost_first_and_none_is_empty() -> None:
    def deep(n: int) -> tuple[tuple[Frame, ...], tuple[Frame, ...]]:
        if n:
            return deep(n - 1)
        f = sys._getframe()
        return frames.stack_now(f), python_stack(f)

    c_stack, py_stack = deep(frames.MAX_DEPTH + 40)
    assert len(c_stack) == frames.MAX_DEPTH
    assert c_stack == py_stack
    assert frames.stack_now(None) == ()
    with pytest.raises(TypeError):
        frames._table.stack("not a frame", 10)  # type: ignore[union-attr]


def test_a_suspended_coroutines_frame_reads_as_in_python() -> None:
    async def waiting(ev: asyncio.Event) -> None:
        await ev.wait()

    async def main() -> tuple[Any, Any]:
        ev = asyncio.Event()
        task = asyncio.ensure_future(waiting(ev))
        await asyncio.sleep(0)
        coro = task.get_coro()
        f = coro.cr_frame  # type: ignore[union-attr]
        out = frames.stack_now(f), python_stack(f)
        ev.set()
        await task
        return out

    c_stack, py_stack = asyncio.run(main())
    assert c_stack == py_stack
    assert len(c_stack) == 1
    assert c_stack[0].function.endswith("waiting")


def test_the_table_stays_within_its_bound_and_holds_what_it_holds_alive() -> None:
    made: list[tuple[types.CodeType, int]] = []

    def make(code: types.CodeType, line: int, module_globals: dict[str, Any]) -> Frame:
        made.append((code, line))
        return frames._frame_of(code, line, module_globals)

    table = stacks.FrameTable(make, max_entries=5)  # type: ignore[union-attr]
    f = nested(12)
    got, want = table.stack(f, 64), python_stack(f)  # one line: the same caller's line
    assert got == want
    assert table.entries() <= 5
    # Known frames are not made again; a full table starts over rather than growing.
    before = len(made)
    table.stack(f, 3)
    assert len(made) == before or table.entries() <= 5

    def make_uncached(code: types.CodeType, line: int, module_globals: dict[str, Any]) -> Frame:
        return Frame(function=code.co_name, filename=code.co_filename, start_line=0, line=line)

    code = nested.__code__
    table2 = stacks.FrameTable(make_uncached)  # type: ignore[union-attr]
    refs = sys.getrefcount(code)
    table2.stack(nested(3), 64)
    assert sys.getrefcount(code) > refs  # the table holds the code object ...
    table2.clear()
    assert table2.entries() == 0
    assert sys.getrefcount(code) == refs  # ... until cleared
    del table2
    gc.collect()


def test_a_make_that_fails_raises_and_leaves_the_table_usable() -> None:
    calls = [0]

    def make(code: types.CodeType, line: int, module_globals: dict[str, Any]) -> Frame:
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("boom")
        return frames._frame_of(code, line, module_globals)

    table = stacks.FrameTable(make)  # type: ignore[union-attr]
    f = nested(4)
    with pytest.raises(RuntimeError, match="boom"):
        table.stack(f, 64)
    got, want = table.stack(f, 64), python_stack(f)
    assert got == want
    with pytest.raises(TypeError):
        stacks.FrameTable("not callable")  # type: ignore[union-attr]
