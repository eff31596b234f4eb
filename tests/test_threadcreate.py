"""/debug/pprof/threadcreate: where threads came from."""

from __future__ import annotations

import re
import threading
from typing import Any

import httpx
import pytest

from asgi_pprof import builder

from .conftest import ServerThread, mounted

pytestmark = pytest.mark.anyio


def tc_idle() -> None:
    pass


def tc_spawns_a_thread() -> None:
    t = threading.Thread(target=tc_idle, name="tc-thread")
    t.start()  # spawn
    t.join()


def total_of(text: str) -> int:
    m = re.match(r"threadcreate profile: total (\d+)\n", text)
    assert m is not None, text
    return int(m.group(1))


async def test_thread_started_from_a_named_function_shows_that_site(
    client: httpx.AsyncClient,
) -> None:
    before = total_of((await client.get("/debug/pprof/threadcreate?debug=1")).text)
    tc_spawns_a_thread()
    text = (await client.get("/debug/pprof/threadcreate?debug=1")).text
    index = (await client.get("/debug/pprof/")).text
    after = total_of(text)
    assert after >= before + 1
    assert f"<tr><td>{after}</td><td><a href='threadcreate?debug=1'>threadcreate</a>" in index
    line = tc_spawns_a_thread.__code__.co_firstlineno + 2
    block = next(
        b for b in text.split("\n\n") if "tests.test_threadcreate.tc_spawns_a_thread+" in b
    )
    assert re.match(r"\d+ @( 0x[0-9a-f]+)+\n#\t0x", block)
    assert f"test_threadcreate.py:{line}" in block
    # Threads that predate the package are counted, with an honest stack, never an empty one.
    assert "[creation site unknown: thread started before asgi_pprof was imported" in text
    assert "\n#\t0x0\n" not in text

    r = await client.get("/debug/pprof/threadcreate")
    assert r.headers["content-disposition"] == 'attachment; filename="threadcreate"'
    data = builder.decode(r.content)
    assert [tuple(v) for v in data.sample_types] == [("threadcreate", "count")]
    assert sum(s.values[0] for s in data.samples) == after
    site = [s for s in data.samples if s.stack[0].function.endswith(".tc_spawns_a_thread")]
    assert site
    assert site[0].stack[0].line == line


async def test_delta_shows_threads_created_in_the_window(client: httpx.AsyncClient) -> None:
    timer = threading.Timer(0.3, tc_spawns_a_thread)
    timer.start()
    try:
        r = await client.get("/debug/pprof/threadcreate?seconds=1")
    finally:
        timer.join()
    assert r.status_code == 200
    assert r.headers["content-disposition"] == 'attachment; filename="threadcreate-delta"'
    data = builder.decode(r.content)
    site = [s for s in data.samples if s.stack[0].function.endswith(".tc_spawns_a_thread")]
    assert [s.values for s in site] == [[1]]
    # Started before the window: the Timer's own thread is not in the delta.
    assert not [s for s in data.samples if "test_delta_shows" in s.stack[0].function]


@pytest.mark.go
def test_go_tool_reads_threadcreate_over_http(go_tool: Any) -> None:
    tc_spawns_a_thread()
    with ServerThread(mounted()) as srv:
        url = f"{srv.url}/debug/pprof/threadcreate"
        for out in (go_tool("-top", url), go_tool("-traces", url + "?debug=1")):
            assert "Type: threadcreate" in out
            assert "tests.test_threadcreate.tc_spawns_a_thread" in out
            assert "creation site unknown" in out
