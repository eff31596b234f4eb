"""Several workers: serving a merged goroutine dump and a merged CPU profile from 4 uvicorn
workers versus one worker's (a single-process server on the same app).

Times each request's wall time at the client, A and B alternated, and the CPU the whole
server (every worker) spent per request (/proc/<pid>/stat of the server and its children,
in clock ticks of 10 ms: CPU figures are coarse, compare medians over several rounds).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, ab_rounds, free_port, med

APP = """
import asyncio, os
from contextlib import asynccontextmanager
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from asgi_pprof import create_app

async def idle():
    await asyncio.sleep(3600)

@asynccontextmanager
async def lifespan(app):
    tasks = [asyncio.create_task(idle()) for _ in range(200)]  # 200 tasks per worker
    yield
    for t in tasks:
        t.cancel()

async def pid(request):
    return PlainTextResponse(str(os.getpid()))

routes = [Route("/pid", pid), Mount("/debug/pprof", app=create_app())]
app = Starlette(lifespan=lifespan, routes=routes)
"""


def cpu_seconds(pid: int) -> float:
    """Return the CPU seconds of ``pid`` and all its children (live ones)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(k) for k in kids]
    except OSError:
        pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return total


class Server:
    def __init__(self, workdir: Path, workers: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "uvicorn", "wapp:app", "--port", str(self.port)]
        args += ["--log-level", "warning"]
        if workers > 1:
            args += ["--workers", str(workers)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(args, cwd=workdir, env=env)
        self.workers = workers

    def wait(self) -> None:
        deadline = time.monotonic() + 120
        seen: set[str] = set()
        while time.monotonic() < deadline:
            try:
                seen.add(httpx.get(self.url + "/pid", timeout=5).text)
                r = httpx.get(self.url + "/debug/pprof/goroutine?debug=1", timeout=30)
                n = r.headers.get("x-asgi-pprof-workers", "1/1")
                if n == f"{self.workers}/{self.workers}":
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.workers} workers did not all register")

    def time(self, path: str) -> dict[str, float]:
        c0 = cpu_seconds(self.proc.pid)
        t0 = time.perf_counter()
        r = httpx.get(self.url + path, timeout=120)
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(self.proc.pid) - c0
        assert r.status_code == 200, r.text
        return {"wall_ms": wall * 1000, "cpu_ms": cpu * 1000}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def main() -> None:
    rounds = int(os.environ.get("BENCH_ROUNDS", "7"))
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "wapp.py").write_text(APP)
        one, four = Server(Path(d), 1), Server(Path(d), 4)
        try:
            one.wait()
            four.wait()
            for label, path in [
                ("goroutine (proto)", "/debug/pprof/goroutine"),
                ("goroutine?debug=2", "/debug/pprof/goroutine?debug=2"),
                ("profile?seconds=1", "/debug/pprof/profile?seconds=1"),
            ]:
                a, b = ab_rounds(rounds, lambda p=path: one.time(p), lambda p=path: four.time(p))
                print(f"{label}  ({rounds} rounds, alternated)")
                for key in ("wall_ms", "cpu_ms"):
                    va = [r[key] for r in a]
                    vb = [r[key] for r in b]
                    ma, mb = statistics.median(va), statistics.median(vb)
                    ratio = f"x{mb / ma:.2f}" if ma else "n/a (baseline under one clock tick)"
                    print(f"  {key:8s} 1 worker {med(va):26s} 4 workers {med(vb):26s} {ratio}")
        finally:
            one.stop()
            four.stop()


if __name__ == "__main__":
    main()
