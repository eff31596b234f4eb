"""The records behind the ``block`` and ``mutex`` profiles: Go's rates, sampling and buckets.

Pure bookkeeping, no hooks: ``primitives`` sees the waits and calls :func:`record_block`
(a wait that really blocked, on the waiter's stack) and :func:`record_mutex` (the waiting a
critical section caused, on the stack that ended it). Both tables are cumulative for the
life of the process, as Go's are, so scrapers can diff successive snapshots.

Sampling is Go's (``runtime/mprof.go``):

* block, rate ``r`` ns: a wait of at least ``r`` is always kept; a shorter wait ``d`` is
  kept with probability ``d/r`` and then counts ``r/d`` events and ``r`` ns, so totals
  stay unbiased. Rate 1 keeps every event.
* mutex, fraction ``n``: one event in ``n`` on average is kept, its count and delay
  multiplied by ``n`` when recorded.
"""

from __future__ import annotations

import _thread
import random
import threading
import time
import types

from .concurrency import is_own_thread
from .model import Frame, ProfileData, Sample, Stack, ValueType
from .sampler import sample_stack

__all__ = [
    "CONTENTIONS",
    "DELAY",
    "block_rate",
    "leaf_of",
    "mutex_fraction",
    "profile_of",
    "record_block",
    "record_count",
    "record_mutex",
    "reset",
    "set_rates",
    "task_frame",
]

CONTENTIONS = ValueType("contentions", "count")
DELAY = ValueType("delay", "nanoseconds")

# A raw lock: never one of the profiled wrappers, whatever threading.Lock is right now.
_lock = _thread.allocate_lock()
_tables: dict[str, dict[Stack, list[float]]] = {"block": {}, "mutex": {}}
_block_rate = 0
_mutex_fraction = 0
_random = random.random
_randbelow = random.randrange


def block_rate() -> int:
    """Return the block profile rate in nanoseconds (0: off)."""
    return _block_rate


def mutex_fraction() -> int:
    """Return the mutex profile fraction (0: off)."""
    return _mutex_fraction


def set_rates(block: int | None = None, mutex: int | None = None) -> tuple[int, int]:
    """Set the block rate and/or mutex fraction; return the previous (rate, fraction)."""
    global _block_rate, _mutex_fraction
    old = (_block_rate, _mutex_fraction)
    if block is not None:
        _block_rate = max(0, block)
    if mutex is not None:
        _mutex_fraction = max(0, mutex)
    return old


def _ours() -> bool:
    # Our own threads' waits (the loop watchdog, samplers, workers while they work for
    # us) would fill the profiles with asgi_pprof itself.
    return is_own_thread(threading.current_thread().name)


def task_frame() -> types.FrameType | None:
    """Return the frame of the running asyncio task's coroutine, where its await chain ends."""
    import asyncio

    try:
        task = asyncio.current_task()
    except RuntimeError:
        return None
    if task is None:
        return None
    return getattr(task.get_coro(), "cr_frame", None)


def _stack(
    frame: types.FrameType | None, stop: types.FrameType | None, leaf: Frame | None
) -> Stack:
    """Return the stack from ``frame`` outwards, cut after ``stop`` (a task's coroutine)."""
    stack = sample_stack(frame)
    if stop is not None:
        depth = 0
        f = frame
        while f is not None and f is not stop:
            f = f.f_back
            depth += 1
        if f is stop:
            stack = stack[: depth + 1]
    return (leaf, *stack) if leaf is not None else stack


def leaf_of(fn: object) -> Frame:
    """Return a frame naming a primitive's method (its first line), as a stack's leaf."""
    code = getattr(fn, "__code__", None)
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"
    if code is None:
        return Frame(name, "<unknown>", 0, 0)
    return Frame(name, code.co_filename, code.co_firstlineno, code.co_firstlineno)


def _add(table: dict[Stack, list[float]], stack: Stack, count: float, ns: float) -> None:
    with _lock:
        cell = table.get(stack)
        if cell is None:
            table[stack] = [count, ns]
        else:
            cell[0] += count
            cell[1] += ns


def record_block(
    frame: types.FrameType | None,
    ns: int,
    stop: types.FrameType | None = None,
    leaf: Frame | None = None,
) -> None:
    """Record a wait of ``ns`` that really blocked, on the stack from ``frame``, if sampled.

    ``stop``: the frame where the stack ends (a task's coroutine); ``leaf``: a frame put
    below ``frame`` to name the primitive (its ``await`` left no frame of its own).
    """
    rate = _block_rate
    if rate <= 0:
        return
    ns = max(1, ns)
    if ns < rate:
        # Kept with probability ns/rate; then stands for rate/ns such events.
        if _random() * rate >= ns:
            return
        count, delay = rate / ns, float(rate)
    else:
        count, delay = 1.0, float(ns)
    if _ours():
        return
    _add(_tables["block"], _stack(frame, stop, leaf), count, delay)


def record_mutex(
    frame: types.FrameType | None,
    ns: int,
    stop: types.FrameType | None = None,
    leaf: Frame | None = None,
) -> None:
    """Record ``ns`` of waiting caused by a critical section ending at ``frame``, if sampled."""
    n = _mutex_fraction
    if n <= 0 or ns <= 0:
        return
    if n > 1 and _randbelow(n) != 0:
        return
    if _ours():
        return
    _add(_tables["mutex"], _stack(frame, stop, leaf), float(n), float(n) * ns)


def record_count(name: str) -> int:
    """Return the number of records (distinct stacks) of ``block`` or ``mutex``."""
    return len(_tables[name])


def profile_of(name: str) -> ProfileData:
    """Return the cumulative ``block`` or ``mutex`` profile as Go writes it (proto values)."""
    with _lock:
        rows = [(stack, round(c), round(d)) for stack, (c, d) in _tables[name].items()]
    samples = [Sample(stack, [c, d]) for stack, c, d in rows if c or d]
    samples.sort(key=lambda s: -s.values[1])
    return ProfileData(
        sample_types=[CONTENTIONS, DELAY],
        period_type=CONTENTIONS,
        period=1,
        samples=samples,
        time_nanos=time.time_ns(),
    )


def reset() -> None:
    """Forget every record (tests and benchmarks only; Go has no such call)."""
    with _lock:
        for table in _tables.values():
            table.clear()
