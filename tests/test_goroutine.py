"""/debug/pprof/goroutine: every asyncio task and thread, in all three debug forms."""

from __future__ import annotations

import asyncio
import gc
import inspect
import re
import statistics
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from asgi_pprof import builder
from asgi_pprof.model import ProfileData

from .conftest import mounted

pytestmark = pytest.mark.anyio

HERE = Path(__file__).resolve()


@pytest.fixture(params=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    if request.param == "uvloop":
        return ("asyncio", {"use_uvloop": True})
    return "asyncio"


def line_of(fn: Callable[..., Any], marker: str) -> int:
    """Return the line of ``fn`` that carries the comment ``# <marker>``."""
    lines, start = inspect.getsourcelines(fn)
    for i, text in enumerate(lines):
        if text.rstrip().endswith(f"# {marker}"):
            return start + i
    raise AssertionError(f"no line marked {marker} in {fn.__name__}")


# --- the workload: one distinctively named function per kind of wait -------------------


async def gtest_sleeps() -> None:
    await asyncio.sleep(30)  # sleep


async def gtest_waits_event(ev: asyncio.Event) -> None:
    await ev.wait()  # event


async def gtest_waits_queue(q: asyncio.Queue[int]) -> None:
    await q.get()  # queue


async def gtest_waits_lock(lock: asyncio.Lock) -> None:
    async with lock:  # lock
        pass


async def gtest_awaits_task(t: asyncio.Task[None]) -> None:
    await t  # task


async def gtest_gather_child() -> None:
    await asyncio.sleep(30)  # child


async def gtest_gathers() -> None:
    a = asyncio.create_task(gtest_gather_child(), name="gtest-gather-a")
    b = asyncio.create_task(gtest_gather_child(), name="gtest-gather-b")
    await asyncio.gather(a, b)  # gather


async def gtest_group_child() -> None:
    await asyncio.sleep(30)  # child


async def gtest_groups() -> None:
    async with asyncio.TaskGroup() as tg:
        tg.create_task(gtest_group_child(), name="gtest-group-child")
    # taskgroup: the parent waits in __aexit__, at the end of the with block


def gtest_thread_blocks(ev: threading.Event) -> None:
    ev.wait()  # thread


@asynccontextmanager
async def workload() -> AsyncIterator[dict[str, asyncio.Task[None]]]:
    """Start one named task per kind of wait; cancel them all at the end."""
    ev = asyncio.Event()
    q: asyncio.Queue[int] = asyncio.Queue()
    lock = asyncio.Lock()
    await lock.acquire()
    sleeper = asyncio.create_task(gtest_sleeps(), name="gtest-sleeper")
    event = asyncio.create_task(gtest_waits_event(ev), name="gtest-event")  # event-created
    made = {
        "gtest-sleeper": sleeper,
        "gtest-event": event,
        "gtest-queue": asyncio.create_task(gtest_waits_queue(q), name="gtest-queue"),
        "gtest-lock": asyncio.create_task(gtest_waits_lock(lock), name="gtest-lock"),
        "gtest-awaiter": asyncio.create_task(gtest_awaits_task(sleeper), name="gtest-awaiter"),
        "gtest-gatherer": asyncio.create_task(gtest_gathers(), name="gtest-gatherer"),
        "gtest-group": asyncio.create_task(gtest_groups(), name="gtest-group"),
    }
    await asyncio.sleep(0.02)  # let every task reach its wait
    try:
        yield made
    finally:
        for t in asyncio.all_tasks():
            if t.get_name().startswith("gtest-"):
                t.cancel()
        lock.release()
        await asyncio.gather(*made.values(), return_exceptions=True)


@contextmanager
def blocked_thread() -> Iterator[threading.Thread]:
    ev = threading.Event()
    t = threading.Thread(target=gtest_thread_blocks, args=(ev,), name="gtest-thread")
    t.start()
    try:
        yield t
    finally:
        ev.set()
        t.join()


# --- parsing helpers ---------------------------------------------------------------------


def dump_block(dump: str, header_start: str) -> str:
    """Return the block of the dump whose first line starts with ``header_start``."""
    for block in dump.split("\n\n"):
        if block.startswith(header_start):
            return block
    raise AssertionError(f"no block starting {header_start!r} in:\n{dump}")


def frame_at(fn: Callable[..., Any], marker: str) -> str:
    return f"tests.test_goroutine.{fn.__name__}(...)\n\t{HERE}:{line_of(fn, marker)}"


# --- debug=2 ---------------------------------------------------------------------------


async def test_dump_shows_each_task_state_wait_stack_and_links(
    client: httpx.AsyncClient,
) -> None:
    with blocked_thread():
        async with workload() as made:
            r = await client.get("/debug/pprof/goroutine?debug=2")
            assert r.status_code == 200
            assert r.headers["content-type"] == "text/plain; charset=utf-8"
            dump = r.text
            ids = {name: f"{id(t):#x}" for name, t in made.items()}

    assert dump.startswith("goroutine dump: ")
    assert "creation sites: not tracked" in dump

    b = dump_block(dump, f'task {ids["gtest-sleeper"]} "gtest-sleeper" [pending: asyncio.sleep(30)')
    assert frame_at(gtest_sleeps, "sleep") in b
    assert "asyncio.tasks.sleep(...)" in b.splitlines()[1]  # innermost first
    # Its one line carries all of it: what it waits on, for how long, who waits for it.
    assert re.match(
        rf'task {ids["gtest-sleeper"]} "gtest-sleeper" \[pending: asyncio\.sleep\(30\), '
        rf"[0-9.]+ s left, waiting 0\.\d+ s; awaited by task {ids['gtest-awaiter']} "
        rf'"gtest-awaiter" \(await\)\] on loop MainThread:\n',
        b,
    ), b

    b = dump_block(dump, f'task {ids["gtest-event"]} "gtest-event" [pending: Event.wait on Event')
    assert frame_at(gtest_waits_event, "event") in b

    b = dump_block(dump, f'task {ids["gtest-queue"]} "gtest-queue" [pending: Queue.get on Queue')
    assert "(size 0, 1 waiting)" in b.splitlines()[0]
    assert frame_at(gtest_waits_queue, "queue") in b

    b = dump_block(dump, f'task {ids["gtest-lock"]} "gtest-lock" [pending: Lock.acquire on Lock')
    assert "(locked, 1 waiting)" in b.splitlines()[0]
    assert frame_at(gtest_waits_lock, "lock") in b

    b = dump_block(
        dump,
        f'task {ids["gtest-awaiter"]} "gtest-awaiter" [pending: await task {ids["gtest-sleeper"]}',
    )
    assert frame_at(gtest_awaits_task, "task") in b

    b = dump_block(
        dump, f'task {ids["gtest-gatherer"]} "gtest-gatherer" [pending: gather of 2 (0 done)]'
    )
    assert frame_at(gtest_gathers, "gather") in b
    # Both children have the same stack: one block lists both, each awaited by the gather.
    b = dump_block(dump, "2 tasks [pending: sleep] on loop ")
    assert frame_at(gtest_gather_child, "child") in b
    for child in ("gtest-gather-a", "gtest-gather-b"):
        assert re.search(
            rf'^    task 0x[0-9a-f]+ "{child}" \[pending: asyncio\.sleep\(30\), [0-9.]+ s left, '
            rf'waiting [0-9.e-]+ s; awaited by task {ids["gtest-gatherer"]} "gtest-gatherer" '
            r"\(gather\)\]$",
            b,
            re.M,
        ), b

    b = dump_block(
        dump, f'task {ids["gtest-group"]} "gtest-group" [pending: TaskGroup exit, 1 task left]'
    )
    assert "asyncio.taskgroups.TaskGroup." in b.splitlines()[1]
    assert f"tests.test_goroutine.gtest_groups(...)\n\t{HERE}:" in b
    child = next(bl for bl in dump.split("\n\n") if '"gtest-group-child" [pending' in bl)
    assert frame_at(gtest_group_child, "child") in child
    assert f'awaited by task {ids["gtest-group"]} "gtest-group" (TaskGroup)' in child

    # Threads: the blocked one, with its stack, and the main thread.
    thread = next(bl for bl in dump.split("\n\n") if '"gtest-thread" [' in bl)
    assert thread.startswith("thread ")
    assert "[waiting: lock wait" in thread
    assert frame_at(gtest_thread_blocks, "thread") in thread
    assert '"MainThread" [' in dump


async def test_dump_names_who_created_each_task_when_tracking() -> None:
    transport = httpx.ASGITransport(app=mounted(track_task_creation=True))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        await c.get("/debug/pprof/goroutine?debug=1")  # installs tracking on this loop
        async with workload() as made:
            dump = (await c.get("/debug/pprof/goroutine?debug=2")).text
            me = asyncio.current_task()
            assert me is not None
            ids = {name: f"{id(t):#x}" for name, t in made.items()}
    assert "creation sites: tracked" in dump
    b = dump_block(dump, f'task {ids["gtest-event"]} "gtest-event"')
    assert re.search(
        rf'created by tests\.test_goroutine\.workload in task {id(me):#x} "{me.get_name()}", '
        rf"[0-9.e-]+ s ago\n\t{HERE}:{line_of(workload, 'event-created')}",
        b,
    ), b
    child = next(bl for bl in dump.split("\n\n") if '"gtest-group-child" [pending' in bl)
    assert f"created by tests.test_goroutine.gtest_groups in task {ids['gtest-group']}" in child


async def test_tracking_keeps_the_names_of_unnamed_tasks() -> None:
    # 3.13.0-3.13.2 rename every task made through a custom factory "None" (gh-130033).
    transport = httpx.ASGITransport(app=mounted(track_task_creation=True))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        await c.get("/debug/pprof/goroutine?debug=1")  # installs tracking on this loop
        unnamed = asyncio.create_task(asyncio.sleep(0))
        named = asyncio.create_task(asyncio.sleep(0), name="given")
        await asyncio.gather(unnamed, named)
    assert unnamed.get_name().startswith("Task-")
    assert named.get_name() == "given"


# --- debug=1 and debug=0 ---------------------------------------------------------------------


def labelled_blocks(text: str) -> list[tuple[int, dict[str, str], str]]:
    """Return (count, labels, frame text) per record of Go's count text."""
    out = []
    for block in text.split("\n\n")[:-1]:
        lines = block.splitlines()
        if lines[0].startswith("goroutine profile:"):
            lines = lines[1:]
        n = int(lines[0].split(" @ ")[0])
        labels: dict[str, str] = {}
        if lines[1].startswith("# labels: "):
            labels = dict(re.findall(r'"([^"]*)":"([^"]*)"', lines[1]))
        out.append((n, labels, "\n".join(lines)))
    return out


async def test_count_text_groups_with_labels_and_file_lines(client: httpx.AsyncClient) -> None:
    async with workload():
        r = await client.get("/debug/pprof/goroutine?debug=1")
        await asyncio.sleep(0)
        index = (await client.get("/debug/pprof/")).text
        r2 = await client.get("/debug/pprof/goroutine?debug=1")
    text = r2.text
    assert r.status_code == 200
    total = int(re.match(r"goroutine profile: total (\d+)\n", text).group(1))  # type: ignore[union-attr]
    blocks = labelled_blocks(text)
    assert sum(n for n, _, _ in blocks) == total
    counts = [n for n, _, _ in blocks]
    assert counts == sorted(counts, reverse=True)
    assert f"<tr><td>{total}</td><td><a href='goroutine?debug=1'>goroutine</a></td></tr>" in index

    def find(fn: Callable[..., Any]) -> tuple[int, dict[str, str], str]:
        return next(b for b in blocks if f"tests.test_goroutine.{fn.__name__}+" in b[2])

    # sleeper + 2 gather children + group child share a stack shape but not a function.
    n, labels, frames = find(gtest_gather_child)
    assert n == 2
    assert labels == {"kind": "task", "state": "pending", "wait": "sleep", "loop": "MainThread"}
    assert f"{HERE}:{line_of(gtest_gather_child, 'child')}" in frames
    expect = {
        gtest_waits_event: ("event", "event"),
        gtest_waits_queue: ("queue", "queue"),
        gtest_waits_lock: ("lock", "lock"),
        gtest_awaits_task: ("task", "task"),
        gtest_gathers: ("gather", "gather"),
        gtest_sleeps: ("sleep", "sleep"),
    }
    for fn, (wait, marker) in expect.items():
        n, labels, frames = find(fn)
        assert n == 1
        assert labels["wait"] == wait, (fn, labels)
        assert f"{HERE}:{line_of(fn, marker)}" in frames
    assert find(gtest_groups)[1]["wait"] == "taskgroup"
    threads = [b for b in blocks if b[1].get("kind") == "thread"]
    assert any(b[1]["thread"] == "MainThread" for b in threads)


async def test_proto_has_one_sample_per_stack_and_labels(client: httpx.AsyncClient) -> None:
    async with workload():
        r = await client.get("/debug/pprof/goroutine")
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"] == 'attachment; filename="goroutine"'
    data: ProfileData = builder.decode(r.content)
    assert [tuple(v) for v in data.sample_types] == [("goroutine", "count")]
    assert tuple(data.period_type) == ("goroutine", "count")
    by_leaf_fn = {}
    for s in data.samples:
        for f in s.stack:
            if f.function.startswith("tests.test_goroutine.gtest_"):
                by_leaf_fn[f.function.rsplit(".", 1)[1]] = (s, f)
                break
    s, f = by_leaf_fn["gtest_waits_queue"]
    assert dict(s.labels)["wait"] == "queue"
    assert f.line == line_of(gtest_waits_queue, "queue")
    assert s.stack[0].function == "asyncio.queues.Queue.get"
    s, _ = by_leaf_fn["gtest_gather_child"]
    assert s.values == [2]
    keys = [s.key() for s in data.samples]
    assert len(keys) == len(set(keys))


async def test_delta_counts_tasks_started_in_the_window(client: httpx.AsyncClient) -> None:
    started: list[asyncio.Task[None]] = []

    async def start_later() -> None:
        await asyncio.sleep(0.3)
        started.append(asyncio.create_task(gtest_sleeps(), name="gtest-late"))

    bg = asyncio.create_task(start_later())
    try:
        r = await client.get("/debug/pprof/goroutine?seconds=1")
    finally:
        bg.cancel()
        for t in started:
            t.cancel()
        await asyncio.gather(bg, *started, return_exceptions=True)
    assert r.status_code == 200
    assert r.headers["content-disposition"] == 'attachment; filename="goroutine-delta"'
    data = builder.decode(r.content)
    assert data.duration_nanos >= 900_000_000
    late = [s for s in data.samples if any(f.function.endswith(".gtest_sleeps") for f in s.stack)]
    assert [s.values for s in late] == [[1]]
    # Go's validation order and texts.
    r = await client.get("/debug/pprof/goroutine?seconds=1&debug=1")
    assert (r.status_code, r.text) == (400, "seconds and debug params are incompatible\n")
    r = await client.get("/debug/pprof/goroutine?seconds=0&debug=1")
    assert r.status_code == 400
    assert r.text == 'invalid value for "seconds" - must be a positive integer\n'


# --- 10 000 tasks ---------------------------------------------------------------------------

UNITS = 1700
"""Units of six tasks each (10 200 tasks): a sleeper, a task awaiting it, an event waiter,
a gather of two sleeping children (parent and children), and one more sleeper."""


async def big_sleeper() -> None:
    await asyncio.sleep(30)


async def big_awaiter(t: asyncio.Task[None]) -> None:
    await t


async def big_event(ev: asyncio.Event) -> None:
    await ev.wait()


async def big_gather(a: asyncio.Task[None], b: asyncio.Task[None]) -> None:
    await asyncio.gather(a, b)


@asynccontextmanager
async def many_tasks() -> AsyncIterator[dict[str, asyncio.Task[None]]]:
    """Start UNITS * 6 named tasks ``worker-N``; cancel them all at the end."""
    ev = asyncio.Event()
    made: dict[str, asyncio.Task[None]] = {}

    def start(coro: Any, k: int) -> asyncio.Task[None]:
        t = asyncio.create_task(coro, name=f"worker-{k}")
        made[t.get_name()] = t
        return t

    for u in range(UNITS):
        k = 6 * u
        sleeper = start(big_sleeper(), k)
        start(big_awaiter(sleeper), k + 1)
        start(big_event(ev), k + 2)
        a, b = start(big_sleeper(), k + 4), start(big_sleeper(), k + 5)
        start(big_gather(a, b), k + 3)
    await asyncio.sleep(0.05)  # every task at its wait
    try:
        yield made
    finally:
        for t in made.values():
            t.cancel()
        await asyncio.gather(*made.values(), return_exceptions=True)


def own_line(dump: str, task: asyncio.Task[None]) -> str:
    """Return the one line of the dump that is ``task``'s own (a header or a member line)."""
    lines = [
        line
        for line in dump.splitlines()
        if line.lstrip().startswith(f'task {id(task):#x} "{task.get_name()}" [')
    ]
    assert len(lines) == 1, (task.get_name(), lines)
    return lines[0]


async def test_dump_of_10000_tasks_names_each_with_its_wait_and_awaiters(
    client: httpx.AsyncClient,
) -> None:
    async with many_tasks() as made:
        r = await client.get("/debug/pprof/goroutine?debug=2")
    assert r.status_code == 200
    dump = r.text
    # Every task once, each on a line of its own, whatever its group.
    ids = re.findall(r"^(?:    )?task (0x[0-9a-f]+) \"", dump, re.M)
    assert len(ids) == len(set(ids))
    assert {f"{id(t):#x}" for t in made.values()} <= set(ids)
    assert int(re.match(r"goroutine dump: (\d+) tasks", dump).group(1)) >= len(made)  # type: ignore[union-attr]

    # grep worker-417 (a gather parent): its line, and the lines of the two it waits for.
    hits = [line for line in dump.splitlines() if '"worker-417"' in line]
    assert len(hits) == 3, hits
    parent, a, b = made["worker-417"], made["worker-418"], made["worker-419"]
    assert own_line(dump, parent).endswith('"worker-417" [pending: gather of 2 (0 done)]')
    for child in (a, b):
        assert re.search(
            r"\[pending: asyncio\.sleep\(30\), [0-9.]+ s left, waiting [0-9.e-]+ s; "
            rf'awaited by task {id(parent):#x} "worker-417" \(gather\)\]$',
            own_line(dump, child),
        ), own_line(dump, child)
    # A sleeper awaited by a task, the task awaiting it, an event waiter.
    sleeper, awaiter, waiter = made["worker-414"], made["worker-415"], made["worker-416"]
    assert own_line(dump, sleeper).endswith(
        f'; awaited by task {id(awaiter):#x} "worker-415" (await)]'
    )
    assert own_line(dump, awaiter).endswith(f"[pending: await task {id(sleeper):#x} 'worker-414']")
    assert re.search(
        r'"worker-416" \[pending: Event\.wait on Event 0x[0-9a-f]+ \(\d+ waiting\)\]$',
        own_line(dump, waiter),
    )
    # Identical tasks still share one block (one stack printed for all of them).
    assert re.search(rf"^{UNITS} tasks \[pending: event\] on loop ", dump, re.M)


def tracked_objects() -> int:
    return len(gc.get_objects())


async def test_reading_10000_tasks_keeps_no_object_per_task_for_the_collector() -> None:
    # What stalled the loop (63 ms at 10 000 tasks): records the collector tracks, one
    # or more per task, kept while the dump was made, so young collections promoted
    # tens of thousands of objects and brought on full collections over the whole heap
    # (50-100 ms with the GIL held), or a deferred collection of all of them at the end.
    # Deterministic: count the objects the collector tracks while a dump is alive.
    from asgi_pprof import goroutine, tasks

    async with many_tasks() as made:

        def measure() -> tuple[int, int, bool]:
            tasks.snapshot()  # warm-up: 3.11/3.12 keep one f_locals dict per frame read
            gc.collect()
            before = tracked_objects()
            snap = tasks.snapshot()
            text = goroutine.dump(snap)
            enabled = gc.isenabled()
            gc.collect(1)  # young generations only: what a dump would make survive
            return tracked_objects() - before, len(text), enabled

        kept, size, enabled = await asyncio.to_thread(measure)
    # Allowance: the snapshot, its group tables, one stack per distinct wait (under 20
    # here), a few loops and threads. Before the fix: 8 per task (81 000).
    assert kept < 500, kept
    assert enabled, "the dump must not turn the collector off"
    assert size > 100 * len(made)  # the dump was made, every task in it


async def test_a_name_with_quotes_or_line_breaks_keeps_the_dump_one_line_per_task(
    client: httpx.AsyncClient,
) -> None:
    odd = 'say "hi"\nthen go'
    t = asyncio.create_task(gtest_sleeps(), name=odd)
    await asyncio.sleep(0.01)
    try:
        dump = (await client.get("/debug/pprof/goroutine?debug=2")).text
    finally:
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)
    line = next(x for x in dump.splitlines() if x.startswith(f"task {id(t):#x} "))
    assert line.startswith(f'task {id(t):#x} "say \\"hi\\"\\nthen go" [pending: asyncio.sleep(30)')


async def test_known_loops_lists_running_loops_once_and_never_a_closed_one(
    client: httpx.AsyncClient,
) -> None:
    from asgi_pprof import tasks

    mine = asyncio.get_running_loop()
    other = asyncio.new_event_loop()
    ready, stop = threading.Event(), threading.Event()

    async def serve_other() -> None:
        tasks.note_loop()  # as a profile request on that loop does
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.01)

    th = threading.Thread(target=other.run_until_complete, args=(serve_other(),))
    th.start()
    try:
        assert ready.wait(10)
        await client.get("/debug/pprof/goroutine?debug=1")  # notes this loop
        loops = await asyncio.to_thread(tasks.known_loops)  # from another thread, as helpers do
        assert loops.count(mine) == 1
        assert loops.count(other) == 1
        assert tasks.loop_thread(other) == th.name
    finally:
        stop.set()
        th.join(10)
        other.close()
    assert other not in tasks.known_loops()
    assert mine in tasks.known_loops()


async def test_reading_10000_tasks_lets_the_loop_in_without_waiting_out_the_switch_interval() -> (
    None
):
    # A worker thread that never blocks keeps the GIL until the switch interval (5 ms)
    # forces it off, so a loop waking up behind it waits about that long every time:
    # the median wake-up delay of a 1 ms timer is then the interval itself (measured:
    # 5.2 ms, steady even on a loaded machine). The reader gives the GIL back every
    # millisecond, so the loop gets in at once (measured: 0.1-0.3 ms). The median
    # ignores the OS's scheduling outliers; half the interval separates the two cases.
    from asgi_pprof.goroutine import GoroutineProfile

    delays: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            delays.append(time.perf_counter() - t - 0.001)

    prof = GoroutineProfile()
    async with many_tasks():
        await prof.text(2)  # warm-up: the worker thread exists, frames are made
        tick = asyncio.create_task(ticker())
        try:
            await prof.text(2)
        finally:
            stop.set()
            await tick
    assert len(delays) > 20, "the dump was too short to measure"
    assert statistics.median(delays) < sys.getswitchinterval() / 2, statistics.median(delays)


async def test_task_loops_finds_a_loop_nobody_told_us_of() -> None:
    from asgi_pprof import tasks

    other = asyncio.new_event_loop()
    ready, stop = threading.Event(), threading.Event()

    async def app_main() -> None:  # never serves a pprof request
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.01)

    th = threading.Thread(target=other.run_until_complete, args=(app_main(),))
    th.start()
    try:
        assert ready.wait(10)
        assert other not in tasks.known_loops()
        found = await asyncio.to_thread(tasks.task_loops)
        assert found.count(other) == 1
        assert found.count(asyncio.get_running_loop()) == 1
    finally:
        stop.set()
        th.join(10)
        other.close()
    assert other not in tasks.task_loops()
