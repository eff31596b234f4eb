"""/debug/pprof/mutex: waiting caused, charged to the release that ended the critical section."""

from __future__ import annotations

import asyncio
import re
import sys
import threading
import time
from typing import Any

import httpx
import pytest

from asgi_pprof import block, contention

from .conftest import MOUNT, ServerThread, mounted
from .contention_workloads import (
    decode,
    delay_on,
    profiling,
    run_task_contention,
    run_thread_contention,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client() -> Any:
    transport = httpx.ASGITransport(app=mounted())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


async def mutex_of(client: httpx.AsyncClient) -> Any:
    r = await client.get(f"{MOUNT}/mutex")
    assert r.status_code == 200
    return decode(r.content)


async def test_thread_lock_delay_is_on_the_holder_release_line(
    client: httpx.AsyncClient,
) -> None:
    with profiling():
        waited = await asyncio.to_thread(run_thread_contention)
        data = await mutex_of(client)
    n, ns = delay_on(data, "cw_holder_release")
    # What the waiter waited while the lock was held; the hand-over after the release
    # (the waiter waking up) is nobody's and is left out, as in Go.
    assert waited > 150e6
    assert 0.8 * waited <= ns <= 1.2 * waited, (ns / 1e6, waited / 1e6)
    assert n >= 5
    sample = next(s for s in data.samples if "cw_holder_release" in str(s.stack))
    assert sample.stack[0].function == "threading.Lock.release"
    line = sample.stack[1]
    assert line.function.endswith("cw_holder_release")
    assert line.line == line.start_line + 1  # the release line itself
    assert delay_on(data, "cw_waiter")[1] < 0.05 * ns  # the waiter held nobody up


async def test_asyncio_lock_delay_is_on_the_releasing_task(client: httpx.AsyncClient) -> None:
    with profiling():
        waited = await run_task_contention()
        data = await mutex_of(client)
    _, ns = delay_on(data, "acw_holder_release")
    assert waited > 150e6
    assert 0.8 * waited <= ns <= 1.2 * waited, (ns / 1e6, waited / 1e6)
    sample = next(s for s in data.samples if "acw_holder_release" in str(s.stack))
    names = [f.function for f in sample.stack]
    assert names[0] == "asyncio.locks.Lock.release"
    assert names[-1].endswith("acw_holder")  # the task's await chain, nothing below


def mw_release_shared(lock: threading.Lock) -> None:
    lock.release()


def run_five_waiters(hold: float) -> float:
    """Hold a lock for ``hold`` s while five threads wait; return the sum of their waits."""
    lock = threading.Lock()
    waits: list[float] = []
    ready = threading.Barrier(6)

    def waiter() -> None:
        ready.wait()
        t0 = time.perf_counter()
        with lock:
            waits.append(time.perf_counter() - t0)

    lock.acquire()
    threads = [threading.Thread(target=waiter, name=f"mw-{i}") for i in range(5)]
    for t in threads:
        t.start()
    ready.wait()
    time.sleep(hold)
    mw_release_shared(lock)
    for t in threads:
        t.join()
    return sum(waits)


async def test_each_blocked_waiter_counts_go_1_22(client: httpx.AsyncClient) -> None:
    # Go 1.22: a lock held 1 s while 5 goroutines wait reports 5 s. Here 0.2 s x 5; the
    # later waiters are also held up by the ones served before them (their releases
    # are charged to the waiter threads' `with` line, not to mw_release_shared).
    with profiling():
        total = await asyncio.to_thread(run_five_waiters, 0.2)
        data = await mutex_of(client)
    _, on_release = delay_on(data, "mw_release_shared")
    assert 0.8 * 1.0e9 <= on_release <= 1.2 * 1.0e9, on_release / 1e6
    assert on_release <= total * 1e9 * 1.05


def test_fraction_n_keeps_one_in_n_scaled_by_n() -> None:
    # 5000 contended releases of 1 ms at fraction 10: about 500 kept, each counting 10
    # events and 10 ms. Relative sd of the kept count: sqrt((1 - 0.1) / 500) = 4.2 %,
    # so 4 sd is 17 %.
    here = sys._getframe()
    with profiling(rate=0, fraction=10):
        for _ in range(5000):
            contention.record_mutex(here, 1_000_000)
        (s,) = contention.profile_of("mutex").samples
    count, delay = s.values
    assert count % 10 == 0  # every kept event counts n
    assert delay == count * 1_000_000
    assert 0.83 * 5000 <= count <= 1.17 * 5000, count
    assert count != 5000 or delay != 5e9  # sampled (5000 exactly has probability ~2 %)


async def test_text_divides_by_the_sampling_period_it_prints(client: httpx.AsyncClient) -> None:
    here = sys._getframe()
    with profiling(rate=0, fraction=4):
        for _ in range(400):
            contention.record_mutex(here, 2_000_000)
        proto = await mutex_of(client)
        text = (await client.get(f"{MOUNT}/mutex?debug=1")).text
    assert text.startswith("--- mutex:\ncycles/second=1000000000\nsampling period=4\n")
    ((count, delay),) = [s.values for s in proto.samples]
    m = re.search(r"^(\d+) (\d+) @ 0x", text, re.M)
    assert m is not None
    # google/pprof's parser multiplies text records by the period: the same totals.
    assert int(m.group(1)) * 4 == delay
    assert int(m.group(2)) * 4 == count
    assert "\n#\t0x" in text
    assert "tests.test_mutex.test_text_divides_by_the_sampling_period_it_prints+" in text


@pytest.mark.go
def test_go_tool_reads_text_and_proto_with_the_same_totals(go_tool: Any) -> None:
    with ServerThread(mounted()) as srv, profiling(rate=0, fraction=2):
        here = sys._getframe()
        for _ in range(300):
            contention.record_mutex(here, 3_000_000)
        want = contention.profile_of("mutex").totals()
        for q in ("", "?debug=1"):
            out = go_tool("-raw", f"{srv.url}{MOUNT}/mutex{q}")
            m = re.search(r"^\s+(\d+)\s+(\d+):", out, re.M)
            assert m is not None, out
            assert [int(m.group(1)), int(m.group(2))] == want, (q, out)


def test_rlock_and_condition_release_charge_the_holder() -> None:
    with profiling():
        rl = threading.RLock()
        cond = threading.Condition(rl)
        got = threading.Event()

        def waiter() -> None:
            with rl:
                got.set()

        with cond:
            with rl:  # recursive: the inner release is not the end of the section
                t = threading.Thread(target=waiter, name="mw-rlock")
                t.start()
                time.sleep(0.05)
            assert not got.is_set()
            time.sleep(0.05)
        t.join()
        data = contention.profile_of("mutex")
    _, ns = delay_on(data, "test_rlock_and_condition_release_charge_the_holder")
    assert 0.07e9 <= ns <= 0.2e9, ns / 1e6
    (s,) = [s for s in data.samples if "test_rlock_and" in str(s.stack)]
    assert s.values[0] == 1  # one contended release: the outer one
    assert s.stack[0].function == "threading.RLock.release"
    assert block.set_mutex_profile_fraction(-1) == 0
