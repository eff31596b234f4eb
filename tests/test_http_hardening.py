"""The HTTP layer under abuse: bad input, clients that leave, limits, shutdown during captures.

Each test here failed before its fix (issue 8, items 3-6). Raw ASGI calls (``asgi_call``)
let a test send any path or body and disconnect at any moment; the real-HTTP tests use
uvicorn in a thread (``ServerThread``) or in a subprocess (``tests.httpapp``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from asgi_pprof import builder, concurrency, create_app, limits, params, start_server
from asgi_pprof.options import Options
from asgi_pprof.profiles import ProfileError
from tests.conftest import Result, ServerThread, asgi_call, free_port, mounted

ROOT = Path(__file__).resolve().parent.parent
GONE = 499  # what a client that left is sent (nobody reads it; a middleware needs one)


# --- a raw ASGI client -------------------------------------------------------------------


def assert_no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, "\n".join(f"{r.name}: {r.getMessage()}" for r in bad[:5])


# --- item 5: parameters -------------------------------------------------------------------

HUGE = "9" * 5000
HUGE_ZERO_PADDED = "0" * 5000 + "7"


def test_params_huge_numbers_are_go_errors_not_exceptions() -> None:
    # Go: ParseInt gives ErrRange (None here), Atoi's error is ignored (0); leading zeros
    # do not count toward the range.
    assert params.parse_int10(HUGE) is None
    assert params.parse_int10("-" + HUGE) is None
    assert params.atoi(HUGE) == (1 << 63) - 1  # Go returns the bound beside ErrRange
    assert params.atoi("-" + HUGE) == -(1 << 63)
    assert params.atoi("1x") == 0
    assert params.parse_int10(HUGE_ZERO_PADDED) == 7
    assert params.parse_int10("-" + HUGE_ZERO_PADDED) == -7
    assert params.parse_int10("9223372036854775807") == (1 << 63) - 1
    assert params.parse_int10("9223372036854775808") is None
    assert params.parse_int10("-9223372036854775808") == -(1 << 63)
    # ParseFloat: finite digits that overflow are ErrRange; the literal inf is not an error.
    assert params.parse_float("1e309") is None
    assert params.parse_float("-1e309") is None
    assert params.parse_float(HUGE) is None
    assert params.parse_float("0x1p99999") is None
    assert params.parse_float("inf") == float("inf")
    assert params.parse_float("1e-400") == 0.0
    assert params.parse_float(HUGE_ZERO_PADDED) == 7.0


GO_PARSE = """
package main

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
)

func main() {
	sc := bufio.NewScanner(os.Stdin)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		s := sc.Text()
		i, ierr := strconv.ParseInt(s, 10, 64)
		a, _ := strconv.Atoi(s)
		f, ferr := strconv.ParseFloat(s, 64)
		fs := "err"
		if ferr == nil {
			fs = strconv.FormatFloat(f, 'g', -1, 64)
		}
		is := "err"
		if ierr == nil {
			is = strconv.FormatInt(i, 10)
		}
		fmt.Printf("%s %d %s\\n", is, a, fs)
	}
}
"""

GO_CASES = [
    "",
    "0",
    "1",
    "+1",
    "-1",
    "007",
    "1_000",
    "0x10",
    "1e3",
    "1e309",
    "-1e309",
    "1e-400",
    "inf",
    "-Inf",
    "infinity",
    "nan",
    "NaN",
    "0x1p-2",
    "0x1p99999",
    "0x_1p0",
    ".5",
    "5.",
    "1.5e",
    " 1",
    "1 ",
    "abc",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    HUGE,
    HUGE_ZERO_PADDED,
    "-" + HUGE_ZERO_PADDED,
    "1" + "0" * 400,
    "0." + "0" * 400 + "1",
]


@pytest.mark.go
def test_params_match_go_strconv(tmp_path: Path) -> None:
    """Differential: Go's own strconv on the same strings (ParseInt, Atoi, ParseFloat)."""
    from tests.conftest import go_binary

    go = go_binary()
    assert go is not None
    src = tmp_path / "parse.go"
    src.write_text(GO_PARSE)
    env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOFLAGS": "-mod=mod"}
    env.setdefault("HOME", str(tmp_path))
    out = subprocess.run(
        [go, "run", str(src)],
        input="\n".join(GO_CASES) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    ).stdout.splitlines()
    assert len(out) == len(GO_CASES)
    for case, line in zip(GO_CASES, out, strict=True):
        go_int, go_atoi, go_float = line.split(" ")
        n = params.parse_int10(case)
        assert ("err" if n is None else str(n)) == go_int, case[:40]
        assert str(params.atoi(case)) == go_atoi, case[:40]
        f = params.parse_float(case)
        if go_float == "err":
            assert f is None, case[:40]
        else:
            assert f is not None, case[:40]
            assert f == float(go_float) or (f != f and go_float == "NaN"), case[:40]


@pytest.mark.anyio
async def test_huge_params_through_every_endpoint_get_go_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = mounted(max_seconds=2)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        r = await c.get(f"/debug/pprof/goroutine?seconds={HUGE}")
        assert r.status_code == 400
        assert r.text == 'invalid value for "seconds" - must be a positive integer\n'
        assert r.headers["x-go-pprof"] == "1"
        # Atoi's ErrRange value is int64's max, which pprof takes: debug != 0 is text.
        r = await c.get(f"/debug/pprof/goroutine?debug={HUGE}")
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/plain; charset=utf-8"
        r = await c.get(f"/debug/pprof/goroutine?debug=-{HUGE}")
        assert r.headers["content-type"] == "text/plain; charset=utf-8"
        r = await c.get(f"/debug/pprof/goroutine?debug=x{HUGE}")
        assert r.headers["content-type"] == "application/octet-stream"
        r = await c.get(f"/debug/pprof/heap?gc={HUGE}&debug={HUGE}")
        assert r.status_code in (200, 403)  # 403: tracemalloc off (Go's error shape)
        r = await c.get(f"/debug/pprof/symbol?{HUGE}+0x1")
        assert r.status_code == 200
        assert r.text == "num_symbols: 1\n"
    assert_no_tracebacks(caplog)


@pytest.mark.anyio
async def test_profile_huge_seconds_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from asgi_pprof import cpu, tracing

    seen: list[float] = []

    async def fake_profile(seconds: float, window: Any, options: Any) -> Any:
        seen.append(seconds)
        return None  # as if the client left: nothing built, nothing sent

    async def fake_capture(seconds: float, window: Any, options: Any) -> bytes:
        seen.append(seconds)
        return b"{}"

    monkeypatch.setattr(cpu, "profile", fake_profile)
    monkeypatch.setattr(tracing, "capture", fake_capture)
    app = mounted(max_seconds=60)
    r = await asgi_call(app, "GET", f"/debug/pprof/profile?seconds={HUGE}".encode())
    assert r.status == GONE  # the collector said the client left: nothing built
    # Go: ParseFloat("1e309") is ErrRange, so the trace falls back to its default 1 s;
    # 5000 nines likewise; the literal "inf" is no error and gives an immediate trace.
    for q in ("1e309", HUGE, "inf", "0x1p99999"):
        r = await asgi_call(app, "GET", f"/debug/pprof/trace?seconds={q}".encode())
        assert r.status == 200, r.body
    assert seen == [30, 1.0, 1.0, 0.0, 1.0]


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["PprofMount", "make_root_app", "unmounted"])
async def test_newline_in_name_is_gos_unknown_profile(how: str) -> None:
    """Starlette's path convertor and ``Mount`` stop at a newline; ours do not. (A plain
    Starlette ``Mount`` in the user's app still answers its own 404 there.)"""
    from starlette.applications import Starlette

    from asgi_pprof.app import PprofMount
    from asgi_pprof.server import make_root_app

    prefix = b"/debug/pprof"
    if how == "PprofMount":
        app: Any = Starlette(routes=[PprofMount("/debug/pprof", app=create_app())])
    elif how == "make_root_app":
        app = make_root_app()
    else:
        app, prefix = create_app(), b""
    for name in (b"/a%0ab", b"/%0a", b"/x%0d%0ay%00z", b"/cmdline%0a", b"/heap%0a"):
        target = prefix + name
        r = await asgi_call(app, "GET", target)
        assert r.status == 404, target
        assert r.body == b"Unknown profile\n"
        assert r.headers["x-go-pprof"] == "1"
        assert r.headers["content-type"] == "text/plain; charset=utf-8"


# --- item 5: the symbol body ---------------------------------------------------------------


@pytest.mark.anyio
async def test_symbol_post_over_the_cap_is_413_and_memory_stays_bounded() -> None:
    cap = 4096
    app = mounted(max_symbol_bytes=cap)
    body = b"+".join(b"0x%x" % (0x1000 + i) for i in range(2000))
    assert len(body) > cap
    r = await asgi_call(app, "POST", b"/debug/pprof/symbol", body, chunk=512)
    assert r.status == 413
    assert r.body == f"request body too large (limit {cap} bytes)\n".encode()
    assert r.headers["x-go-pprof"] == "1"
    r = await asgi_call(app, "POST", b"/debug/pprof/symbol", body[:cap], chunk=512)
    assert r.status == 200
    assert r.body.startswith(b"num_symbols: 1\n")


@pytest.mark.anyio
async def test_big_symbol_body_is_parsed_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    from asgi_pprof import endpoints

    where: list[str] = []
    real = endpoints._symbolize

    def spy(raw: bytes) -> str:
        where.append(threading.current_thread().name)
        return real(raw)

    monkeypatch.setattr(endpoints, "_symbolize", spy)
    app = mounted()
    body = b"+".join(b"0x%x" % (0x1000 + i) for i in range(50_000))  # ~400 KB
    r = await asgi_call(app, "POST", b"/debug/pprof/symbol", body)
    assert r.status == 200
    r = await asgi_call(app, "POST", b"/debug/pprof/symbol", b"0x1")
    assert r.status == 200
    assert where[0] == "asgi_pprof-work"  # the big one in a worker thread
    assert where[1] == threading.current_thread().name  # a tiny one on the loop


@pytest.mark.anyio
async def test_client_leaving_mid_post_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = mounted()
    body = b"0x1+" * 10_000
    r = await asgi_call(app, "POST", b"/debug/pprof/symbol", body, chunk=1000, stall_body=True)
    assert r.status == GONE
    assert r.body == b"context canceled\n"
    assert_no_tracebacks(caplog)


@pytest.mark.anyio
async def test_client_leaving_behind_base_http_middleware_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """FastAPI's ``@app.middleware("http")`` is a BaseHTTPMiddleware: it raises "No
    response returned." (a 500 and a traceback) for an app that sends nothing."""
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import Response

    app = FastAPI()

    @app.middleware("http")
    async def passthrough(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        return response

    app.mount("/debug/pprof", create_app())
    for target in (b"/debug/pprof/goroutine?seconds=10", b"/debug/pprof/profile?seconds=10"):
        r = await asgi_call(app, "GET", target, disconnect_after=0.3)
        assert r.status == GONE, r.body
        assert r.seconds < 3
    r = await asgi_call(
        app, "POST", b"/debug/pprof/symbol", b"0x1+" * 1000, chunk=100, stall_body=True
    )
    assert r.status == GONE
    assert_no_tracebacks(caplog)


def raw_http(port: int, request: bytes, *, close_after: float | None = None) -> bytes:
    """Send ``request`` over a real socket; return what came back (b"" if nothing)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(request)
        if close_after is not None:
            time.sleep(close_after)
            return b""
        out = b""
        while True:
            try:
                data = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            out += data
        return out


def test_client_leaving_mid_post_over_real_http_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    with ServerThread(mounted(), log_config=None) as srv:
        req = (
            b"POST /debug/pprof/symbol HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
            + b"0x1+" * 100
        )
        raw_http(srv.port, req, close_after=0.2)
        time.sleep(0.3)
        # the server still answers
        out = raw_http(
            srv.port,
            b"GET /debug/pprof/symbol HTTP/1.1\r\nHost: x\r\n\r\n"[:-2]
            + b"Connection: close\r\n\r\n",
        )
        assert out.startswith(b"HTTP/1.1 200")
    assert_no_tracebacks(caplog)


# --- item 5: half-closed clients ------------------------------------------------------------


def half_closed_get(port: int, target: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            out += data
        return out


def test_half_closed_client_gets_its_profile_from_our_server() -> None:
    with start_server(port=0, max_seconds=5) as srv:
        t0 = time.monotonic()
        out = half_closed_get(srv.port, "/debug/pprof/profile?seconds=1")
        took = time.monotonic() - t0
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), out[:200]
        assert body[:2] == b"\x1f\x8b"
        assert builder.decode(body).sample_types
        assert 0.9 < took < 10
        out = half_closed_get(srv.port, "/debug/pprof/goroutine?seconds=1")
        assert out.startswith(b"HTTP/1.1 200"), out[:200]


def test_half_closed_client_under_plain_uvicorn_ends_the_capture_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """uvicorn closes the connection on the client's EOF (its ``eof_received`` returns
    None), so nothing can be sent; the app sees http.disconnect and must stop at once."""
    caplog.set_level(logging.INFO)
    with ServerThread(mounted(), log_config=None) as srv:
        t0 = time.monotonic()
        out = half_closed_get(srv.port, "/debug/pprof/profile?seconds=20")
        assert out == b""
        assert time.monotonic() - t0 < 5
        deadline = time.monotonic() + 5
        while concurrency.open_window_count() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert concurrency.open_window_count() == 0
    assert_no_tracebacks(caplog)


# --- item 3: a client that leaves cancels its work ----------------------------------------


@pytest.mark.anyio
async def test_disconnect_ends_every_window_and_starts_no_follow_up_work(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    encoded: list[int] = []
    real = builder.encode

    def spy(*a: Any, **k: Any) -> bytes:
        encoded.append(1)
        return real(*a, **k)

    monkeypatch.setattr(builder, "encode", spy)
    app = mounted(max_seconds=60)
    targets = [
        b"/debug/pprof/profile?seconds=30",
        b"/debug/pprof/trace?seconds=30",
        b"/debug/pprof/goroutine?seconds=30",
        b"/debug/pprof/threadcreate?seconds=30",
        b"/debug/pprof/heap?seconds=20",
    ]
    t0 = time.monotonic()
    async with anyio.create_task_group() as tg:
        results: list[Result] = []

        async def one(t: bytes) -> None:
            results.append(await asgi_call(app, "GET", t, disconnect_after=0.5))

        for t in targets:
            tg.start_soon(one, t)
    took = time.monotonic() - t0
    assert [r.status for r in results] == [GONE] * len(targets), [r.body for r in results]
    # 0.5 s plus one snapshot per delta, with room for a loaded machine; before the fix
    # each request ran its whole 20-30 s window.
    assert took < 5, took
    assert encoded == []
    assert concurrency.open_window_count() == 0
    assert limits.open_windows() == 0
    assert_no_tracebacks(caplog)


# --- item 4: limits --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_too_many_windows_get_429_at_once_and_slots_come_back() -> None:
    app = mounted(max_windows=2, max_seconds=60)
    async with anyio.create_task_group() as tg:
        held: list[Result] = []

        async def hold() -> None:
            held.append(
                await asgi_call(
                    app, "GET", b"/debug/pprof/goroutine?seconds=30", disconnect_after=1.0
                )
            )

        tg.start_soon(hold)
        tg.start_soon(hold)
        await anyio.sleep(0.4)
        assert limits.open_windows() == 2
        r = await asgi_call(app, "GET", b"/debug/pprof/profile?seconds=1")
        assert r.status == 429
        assert r.body == b"too many profiling windows open (limit 2); try again when one ends\n"
        assert r.headers["x-go-pprof"] == "1"
        assert r.seconds < 0.5
    assert limits.open_windows() == 0
    r = await asgi_call(app, "GET", b"/debug/pprof/goroutine?seconds=1")
    assert r.status == 200


@pytest.mark.anyio
async def test_costly_windows_have_lower_limits() -> None:
    app = mounted(max_seconds=600, max_trace_seconds=5)
    r = await asgi_call(app, "GET", b"/debug/pprof/trace?seconds=6")
    assert r.status == 400
    assert r.body == b"profile duration exceeds server's limit of 5 seconds\n"
    opts = Options(max_heap_window_seconds=10)
    limits.check_window("heap_window", 10, opts)
    with pytest.raises(ProfileError) as e:
        limits.check_window("heap_window", 11, opts)
    assert e.value.status == 400
    with pytest.raises(ProfileError) as e:
        limits.check_window("heap_window", 1, Options(heap_window=False))
    assert e.value.status == 403
    assert "start_tracing" in e.value.text
    assert limits.max_seconds("profile", Options()) == 600
    assert limits.max_seconds("trace", Options(max_seconds=3)) == 3
    with pytest.raises(ValueError, match="max_windows must be between"):
        create_app(max_windows=0)
    with pytest.raises(ValueError, match="heap_window must be True or False"):
        create_app(heap_window="no")
    with pytest.raises(ValueError, match="unknown window kind"):
        limits.max_seconds("nope", Options())


@pytest.mark.anyio
async def test_heap_window_mode_limits_over_http() -> None:
    """Window mode (tracemalloc off) has its own cap, and can be refused."""
    import tracemalloc

    if tracemalloc.is_tracing():
        pytest.skip("window mode only exists with tracemalloc off")
    app = mounted(max_seconds=600, max_heap_window_seconds=3)
    r = await asgi_call(app, "GET", b"/debug/pprof/heap?seconds=4")
    assert r.status == 400
    assert r.body == b"profile duration exceeds server's limit of 3 seconds\n"
    r = await asgi_call(app, "GET", b"/debug/pprof/goroutine?seconds=4", disconnect_after=0.1)
    assert r.status == GONE  # other deltas keep max_seconds (the client left after 0.1 s)
    app = mounted(heap_window=False)
    r = await asgi_call(app, "GET", b"/debug/pprof/heap?seconds=1")
    assert r.status == 403
    assert r.body == (limits.HEAP_WINDOW_REFUSED + "\n").encode()
    assert r.headers["x-go-pprof"] == "1"
    assert not tracemalloc.is_tracing()


# --- item 3: a window ends on time under a busy limiter --------------------------------------


@pytest.mark.anyio
async def test_profile_window_ends_on_time_under_busy_limiters() -> None:
    """A seconds=3 profile covers about 3 s even with our worker limiter and anyio's full.

    Before the fix the window's end waited for a worker thread (5.7-7.7 s measured under
    load). Margin: 2.9-3.6 s leaves room for a loaded 2-core machine; an end queued behind
    the 5 s jobs would make it about 4.8 s.
    """
    app = mounted(max_seconds=10)

    async def occupy_ours() -> None:
        await concurrency.run_in_thread(time.sleep, 5)

    async def occupy_anyio() -> None:
        await anyio.to_thread.run_sync(time.sleep, 5)

    async with anyio.create_task_group() as tg:
        for _ in range(4):  # our limiter's size: anything queued waits 5 s
            tg.start_soon(occupy_ours)
        for _ in range(41):  # anyio's default limiter has 40 tokens
            tg.start_soon(occupy_anyio)
        await anyio.sleep(0.2)
        t0 = time.monotonic()
        r = await asgi_call(app, "GET", b"/debug/pprof/profile?seconds=3")
        took = time.monotonic() - t0
    assert r.status == 200, r.body
    duration = builder.decode(r.body).duration_nanos / 1e9
    print(f"duration {duration:.2f} s, answered after {took:.2f} s")
    assert 2.9 <= duration <= 3.6, duration


# --- item 6: shutdown -------------------------------------------------------------------------


def test_start_server_stop_ends_open_windows_at_once() -> None:
    srv = start_server(port=0, max_seconds=60)
    results: dict[str, Any] = {}

    def get(name: str, path: str) -> None:
        try:
            r = httpx.get(srv.url + path, timeout=30)
            results[name] = (r.status_code, r.content)
        except httpx.HTTPError as e:
            results[name] = e

    threads = [
        threading.Thread(target=get, args=("profile", "profile?seconds=30")),
        threading.Thread(target=get, args=("goroutine", "goroutine?seconds=30")),
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while concurrency.open_window_count() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert concurrency.open_window_count() == 2
    time.sleep(0.7)
    t0 = time.monotonic()
    srv.stop()
    took = time.monotonic() - t0
    for t in threads:
        t.join(10)
    assert took < 5, took
    assert not srv.running
    status, body = results["profile"]
    assert status == 200
    d = builder.decode(body).duration_nanos / 1e9
    assert 0.6 < d < 5, d  # what was captured until the stop (0.7 s after both opened)
    assert results["goroutine"][0] == 200


class Uvicorn:
    """``python -m uvicorn tests.httpapp:app`` in a subprocess, its output in a file."""

    def __init__(self, tmp_path: Path, loop: str = "asyncio", app: str = "tests.httpapp:app"):
        self.port = free_port()
        self.log = tmp_path / f"uvicorn-{self.port}.log"
        self._out = self.log.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                app,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--loop",
                loop,
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(self.url + "/hello", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start: {self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")

    def state(self) -> dict[str, Any]:
        return dict(httpx.get(self.url + "/state", timeout=10).json())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()


@pytest.fixture
def uvicorn_proc(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Uvicorn]:
    loop = getattr(request, "param", "asyncio")
    server = Uvicorn(tmp_path, loop)
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize("uvicorn_proc", ["asyncio", "uvloop"], indirect=True)
def test_sigterm_during_30s_profile_and_trace_exits_within_seconds(uvicorn_proc: Uvicorn) -> None:
    """Before the fix uvicorn's graceful shutdown waited out both windows (34.5 s)."""
    srv = uvicorn_proc
    results: dict[str, Any] = {}

    def get(name: str, path: str) -> None:
        try:
            r = httpx.get(srv.url + "/debug/pprof/" + path, timeout=40)
            results[name] = (r.status_code, r.content)
        except httpx.HTTPError as e:
            results[name] = e

    threads = [
        threading.Thread(target=get, args=("profile", "profile?seconds=30")),
        threading.Thread(target=get, args=("trace", "trace?seconds=30")),
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 15
    while srv.state()["open_windows"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.7)  # both windows open for a moment
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    code = srv.proc.wait(20)
    took = time.monotonic() - t0
    for t in threads:
        t.join(10)
    out = srv.output()
    print(f"exit {code} after {took:.2f} s; trace: {results['trace']!r:.120}")
    assert took < 5, (took, out)
    assert "Traceback" not in out, out
    status, body = results["profile"]
    assert status == 200, body[:200]
    d = builder.decode(body).duration_nanos / 1e9
    assert 0.6 < d < 6, d  # what was captured until the signal (0.7 s after both opened)
    status, body = results["trace"]
    # what was captured, or Go's error shape; never a 30 s wait
    assert status == 200 or (status >= 400 and body.endswith(b"\n")), body[:200]
    if status == 200:
        assert json.loads(body)


def test_abandoned_captures_leave_nothing_on(uvicorn_proc: Uvicorn) -> None:
    """Item 3: captures abandoned after 0.5-2.6 s; within ~2 s everything is off again.

    100 captures in waves of 20 (the issue measured 200; 100 keeps the test ~15 s). RSS
    bound: 60 MB over the start (measured before the fix: 41 -> 218 MB).
    """
    srv = uvicorn_proc
    before = srv.state()
    rng = random.Random(8)
    paths = [
        "/debug/pprof/profile?seconds=30",
        "/debug/pprof/trace?seconds=30",
        "/debug/pprof/heap?seconds=5",
        "/debug/pprof/goroutine?seconds=5",
    ]

    def abandon(path: str, after: float) -> None:
        raw_http(
            srv.port,
            f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
            close_after=after,
        )

    started = time.monotonic()
    for _wave in range(5):
        threads = [
            threading.Thread(target=abandon, args=(paths[i % len(paths)], rng.uniform(0.5, 2.6)))
            for i in range(20)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert time.monotonic() - started < 40
    deadline = time.monotonic() + 2.0
    while True:
        st = srv.state()
        ok = (
            not st["tracemalloc"]
            and st["switch_interval"] == before["switch_interval"]
            and st["sigprof_default"]
            and st["itimer_prof"] == 0
            and st["gc_enabled"]
            and not st["busy_work_threads"]
        )
        if ok or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    print(before, st, sep="\n")
    assert not st["tracemalloc"], st
    assert st["switch_interval"] == before["switch_interval"], st
    assert st["sigprof_default"], st
    assert st["itimer_prof"] == 0, st
    assert st["gc_enabled"], st
    assert not st["busy_work_threads"], st
    assert st["rss_kb"] - before["rss_kb"] < 60_000, (before["rss_kb"], st["rss_kb"])
    assert srv.proc.poll() is None
    assert "Traceback" not in srv.output(), srv.output()


# --- item 5: the generated corpus --------------------------------------------------------------

NAMES = [
    "",
    "cmdline",
    "profile",
    "symbol",
    "trace",
    "goroutine",
    "threadcreate",
    "heap",
    "allocs",
    "block",
    "mutex",
    "nosuch",
    "HEAP",
    "heap/",
    "%2e%2e/%2e%2e/etc/passwd",
    "a%0ab",
    "%00",
    "%ff%fe",
    "%e2%98%83",
    "x" * 5000,
    "goroutine/../heap",
    "//heap",
    "heap%0a",
    "trace%0d%0a",
]
VALUES = [
    "",
    "0",
    "1",
    "-1",
    "+1",
    "2",
    "0x1",
    "1e309",
    "-1e309",
    "1e-400",
    "inf",
    "-inf",
    "nan",
    "0.001",
    "1.5",
    "1_0",
    "abc",
    "%00",
    "%0a",
    "%e2%98%83",
    "\u0661",
    HUGE,
    "-" + HUGE,
    HUGE_ZERO_PADDED,
    "9223372036854775808",
    "1" * 100_000,
]
PARAMS = ["seconds", "debug", "gc"]
METHODS = ["GET"] * 8 + ["HEAD", "HEAD", "POST", "POST", "PUT", "DELETE", "OPTIONS", "FOO"]
BODIES = [b"", b"0x1", b"\x00\xff" * 10, b"0x1+" * 300_000, b"+" * 5000, b"0x" + b"f" * 5000]


def corpus(n: int, seed: int) -> list[tuple[str, bytes, bytes, float | None]]:
    """Return ``n`` requests: (method, target, body, disconnect_after or None)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name = rng.choice(NAMES)
        query = "&".join(
            f"{rng.choice(PARAMS)}={rng.choice(VALUES)}" for _ in range(rng.choice([0, 1, 1, 2, 3]))
        )
        if name == "symbol" and rng.random() < 0.3:
            query = rng.choice(["0x1+0x2", HUGE, "+" * 1000, "0x" + "f" * 20, "%2B"])
        method = rng.choice(METHODS)
        body = rng.choice(BODIES) if method in ("POST", "PUT") else b""
        target = f"/debug/pprof/{name}" + (f"?{query}" if query else "")
        # Windows would last seconds: most clients leave at once, some after a moment.
        disconnect = rng.choice([0.0, 0.0, 0.01, 0.05, 0.2])
        out.append((method, target.encode("latin-1", "replace"), body, disconnect))
    return out


def is_window(target: bytes) -> bool:
    return b"profile" in target or b"trace" in target or b"seconds=" in target


@pytest.mark.anyio
async def test_generated_corpus_never_gets_5xx_or_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """1200 generated requests through the contract table's app (ASGI, raw targets)."""
    from tests.test_contract import parent_starlette

    caplog.set_level(logging.INFO)
    app = parent_starlette()
    reqs = corpus(1200, seed=5)
    statuses: dict[int | None, int] = {}
    bad: list[tuple[str, bytes, int | None, bytes]] = []
    sem = anyio.Semaphore(16)

    async def one(method: str, target: bytes, body: bytes, leave: float | None) -> None:
        async with sem:
            # Traces run one at a time (Go's own 500 "tracing is already enabled" for a
            # second one is the one 5xx Go has by design); the rest with a short window.
            r = await asgi_call(
                app, method, target, body, disconnect_after=leave if is_window(target) else None
            )
        statuses[r.status] = statuses.get(r.status, 0) + 1
        if r.status is not None and r.status >= 500:
            bad.append((method, target[:80], r.status, r.body[:200]))

    t0 = time.monotonic()
    traces = [q for q in reqs if b"/trace" in q[1]]
    rest = [q for q in reqs if b"/trace" not in q[1]]
    async with anyio.create_task_group() as tg:

        async def trace_lane() -> None:
            for q in traces:
                await one(*q)

        tg.start_soon(trace_lane)
        for q in rest:
            tg.start_soon(one, *q)
    print(f"{len(reqs)} requests in {time.monotonic() - t0:.1f} s: {statuses}")
    assert not bad, bad[:5]
    assert sum(statuses.values()) == len(reqs)
    assert statuses.get(200, 0) > 100  # the corpus reaches real answers, not just errors
    assert statuses.get(GONE, 0) > 30  # and clients that left
    assert_no_tracebacks(caplog)
    assert concurrency.open_window_count() == 0
    assert limits.open_windows() == 0


def test_generated_corpus_sample_over_real_http(caplog: pytest.LogCaptureFixture) -> None:
    """150 of the corpus over real sockets to uvicorn (in a thread, logging to caplog)."""
    from tests.test_contract import parent_starlette

    caplog.set_level(logging.INFO)
    reqs = corpus(150, seed=6)
    bad = []
    seen = 0
    with ServerThread(parent_starlette(), log_config=None) as srv:
        for method, target, body, leave in reqs:
            head = (
                f"{method} ".encode()
                + target.replace(b"\n", b"%0a")[:60_000]
                + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
            )
            if is_window(target):
                raw_http(srv.port, head + body, close_after=leave or 0.0)
                continue
            out = raw_http(srv.port, head + body)
            seen += 1
            status = int(out.split(b" ", 2)[1]) if out.startswith(b"HTTP/1.1 ") else None
            if status is None or status >= 500:
                bad.append((method, target[:80], out[:200]))
        time.sleep(0.3)  # windows of clients that left end
        deadline = time.monotonic() + 5
        while concurrency.open_window_count() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert seen > 50
    assert not bad, bad[:5]
    assert_no_tracebacks(caplog)


@pytest.mark.anyio
async def test_sigterm_handler_is_chained_and_ends_windows_early() -> None:
    """Our handler ends open windows (True: deliver what was captured) and then runs the
    handler it replaced; an ignored signal stays ignored."""
    seen: list[int] = []
    old_term = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    old_quit = signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    try:
        window = concurrency.RequestWindow()
        t0 = time.monotonic()
        async with anyio.create_task_group() as tg:
            result: list[bool] = []

            async def wait() -> None:
                result.append(await window.wait(30))

            tg.start_soon(wait)
            await anyio.sleep(0.2)
            assert signal.getsignal(signal.SIGTERM) is concurrency._on_shutdown_signal
            assert signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
        assert result == [True]
        assert time.monotonic() - t0 < 2
        assert seen == [signal.SIGTERM]
        # a window opened on this loop after the signal ends at once
        assert await concurrency.RequestWindow().wait(30) is True
        assert time.monotonic() - t0 < 2
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGQUIT, old_quit)
