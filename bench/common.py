"""Shared benchmark plumbing: a reference server process, A/B rounds, medians with spread."""

from __future__ import annotations

import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RefServer:
    """An app (bench/refapp.py by default) under uvicorn in its own process (its loop on its
    main thread); ready once ``ready`` answers."""

    def __init__(
        self,
        env: dict[str, str] | None = None,
        app: str = "bench.refapp:app",
        ready: str = "/hello",
    ) -> None:
        self.app = app
        self.ready = ready
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RefServer:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                self.app,
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            cwd=ROOT,
            env=self.env,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(self.url + self.ready, timeout=1)
                return self
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(10)

    def cpu_seconds(self) -> float:
        """Return the server process's CPU time so far (user + system)."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(url: str, seconds: float, connections: int = 4) -> dict[str, float]:
    """Return the load generator's result for one bounded run against ``url``."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "loadgen.py"), url, str(seconds), str(connections)],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    )
    return dict(json.loads(out.stdout))


def measure(server: RefServer, path: str, seconds: float) -> dict[str, float]:
    """Return rps, p99 and server CPU ms per request for one round."""
    c0 = server.cpu_seconds()
    r = load(server.url + path, seconds)
    cpu = server.cpu_seconds() - c0
    return {
        "rps": r["requests"] / r["seconds"],
        "p99_ms": r["p99_ms"],
        "cpu_ms_per_req": cpu * 1e3 / max(1, r["requests"]),
    }


def during(fn: Callable[[], Any]) -> AbstractContextManager[None]:
    """Return a context that runs ``fn`` in a thread for its duration (joined on exit)."""
    from contextlib import contextmanager

    @contextmanager
    def ctx() -> Any:
        t = threading.Thread(target=fn)
        t.start()
        time.sleep(0.2)
        try:
            yield
        finally:
            t.join()

    return ctx()


def compare_to_base(
    servers: dict[str, RefServer], base: str, paths: tuple[str, ...], rounds: int, seconds: float
) -> None:
    """Print, per path, every server against ``servers[base]``: A/B-alternated rounds."""
    for path in paths:
        for s in servers.values():
            measure(s, path, 0.5)  # warm up
        for name, srv in servers.items():
            if name == base:
                continue
            a, b = ab_rounds(
                rounds,
                lambda path=path: measure(servers[base], path, seconds),
                lambda path=path, srv=srv: measure(srv, path, seconds),
            )
            print(f" route {path}: {base} vs {name}")
            report(name, a, b)


def ab_rounds(
    rounds: int,
    a: Callable[[], dict[str, float]],
    b: Callable[[], dict[str, float]],
) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """Return the results of A and B alternated (A B B A A B ...) ``rounds`` times each."""
    ra: list[dict[str, float]] = []
    rb: list[dict[str, float]] = []
    for i in range(rounds):
        if i % 2 == 0:
            ra.append(a())
            rb.append(b())
        else:
            rb.append(b())
            ra.append(a())
    return ra, rb


def med(values: list[float]) -> str:
    """Return 'median (min..max)' of values."""
    return f"{statistics.median(values):.3g} ({min(values):.3g}..{max(values):.3g})"


def quartiles(values: list[float]) -> tuple[float, float]:
    """Return the first and third quartiles of values (the 25th and 75th of them, sorted)."""
    xs = sorted(values)
    return xs[len(xs) // 4], xs[(3 * len(xs)) // 4]


def median_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Return a distribution-free confidence interval of the median of values.

    The order statistics at ranks j and n + 1 - j (1-based), where j is the largest rank
    with P(Binomial(n, 1/2) < j) <= (1 - confidence) / 2: whatever the spread's shape, the
    true median lies between them with at least that confidence (the sign test's interval).
    Fewer than 6 values give (min, max).
    """
    xs = sorted(values)
    n = len(xs)
    tail = (1 - confidence) / 2
    j, below = 0, 0.0
    while j < n // 2:
        below += math.comb(n, j) / 2**n  # P(Binomial < j + 1)
        if below > tail:
            break
        j += 1
    j = max(j, 1)
    return xs[j - 1], xs[n - j]


def report(name: str, base: list[dict[str, float]], other: list[dict[str, float]]) -> None:
    """Print medians with spread for both sides and the ratios of the medians."""
    for key in ("rps", "p99_ms", "cpu_ms_per_req"):
        a = [r[key] for r in base]
        b = [r[key] for r in other]
        ratio = statistics.median(b) / statistics.median(a)
        print(f"  {key:15s} baseline {med(a):28s} {name} {med(b):28s} ratio {ratio:.3f}")


class LagMonitor:
    """Measures how late a timer (1 ms by default) fires on the loop: the loop's worst stall.

    Use ``with LagMonitor() as lag:`` inside a coroutine; ``lag.worst`` is in seconds.
    """

    def __init__(self, period: float = 0.001) -> None:
        self.period = period
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(self.period)
            self.worst = max(self.worst, time.perf_counter() - t - self.period)

    def __enter__(self) -> LagMonitor:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
