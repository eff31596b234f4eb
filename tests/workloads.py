"""Workloads with distinctive function names, whose true CPU use is known."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from asgi_pprof import create_app


def distinct_stacks(n: int) -> list[Callable[[], list[bytes]]]:
    """Return ``n`` distinct functions (``spread_<i>``: one stack each), each allocating
    four sizes (10, 100, 1000 and 10000 bytes): a big memory profile table on demand."""
    out = []
    for i in range(n):
        ns: dict[str, Any] = {}
        exec(f"def spread_{i}():\n    return [bytes(s) for s in (10, 100, 1000, 10000)]", ns)
        out.append(ns[f"spread_{i}"])
    return out


def spin_cpu(seconds: float) -> None:
    """Burn exactly ``seconds`` of this thread's CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


# ~3 ms and ~1 ms, 3:1; 3.6 ms of CPU a cycle, deliberately not a multiple of the kernel's
# 4 ms tick, which CPU-time sampling (ours and Go's) reads in: a workload whose CPU period
# is a multiple of the tick is sampled at the same phase every time (aliasing).
def alpha_burst() -> None:
    spin_cpu(0.0027)


def beta_burst() -> None:
    spin_cpu(0.0009)


def short_bursts_forever(stop: threading.Event) -> None:
    """~3 ms in alpha_burst, ~1 ms in beta_burst, then a ~2 ms sleep, until stopped."""
    while not stop.is_set():
        alpha_burst()
        beta_burst()
        time.sleep(0.002)


def three_parts_worker(stop: threading.Event, out: dict[str, float]) -> None:
    t0 = time.thread_time()
    while not stop.is_set():
        spin_cpu(0.003)
        time.sleep(0.003)
    out["three_parts_worker"] = time.thread_time() - t0


def one_part_worker(stop: threading.Event, out: dict[str, float]) -> None:
    t0 = time.thread_time()
    while not stop.is_set():
        spin_cpu(0.001)
        time.sleep(0.005)
    out["one_part_worker"] = time.thread_time() - t0


def blocked_reader_thread(sock: object, stop: threading.Event) -> None:
    """Block in recv until data comes (it never does until the test ends)."""
    import socket

    assert isinstance(sock, socket.socket)
    sock.recv(1)


def route_cpu_work() -> None:
    spin_cpu(0.002)


async def cpu_heavy_route_handler(request: Request) -> PlainTextResponse:
    """An async route burning ~2 ms of CPU on the event loop per request."""
    route_cpu_work()
    return PlainTextResponse("ok")


app = Starlette(
    routes=[
        Route("/work", cpu_heavy_route_handler),
        Mount("/debug/pprof", app=create_app()),
    ]
)
