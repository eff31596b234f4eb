"""loopstall's always-on cost: the heartbeat timer on the loop plus the watchdog thread.

Two servers (uvicorn subprocesses, the loop on the main thread), the same app: one with
the loop watched from startup at the default 20 ms threshold, one with the watchdog off
(threshold 0). Under load: requests/s, p99 and server CPU per request, rounds
alternated (A B B A ...), medians with (min..max). Idle: the CPU each server burns in
10 s with no requests (the heartbeat wakes an idle loop 100 times a second). Target:
within noise, under 0.5 %.

Standalone: ``python bench/bench_loopstall.py`` (``make bench`` runs it).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_contention import Server
from bench.common import ab_rounds, med, report

ROUNDS = 7
LOAD_S = 4.0
IDLE_S = 10.0


def idle_cpu(server: Server) -> dict[str, float]:
    c0 = server.cpu_seconds()
    time.sleep(IDLE_S)
    return {"idle_cpu_ms_per_s": (server.cpu_seconds() - c0) * 1e3 / IDLE_S}


def main() -> int:
    off_env = {"ASGI_PPROF_LOOPSTALL_THRESHOLD": "0"}
    on_env = {"ASGI_PPROF_LOOPSTALL_THRESHOLD": "0.02", "BENCH_WATCH_LOOP": "1"}
    with Server(off_env) as off, Server(on_env) as on:
        print(f"/items under load, {ROUNDS} x {LOAD_S:.0f} s alternated", flush=True)
        base, other = ab_rounds(
            ROUNDS,
            lambda: off.measure("/items", LOAD_S),
            lambda: on.measure("/items", LOAD_S),
        )
        report("loopstall on", base, other)
        print(f"idle, 2 x {IDLE_S:.0f} s each, alternated", flush=True)
        a, b = ab_rounds(2, lambda: idle_cpu(off), lambda: idle_cpu(on))
        ia = [r["idle_cpu_ms_per_s"] for r in a]
        ib = [r["idle_cpu_ms_per_s"] for r in b]
        print(
            f"  idle CPU ms per s  off {med(ia)}  on {med(ib)}  "
            f"difference {statistics.median(ib) - statistics.median(ia):.2f} ms/s "
            f"({(statistics.median(ib) - statistics.median(ia)) / 10:.2f} % of a core)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
