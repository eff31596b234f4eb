"""/debug/pprof/threadcreate: where threads came from."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path
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
    later = total_of((await client.get("/debug/pprof/threadcreate?debug=1")).text)
    after = total_of(text)
    assert after >= before + 1
    # Counts only grow (the index page itself may start a profile's thread).
    shown = re.search(
        r"<tr><td>(\d+)</td><td><a href='threadcreate\?debug=1'>threadcreate</a>", index
    )
    assert shown is not None
    assert after <= int(shown.group(1)) <= later
    line = tc_spawns_a_thread.__code__.co_firstlineno + 2
    block = next(
        b for b in text.split("\n\n") if "tests.test_threadcreate.tc_spawns_a_thread+" in b
    )
    assert re.match(r"\d+ @( 0x[0-9a-f]+)+\n#\t0x", block)
    assert f"test_threadcreate.py:{line}" in block
    # Threads that predate the package are counted, with an honest stack, never an empty one.
    assert "[creation site unknown: thread started before the pprof app was created" in text
    assert "\n#\t0x0\n" not in text

    r = await client.get("/debug/pprof/threadcreate")
    assert r.headers["content-disposition"] == 'attachment; filename="threadcreate"'
    data = builder.decode(r.content)
    assert [tuple(v) for v in data.sample_types] == [("threadcreate", "count")]
    assert sum(s.values[0] for s in data.samples) >= later  # counts only grow
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
        # -nodefraction=0: after a whole test session one unknown thread among hundreds
        # is under pprof's default 0.5 % cut.
        top = go_tool("-top", "-nodefraction=0", url)
        for out in (top, go_tool("-traces", url + "?debug=1")):
            assert "Type: threadcreate" in out
            assert "tests.test_threadcreate.tc_spawns_a_thread" in out
            assert "creation site unknown" in out


INSTALL_CHECK = """
import json, threading
original = threading.Thread.start

def tc_before():
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()

tc_before()
import asgi_pprof
from asgi_pprof import create_app, threads
untouched = threading.Thread.start is original
create_app()
wrapped = threading.Thread.start is not original
create_app()  # a second app installs nothing more

def tc_after():
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()

tc_after()
sites = [s.stack[0].function for s in threads.profile().samples]
print(json.dumps({"untouched": untouched, "wrapped": wrapped, "sites": sites}))
"""


def test_thread_start_is_wrapped_when_an_app_is_made_not_at_import() -> None:
    # Issue 8 item 11: importing the package installs no process-wide hook; the first
    # create_app() does (threadcreate needs it from then on).
    out = subprocess.run(
        [sys.executable, "-c", INSTALL_CHECK],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    got = json.loads(out.stdout)
    assert got["untouched"], (
        "import asgi_pprof wrapped Thread.start (is pprof_app made at import? it must be "
        "made on first access)"
    )
    assert got["wrapped"]
    assert got["sites"].count("__main__.tc_after") == 1
    assert "__main__.tc_before" not in got["sites"]  # before any app: not seen
    assert any(s.startswith("[creation site unknown") for s in got["sites"])
