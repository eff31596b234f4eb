"""Shared fixtures: the mounted app, a real uvicorn server, the real go tool pprof, leak checks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import anyio
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from asgi_pprof import create_app, sampler, trace_hook
from asgi_pprof.concurrency import POOL_NAME, THREAD_PREFIX

MOUNT = "/debug/pprof"


def run_python(
    code: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Return the finished run of ``code`` (dedented) in a fresh interpreter at the repo root."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def own_threads() -> list[threading.Thread]:
    """Return the asgi_pprof threads alive now, but for idle CPU samplers and pool threads.

    The CPU sampler's thread is long-lived by design (one per process and rate, idle with
    no timers while no capture runs); a sampler with a capture left running is a leak.
    """
    idle = {
        s._thread
        for s in sampler._samplers.values()
        if not s.running and s._main_timer is None and s._thread is not None
    }
    return [
        t
        for t in threading.enumerate()
        if t.name.startswith(THREAD_PREFIX)
        and t.name != POOL_NAME  # an idle worker of our pool: long-lived by design too
        and t.is_alive()
        and t not in idle
    ]


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """Fail any test that leaves an asgi_pprof thread or capture running, or changes tracemalloc
    state, the switch interval or the SIGPROF handler."""
    tracing_before = tracemalloc.is_tracing()
    frames_before = tracemalloc.get_traceback_limit()
    switch_before = sys.getswitchinterval()
    sigprof_before = signal.getsignal(signal.SIGPROF)
    yield
    deadline = time.monotonic() + 5
    while own_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    left = own_threads()
    assert not left, f"asgi_pprof threads left running: {[t.name for t in left]}"
    assert tracemalloc.is_tracing() == tracing_before, "tracemalloc state changed"
    if tracing_before:
        assert tracemalloc.get_traceback_limit() == frames_before
    assert sys.getswitchinterval() == switch_before, "switch interval not restored"
    assert signal.getsignal(signal.SIGPROF) == sigprof_before, "SIGPROF handler not restored"


def mounted(**options: Any) -> Starlette:
    """Return a parent Starlette app with a pprof app mounted at /debug/pprof."""
    return Starlette(routes=[Mount(MOUNT, app=create_app(**options))])


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on a parent app that mounts the pprof app at /debug/pprof."""
    transport = httpx.ASGITransport(app=mounted())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """A real uvicorn server on 127.0.0.1 in a thread (the loop is not the main thread's)."""

    def __init__(self, app: Any, **config: Any) -> None:
        self.port = free_port()
        self.config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", **config
        )
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def go_binary() -> str | None:
    """Return the path of ``go``, skipping (or failing under ASGI_PPROF_REQUIRE_GO=1) if absent."""
    go = shutil.which("go") or next(
        (p for p in ("/usr/lib/go/bin/go", "/usr/local/go/bin/go") if Path(p).exists()), None
    )
    if go is None:
        if os.environ.get("ASGI_PPROF_REQUIRE_GO") == "1":
            pytest.fail("go is required (ASGI_PPROF_REQUIRE_GO=1) but not installed")
        pytest.skip("go tool pprof not installed")
    return go


def go_pprof(*args: str, timeout: float = 120) -> str:
    """Run the real ``go tool pprof`` and return its stdout; fail the test on a non-zero exit."""
    go = go_binary()
    assert go is not None
    env = {**os.environ, "PPROF_TMPDIR": os.environ.get("PPROF_TMPDIR", "/tmp/asgi_pprof-tests")}
    proc = subprocess.run(
        [go, "tool", "pprof", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, f"go tool pprof {args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture
def go_tool() -> Any:
    """The ``go_pprof`` runner, after checking go is there."""
    go_binary()
    return go_pprof


# --- a raw ASGI client -------------------------------------------------------------------


@dataclass
class Result:
    status: int | None  # None: the app sent nothing
    headers: dict[str, str]
    body: bytes
    seconds: float
    parts: list[bytes]  # the body as the app sent it, one item per message


async def asgi_call(
    app: Any,
    method: str,
    target: bytes,
    body: bytes = b"",
    *,
    chunk: int = 65536,
    disconnect_after: float | None = None,
    stall_body: bool = False,
) -> Result:
    """Call ``app`` with a raw request target; disconnect after ``disconnect_after`` s.

    ``stall_body`` sends only the first body chunk and then disconnects (a client that
    leaves mid-POST).
    """
    raw_path, _, query = target.partition(b"?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote_to_bytes(raw_path).decode("utf-8", "replace"),
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"test"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    if stall_body:
        chunks = chunks[:1]
    done = anyio.Event()
    status: list[int] = []
    headers: dict[str, str] = {}
    parts: list[bytes] = []

    async def receive() -> dict[str, Any]:
        if chunks:
            c = chunks.pop(0)
            more = bool(chunks) or stall_body
            return {"type": "http.request", "body": c, "more_body": more}
        if stall_body:
            await anyio.sleep(0.01)
            return {"type": "http.disconnect"}
        if disconnect_after is not None:
            with anyio.move_on_after(max(0.0, disconnect_after - (time.monotonic() - t0))):
                await done.wait()
        else:
            await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])
            headers.update((k.decode(), v.decode()) for k, v in message["headers"])
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                done.set()

    t0 = time.monotonic()
    await app(scope, receive, send)
    took = time.monotonic() - t0
    return Result(status[0] if status else None, headers, b"".join(parts), took, parts)


# --- the trace's two step hooks ---------------------------------------------------------

STEP_HOOKS = [
    "python",
    pytest.param(
        "native",
        marks=pytest.mark.skipif(
            not trace_hook.available(), reason=f"no C hook: {trace_hook.unavailable_reason()}"
        ),
    ),
]
"""The trace's step hooks, as pytest params: the Python one, and the C one where built."""
