"""`python -m asgi_pprof run`: a program profiled over HTTP unmodified; start_server's ports."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from asgi_pprof import start_server
from asgi_pprof.run import Target, UsageError, parse, resolve
from tests.conftest import free_port
from tests.deploy_helpers import ROOT, running, traffic

RUN = [sys.executable, "-m", "asgi_pprof", "run"]

SCRIPT = """
import json, sys, time

def run_script_spin_target():
    return sum(i * i for i in range(20_000))

if __name__ == "__main__":
    with open(sys.argv[1], "w") as f:
        json.dump({"argv": sys.argv, "path0": sys.path[0]}, f)
    end = time.monotonic() + 120  # bounded: the test stops it long before
    while time.monotonic() < end:
        run_script_spin_target()
"""

APP = """
import time
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

def run_uvicorn_route_work():
    n, end = 0, time.process_time() + 0.05
    while time.process_time() < end:
        n += sum(range(200))
    return n

async def work(request):
    return PlainTextResponse(str(run_uvicorn_route_work()))

app = Starlette(routes=[Route("/work", work)])
"""


# --- the command line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["app.py", "--port", "9"], Target("script", "app.py", ["--port", "9"])),
        (
            ["--port", "7000", "uvicorn", "a:app"],
            Target("command", "uvicorn", ["a:app"], port=7000),
        ),
        (
            ["--host=0.0.0.0", "-m", "http.server", "-b", "x"],
            Target("module", "http.server", ["-b", "x"], host="0.0.0.0"),
        ),
        (["--", "--weird.py"], Target("script", "--weird.py", [])),
    ],
)
def test_parse(argv: list[str], expected: Target) -> None:
    assert parse(argv) == expected


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        ([], "no program"),
        (["--port"], "needs a value"),
        (["--port", "x", "a.py"], "port number"),
        (["-m"], "module name"),
        (["--nope", "a.py"], "unknown option"),
    ],
)
def test_parse_errors(argv: list[str], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        parse(argv)


def test_resolve_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        resolve(Target("command", "no-such-command-asgi-pprof"))
    with pytest.raises(UsageError, match="is not a Python program"):
        resolve(Target("command", "sh"))
    with pytest.raises(UsageError, match="no such file"):
        resolve(Target("script", str(tmp_path / "missing.py")))


def test_usage_error_exits_2_before_serving() -> None:
    port = free_port()
    proc = subprocess.run(
        [*RUN, "--port", str(port), "no-such-command-asgi-pprof"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 2
    assert "usage: python -m asgi_pprof run" in proc.stderr
    assert "serving" not in proc.stderr


def test_exit_status_and_main_module(tmp_path: Path) -> None:
    script = tmp_path / "exits.py"
    script.write_text("import sys\nprint(__name__, sys.argv[1:])\nsys.exit(7)\n")
    proc = subprocess.run(
        [*RUN, "--port", "0", str(script), "a", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "__main__ ['a', '--port', '1']\n"


# --- real programs, profiled over HTTP ------------------------------------------------------


@pytest.mark.slow
def test_run_plain_script_cpu_profile(tmp_path: Path, go_tool: Any) -> None:
    script = tmp_path / "spin.py"
    script.write_text(SCRIPT)
    out = tmp_path / "seen.json"
    port = free_port()
    url = f"http://127.0.0.1:{port}/debug/pprof/"
    with running([*RUN, "--port", str(port), str(script), str(out)], ROOT, url):
        cpu = go_tool("-top", url + "profile?seconds=2")
        assert "run_script_spin_target" in cpu
        cmdline = httpx.get(url + "cmdline").text.split("\x00")
        assert cmdline[-5:] == ["run", "--port", str(port), str(script), str(out)]
    seen = json.loads(out.read_text())
    assert seen["argv"] == [str(script), str(out)]
    assert seen["path0"] == str(tmp_path)  # as `python spin.py` sets it


@pytest.mark.slow
def test_run_uvicorn_console_script_cpu_profile(tmp_path: Path, go_tool: Any) -> None:
    (tmp_path / "app.py").write_text(APP)
    port, app_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}/debug/pprof/"
    args = [*RUN, "--port", str(port), "uvicorn", "app:app", "--port", str(app_port)]
    with running([*args, "--log-level", "warning"], tmp_path, url):
        app_url = f"http://127.0.0.1:{app_port}/work"
        up = False
        for _ in range(300):  # uvicorn starts after the pprof server (30 s for a loaded host)
            try:
                up = httpx.get(app_url, timeout=5).status_code == 200
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert up
        with traffic(app_url, 30):
            cpu = go_tool("-top", url + "profile?seconds=2")
        assert "run_uvicorn_route_work" in cpu


@pytest.mark.slow
def test_run_dash_m_module(tmp_path: Path) -> None:
    (tmp_path / "spinmod.py").write_text(
        SCRIPT.replace("run_script_spin_target", "run_module_spin_target")
    )
    out = tmp_path / "seen.json"
    port = free_port()
    url = f"http://127.0.0.1:{port}/debug/pprof/"
    with running([*RUN, "--port", str(port), "-m", "spinmod", str(out)], tmp_path, url):
        dump = httpx.get(url + "goroutine?debug=2", timeout=30).text
        assert "run_module_spin_target" in dump
    seen = json.loads(out.read_text())
    assert seen["argv"] == [str(tmp_path / "spinmod.py"), str(out)]


# --- start_server on a taken port ------------------------------------------------------------


def test_start_server_on_a_taken_port_logs_once_and_serves_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="asgi_pprof"):
            first = start_server(port=port)
            second = start_server(port=port)
        assert not first.running
        assert not second.running
        assert first.port == port
        first.stop()  # nothing to stop: no error
        warnings = [r for r in caplog.records if "is taken" in r.getMessage()]
        assert len(warnings) == 1
        with pytest.raises(OSError, match="could not serve"):
            start_server(port=port, if_port_taken="raise")
    with pytest.raises(ValueError, match="if_port_taken"):
        start_server(port=port, if_port_taken="ignore")  # type: ignore[arg-type]


def test_start_server_mount_none_serves_your_routes() -> None:
    from starlette.applications import Starlette
    from starlette.routing import Route

    from asgi_pprof.handlers import handler

    app = Starlette(routes=[Route("/ops/goroutine", handler("goroutine"))])
    with start_server(port=0, app=app, mount=None) as srv:
        assert srv.url == f"http://127.0.0.1:{srv.port}/"
        r = httpx.get(srv.url + "ops/goroutine?debug=1", timeout=10)
        assert r.text.startswith("goroutine profile")
    with start_server(port=0, mount="/ops/pprof/") as srv:
        assert srv.url.endswith("/ops/pprof/")
        assert "Types of profiles" in httpx.get(srv.url, timeout=10).text


def test_other_bind_errors_still_raise() -> None:
    with pytest.raises(OSError, match="could not serve"):
        start_server(host="192.0.2.1", port=free_port())  # TEST-NET: not this host's address


WORKER_APP = """
import json, os
from asgi_pprof import start_server

debug = start_server(port=PPROF_PORT)  # every worker runs this; one gets the port

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = json.dumps({"pid": os.getpid(), "serving": debug.running}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})
"""


SERVERS = {
    "uvicorn": ["-m", "uvicorn", "wapp:app", "--workers", "2", "--log-level", "warning", "--port"],
    "gunicorn": [
        "-m",
        "gunicorn",
        "-w",
        "2",
        "-k",
        "uvicorn.workers.UvicornWorker",
        "wapp:app",
        "-b",
    ],
}
SERVERS["gunicorn --preload"] = ["-m", "gunicorn", "--preload", *SERVERS["gunicorn"][2:]]


@pytest.mark.slow
@pytest.mark.parametrize("server", sorted(SERVERS))
def test_start_server_in_every_worker(server: str, tmp_path: Path) -> None:
    """uvicorn --workers 2 / gunicorn -w 2 -k UvicornWorker, start_server at import: one
    worker serves pprof, the other logs once and goes on serving the app (none fails)."""
    if server.startswith("gunicorn"):
        pytest.importorskip("gunicorn")
    pprof_port, app_port = free_port(), free_port()
    (tmp_path / "wapp.py").write_text(WORKER_APP.replace("PPROF_PORT", str(pprof_port)))
    bind = str(app_port) if server == "uvicorn" else f"127.0.0.1:{app_port}"  # --port / -b
    args = [sys.executable, *SERVERS[server], bind]
    url = f"http://127.0.0.1:{pprof_port}/debug/pprof/"
    with running(args, tmp_path, url) as proc:
        seen: dict[int, bool] = {}
        deadline = time.monotonic() + 60
        # Both workers import the app before serving; each new connection goes to one of
        # them (the kernel's choice): bounded by count and time.
        for _ in range(400):
            if len(seen) == 2 or time.monotonic() > deadline:
                break
            try:
                r = httpx.get(f"http://127.0.0.1:{app_port}/", timeout=5)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            seen[r.json()["pid"]] = r.json()["serving"]
        assert len(seen) == 2, f"only saw workers {seen}"
        if server.endswith("--preload"):
            # Imported once, in the master: the master serves pprof (for itself), the
            # forked workers have no server thread and call nothing (the README says so).
            assert list(seen.values()) == [False, False]
        else:
            assert sorted(seen.values()) == [False, True]
        assert httpx.get(url + "cmdline", timeout=10).status_code == 200
        proc.terminate()
        proc.wait(30)
        err = proc.stderr.read().decode() if proc.stderr else ""
    taken = [line for line in err.splitlines() if "is taken" in line]
    if server.endswith("--preload"):
        assert taken == [], err
        return
    assert len(taken) == 1, err
    idle_pid = next(pid for pid, serving in seen.items() if not serving)
    assert f"pid {idle_pid}" in taken[0]


def test_start_server_twice_on_one_port_in_one_process(caplog: pytest.LogCaptureFixture) -> None:
    with start_server(port=0) as srv:
        with caplog.at_level(logging.WARNING, logger="asgi_pprof"):
            again = start_server(port=srv.port)
        assert not again.running
        assert srv.running
        assert "this process already serves pprof there" in caplog.text


def test_allow_and_token_on_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from asgi_pprof.run import exposure_options

    assert parse(["--allow", "10.0.0.0/8", "--allow=::1", "x.py"]).allow == ["10.0.0.0/8", "::1"]
    monkeypatch.delenv("ASGI_PPROF_AUTH_TOKEN", raising=False)
    assert exposure_options([]) == {}
    monkeypatch.setenv("ASGI_PPROF_AUTH_TOKEN", "token-from-env")
    opts = exposure_options(["10.0.0.0/8"])
    assert opts == {
        "allow": ["127.0.0.0/8", "::1/128", "10.0.0.0/8"],
        "auth_token": "token-from-env",
    }
    with pytest.raises(ValueError, match="not an IP address"):
        exposure_options(["10.0.0.0/99"])


@pytest.mark.parametrize("runner", [["run", "--allow", "nope"], ["--allow", "nope"]])
def test_bad_allow_is_a_usage_error(runner: list[str], tmp_path: Path) -> None:
    script = tmp_path / "never.py"
    script.write_text("raise SystemExit('ran')\n")
    args = [sys.executable, "-m", "asgi_pprof", *runner]
    args += [str(script)] if runner[0] == "run" else ["--port", "0"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "not an IP address or CIDR network" in proc.stderr
