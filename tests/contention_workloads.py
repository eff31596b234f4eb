"""Workloads with distinctive names for the block, mutex and loopstall tests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from asgi_pprof import block, builder, contention, primitives
from asgi_pprof.model import ProfileData

HOLD_S = 0.02
"""The holder keeps the lock 20 ms of every 40 ms."""


@contextmanager
def profiling(rate: int = 1, fraction: int = 1) -> Iterator[None]:
    """Switch block and mutex on (fresh tables); off again afterwards, hooks checked out."""
    contention.reset()
    block.set_block_profile_rate(rate)
    block.set_mutex_profile_fraction(fraction)
    try:
        yield
    finally:
        block.set_block_profile_rate(0)
        block.set_mutex_profile_fraction(0)
        contention.reset()
        assert not primitives.installed()


def delay_on(data: ProfileData, function: str, leaf_only: bool = False) -> tuple[int, int]:
    """Return (count, delay ns) summed over samples whose stack has ``function``."""
    count = delay = 0
    for s in data.samples:
        frames = s.stack[:2] if leaf_only else s.stack
        if any(f.function.endswith(function) for f in frames):
            count += s.values[0]
            delay += s.values[1]
    return count, delay


def decode(body: bytes) -> ProfileData:
    return builder.decode(body)


# --- threading.Lock: a holder and a waiter ---------------------------------------------------


def cw_holder_release(lock: threading.Lock) -> None:
    lock.release()  # the end of the critical section: mutex charges this line


def cw_holder(lock: threading.Lock, cycles: int, started: threading.Event) -> None:
    for _ in range(cycles):
        lock.acquire()
        started.set()
        time.sleep(HOLD_S)
        cw_holder_release(lock)
        time.sleep(HOLD_S)


def cw_waiter(lock: threading.Lock, stop: threading.Event, waited: list[int]) -> None:
    while not stop.is_set():
        t0 = time.perf_counter_ns()
        with lock:
            waited[0] += time.perf_counter_ns() - t0
        time.sleep(0.002)


def run_thread_contention(cycles: int = 12) -> int:
    """Return the ns the waiter itself measured waiting for a lock made now."""
    lock = threading.Lock()
    stop = threading.Event()
    started = threading.Event()
    waited = [0]
    h = threading.Thread(target=cw_holder, args=(lock, cycles, started), name="cw-holder")
    h.start()
    started.wait(5)
    w = threading.Thread(target=cw_waiter, args=(lock, stop, waited), name="cw-waiter")
    w.start()
    h.join()
    stop.set()
    w.join()
    return waited[0]


# --- asyncio.Lock: a holder task and a waiter task --------------------------------------------


async def acw_holder_release(lock: asyncio.Lock) -> None:
    lock.release()  # mutex charges this line


async def acw_holder(lock: asyncio.Lock, cycles: int) -> None:
    for _ in range(cycles):
        await lock.acquire()
        await asyncio.sleep(HOLD_S)
        await acw_holder_release(lock)
        await asyncio.sleep(HOLD_S)


async def acw_waiter(lock: asyncio.Lock, stop: asyncio.Event, waited: list[int]) -> None:
    while not stop.is_set():
        t0 = time.perf_counter_ns()
        async with lock:
            waited[0] += time.perf_counter_ns() - t0
        await asyncio.sleep(0.002)


async def run_task_contention(cycles: int = 12) -> int:
    """Return the ns the waiter task itself measured waiting for an asyncio.Lock."""
    lock = asyncio.Lock()
    stop = asyncio.Event()
    waited = [0]
    holder = asyncio.create_task(acw_holder(lock, cycles), name="acw-holder")
    await asyncio.sleep(0.005)
    waiter = asyncio.create_task(acw_waiter(lock, stop, waited), name="acw-waiter")
    await holder
    stop.set()
    await waiter
    return waited[0]
