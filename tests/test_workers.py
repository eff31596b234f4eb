"""Several workers behind one port: real uvicorn --workers 2 and gunicorn -w 2 -k UvicornWorker.

A request to the shared port reaches one worker; its answer merges every sibling's (proto:
samples labelled ``pid``; text: one section per worker); ``?worker=<pid>`` asks one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from asgi_pprof import builder, memprofile
from asgi_pprof.model import ProfileData
from tests.conftest import free_port
from tests.deploy_helpers import running

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

APP = """
import asyncio, os, threading, time
from contextlib import asynccontextmanager
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from asgi_pprof import create_app


def workers_app_spin():
    while True:  # about a third of a core per worker: every CPU profile sees it
        end = time.process_time() + 0.01
        while time.process_time() < end:
            sum(range(300))
        time.sleep(0.02)



async def workers_app_idle():
    await asyncio.sleep(3600)


@asynccontextmanager
async def lifespan(app):
    # In the worker (with --preload the import ran in the master, whose threads the fork drops).
    threading.Thread(target=workers_app_spin, name="spin", daemon=True).start()
    tasks = [
        asyncio.create_task(workers_app_idle(), name=f"idle-{os.getpid()}-{i}") for i in range(3)
    ]
    yield
    for t in tasks:
        t.cancel()


async def pid(request):
    return PlainTextResponse(str(os.getpid()))


app = Starlette(
    lifespan=lifespan,
    routes=[
        Route("/pid", pid),
        # Nobody by address, only the token: siblings' requests must not need it.
        Mount(
            "/debug/pprof",
            app=create_app(allow=[], auth_token="worker-test-token", memory_profile_rate=65536),
        ),
    ],
)
"""

SERVERS = {
    "uvicorn": ["-m", "uvicorn", "wapp:app", "--workers", "2", "--log-level", "warning", "--port"],
    "gunicorn": ["-m", "gunicorn", "-w", "2", "-k", "uvicorn.workers.UvicornWorker", "wapp:app"],
}
# --preload: the app (and its pprof app) is made once in the master, before the fork.
SERVERS["gunicorn --preload"] = ["-m", "gunicorn", "--preload", *SERVERS["gunicorn"][2:]]
# Workers restarting all the time: new ones join, the ones gone are forgotten.
SERVERS["gunicorn --max-requests"] = [*SERVERS["gunicorn"], "--max-requests", "15"]


AUTH = {"authorization": "Bearer worker-test-token"}


def group_root() -> Path:
    return Path(tempfile.gettempdir()) / f"asgi_pprof-{os.getuid()}"


SESSION_START = time.time() - 1.0
"""Socket files older than this test session are other runs' (a worker killed by its
server cannot remove its own); their pids may name a process of ours now (pids wrap)."""


def sockets_of(pids: set[int]) -> set[int]:
    """Return which of ``pids`` have a sibling socket file made in this session."""
    out: set[int] = set()
    for p in group_root().glob("*/*.sock"):
        with contextlib.suppress(FileNotFoundError):  # a sibling pruned it meanwhile
            if int(p.stem) in pids and p.lstat().st_mtime >= SESSION_START:
                out.add(int(p.stem))
    return out


@contextmanager
def server(kind: str, tmp_path: Path) -> Iterator[tuple[str, set[int]]]:
    """Start ``kind`` with two workers; yield its base URL and its two worker pids."""
    if kind.startswith("gunicorn"):
        pytest.importorskip("gunicorn")
    (tmp_path / "wapp.py").write_text(APP)
    port = free_port()
    bind = [str(port)] if kind == "uvicorn" else ["-b", f"127.0.0.1:{port}"]
    base = f"http://127.0.0.1:{port}"
    with running([sys.executable, *SERVERS[kind], *bind], tmp_path, base + "/pid"):
        pids: set[int] = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # both registered (each imports the app itself)
            pids = {int(httpx.get(base + "/pid", timeout=5).text) for _ in range(10)} | pids
            if len(pids) == 2 and sockets_of(pids) == pids:
                break
            time.sleep(0.1)
        assert len(pids) == 2, pids
        assert sockets_of(pids) == pids
        yield base, pids


def pids_with(data: ProfileData, function: str) -> set[int]:
    """Return the ``pid`` labels of the samples whose stack holds ``function``."""
    out = set()
    for s in data.samples:
        if any(f.function.endswith(function) for f in s.stack):
            out |= {int(v) for k, v in s.labels if k == "pid"}
    return out


@pytest.mark.parametrize("kind", sorted(SERVERS))
def test_goroutine_and_cpu_cover_every_worker(kind: str, tmp_path: Path) -> None:
    with server(kind, tmp_path) as (base, pids):
        url = base + "/debug/pprof/"
        text = httpx.get(url + "goroutine?debug=2", headers=AUTH, timeout=30)
        assert text.headers["x-asgi-pprof-workers"] == "2/2"
        for pid in pids:
            assert f"# worker pid {pid}\n" in text.text
            assert f"idle-{pid}-2" in text.text  # each worker's own tasks
        proto = httpx.get(url + "goroutine", headers=AUTH, timeout=30)
        assert pids_with(builder.decode(proto.content), "workers_app_idle") == pids
        if memprofile.available():  # the sampled heap's text comes in pieces: merged as is
            heap = httpx.get(url + "heap?debug=1", headers=AUTH, timeout=30)
            assert heap.headers["x-asgi-pprof-workers"] == "2/2"
            assert heap.text.count("heap profile: ") == 2
            assert all(f"# worker pid {pid}\n" in heap.text for pid in pids)
            assert int(heap.headers["content-length"]) == len(heap.content)
        cpu = httpx.get(url + "profile?seconds=2", headers=AUTH, timeout=60)
        assert cpu.headers["x-asgi-pprof-workers"] == "2/2"
        data = builder.decode(cpu.content)
        assert pids_with(data, "workers_app_spin") == pids
        assert 1.5e9 < data.duration_nanos < 10e9

        one = min(pids)
        single = httpx.get(url + f"goroutine?worker={one}", headers=AUTH, timeout=30)
        assert pids_with(builder.decode(single.content), "workers_app_idle") == set()
        assert "x-asgi-pprof-workers" not in single.headers
        assert (
            f"idle-{one}-0"
            in httpx.get(url + f"goroutine?debug=2&worker={one}", headers=AUTH, timeout=30).text
        )
        other = (pids - {one}).pop()
        assert (
            f"idle-{other}-0"
            not in httpx.get(url + f"goroutine?debug=2&worker={one}", headers=AUTH, timeout=30).text
        )
        missing = httpx.get(url + "goroutine?worker=1", headers=AUTH, timeout=30)
        assert missing.status_code == 404
        assert missing.headers["x-go-pprof"] == "1"
        if kind.endswith("--max-requests"):
            restarted_pids_are_merged(base, pids)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def restarted_pids_are_merged(base: str, first: set[int]) -> None:
    """After --max-requests replaced the workers: the new ones are merged, the old forgotten."""
    for _ in range(40):  # 15 requests per worker: both restart at least once
        # A worker past its --max-requests may close a connection mid-request (seen once
        # on 3.13: connection reset): these requests only drive the restarts.
        with contextlib.suppress(httpx.TransportError):
            httpx.get(base + "/pid", timeout=10)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = httpx.get(base + "/debug/pprof/goroutine?debug=1", headers=AUTH, timeout=30)
        shown = {
            int(line.split()[-1]) for line in r.text.splitlines() if line.startswith("# worker pid")
        }
        if shown and not shown & first and r.headers.get("x-asgi-pprof-workers") == "2/2":
            break
        time.sleep(0.2)
    assert not shown & first, (shown, first)  # replaced workers are not asked
    assert r.headers["x-asgi-pprof-workers"] == "2/2"
    assert all(alive(pid) for pid in shown)


def test_a_worker_that_does_not_answer_is_left_out_and_a_killed_one_forgotten(
    tmp_path: Path,
) -> None:
    with server("uvicorn", tmp_path) as (base, pids):
        url = base + "/debug/pprof/goroutine?debug=1"
        stopped = min(pids)
        os.kill(stopped, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            r = httpx.get(url, headers=AUTH, timeout=30)  # only the other worker accepts
            took = time.monotonic() - t0
        finally:
            # uvicorn's supervisor may have killed it already (its health check timed out).
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)
        assert r.headers["x-asgi-pprof-workers"] == "1/2"
        assert f"# worker {stopped} did not answer in 5 s" in r.text
        assert took < 20  # the 5 s grace, with room for a loaded machine
        # uvicorn's supervisor may have killed it already (its health check got no answer).
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = httpx.get(url, headers=AUTH, timeout=30)
            if f"pid {stopped}" not in r.text and stopped not in sockets_of({stopped}):
                break
            time.sleep(0.2)
        assert f"pid {stopped}" not in r.text
        assert stopped not in sockets_of({stopped})  # its stale socket file is removed


def test_single_process_servers_stay_separate_and_register_nothing(tmp_path: Path) -> None:
    (tmp_path / "wapp.py").write_text(APP)
    ports = [free_port(), free_port()]
    args = [sys.executable, "-m", "uvicorn", "wapp:app", "--log-level", "warning", "--port"]
    with (
        running([*args, str(ports[0])], tmp_path, f"http://127.0.0.1:{ports[0]}/pid"),
        running([*args, str(ports[1])], tmp_path, f"http://127.0.0.1:{ports[1]}/pid"),
    ):
        for port in ports:
            base = f"http://127.0.0.1:{port}"
            pid = int(httpx.get(base + "/pid").text)
            r = httpx.get(base + "/debug/pprof/goroutine?debug=2", headers=AUTH, timeout=30)
            assert "x-asgi-pprof-workers" not in r.headers
            assert f"idle-{pid}-0" in r.text
            assert "# worker pid" not in r.text
            assert sockets_of({pid}) == set()


def test_groups_of_dead_servers_are_pruned(tmp_path: Path) -> None:
    """A killed worker leaves its socket file; its group goes once its server is gone."""
    import subprocess

    from asgi_pprof import workers

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f"{gone.pid}-123"
    live = tmp_path / f"{os.getpid()}-456"
    other = tmp_path / "not-a-group"
    for d in (dead, live, other):
        d.mkdir()
        (d / "77.sock").touch()
    workers._prune_dead_groups(tmp_path)
    assert not dead.exists()
    assert (live / "77.sock").exists()
    assert (other / "77.sock").exists()
