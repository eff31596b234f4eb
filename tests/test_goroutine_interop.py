"""The real go tool pprof reads the goroutine profile over HTTP, from a server thread.

The workload runs on the test's event loop; pprof is served by uvicorn on another
loop in another thread, so these tests also show tasks of a loop that is not the one
serving the request, while that loop is blocked (go tool pprof runs synchronously).
"""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import ServerThread, mounted
from .test_goroutine import blocked_thread, line_of, workload

pytestmark = [pytest.mark.anyio, pytest.mark.go]


@pytest.fixture(params=["asyncio", "uvloop"])
def server_loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_go_tool_reads_debug0_and_debug1_and_tagfocus_splits(
    go_tool: Any, server_loop: str
) -> None:
    with ServerThread(mounted(), loop=server_loop) as srv, blocked_thread():
        async with workload():
            url = f"{srv.url}/debug/pprof/goroutine"
            traces = go_tool("-traces", url)
            top = go_tool("-top", url)
            text_traces = go_tool("-traces", url + "?debug=1")
            text_top = go_tool("-top", url + "?debug=1")
            events = go_tool("-traces", "-tagfocus=wait=event", url)
            threads = go_tool("-top", "-tagfocus=kind=thread", url)
            focused = go_tool("-top", "-focus=gtest_waits_queue", url + "?debug=1")
    for out in (traces, text_traces):
        assert "Type: goroutine" in out
        for fn in ("gtest_sleeps", "gtest_waits_event", "gtest_waits_lock", "gtest_gathers"):
            assert f"tests.test_goroutine.{fn}" in out, out
        assert "asyncio.locks.Event.wait" in out
    # labels in -traces output (proto only: pprof's legacy text parser skips comments)
    assert "wait:  event" in traces
    assert "kind:  task" in traces
    for out in (top, text_top):
        assert "tests.test_goroutine.gtest_gather_child" in out
    assert "tests.test_goroutine.gtest_waits_event" in events
    assert "gtest_waits_queue" not in events
    assert "gtest_sleeps" not in events
    assert "tests.test_goroutine.gtest_thread_blocks" in threads
    assert "gtest_waits_event" not in threads
    assert "tests.test_goroutine.gtest_waits_queue" in focused
    assert "gtest_waits_event" not in focused


async def test_tasks_of_another_loop_are_in_the_dump_with_their_loop(server_loop: str) -> None:
    import httpx

    with ServerThread(mounted(), loop=server_loop) as srv:
        async with workload() as made, httpx.AsyncClient() as c:
            r = await c.get(f"{srv.url}/debug/pprof/goroutine?debug=2")
            idx = await c.get(f"{srv.url}/debug/pprof/")
    assert r.status_code == 200
    for name, t in made.items():
        assert f'task {id(t):#x} "{name}" [' in r.text
    # the server's own request task is on its loop, named after its thread
    assert "on loop test-uvicorn:" in r.text
    assert "goroutine?debug=1'>goroutine</a>" in idx.text


async def test_tracking_reaches_loops_seen_in_a_snapshot(server_loop: str) -> None:
    # The app is served on another loop; a request there installs creation tracking on
    # this loop too (scheduled on this loop's own thread), for tasks created from then on.
    import asyncio

    import httpx

    from .test_goroutine import gtest_sleeps

    with ServerThread(mounted(track_task_creation=True), loop=server_loop) as srv:
        async with httpx.AsyncClient() as c:
            await c.get(f"{srv.url}/debug/pprof/goroutine?debug=1")
            await asyncio.sleep(0.05)  # the factory is installed by a callback on this loop
            t = asyncio.create_task(gtest_sleeps(), name="gtest-tracked-here")  # made here
            await asyncio.sleep(0.01)
            try:
                dump = (await c.get(f"{srv.url}/debug/pprof/goroutine?debug=2")).text
            finally:
                t.cancel()
                await asyncio.gather(t, return_exceptions=True)
    block = next(b for b in dump.split("\n\n") if f'task {id(t):#x} "gtest-tracked-here"' in b)
    line = line_of(test_tracking_reaches_loops_seen_in_a_snapshot, "made here")
    assert "created by tests.test_goroutine_interop.test_tracking_reaches_loops_seen" in block
    assert f"test_goroutine_interop.py:{line}\n" in block + "\n", block
