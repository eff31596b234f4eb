"""A small closed-loop HTTP load generator (loopback only, bounded by time and count).

Usage: python bench/loadgen.py URL SECONDS CONNECTIONS -> prints JSON
{"requests": N, "seconds": S, "p50_ms": .., "p99_ms": ..}.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from urllib.parse import urlsplit

MAX_REQUESTS = 2_000_000


def run(url: str, seconds: float, connections: int) -> dict[str, float]:
    """Return the counts and latency percentiles of hammering ``url`` for ``seconds``."""
    parts = urlsplit(url)
    assert parts.hostname in ("127.0.0.1", "localhost", "::1"), "loopback only"
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    latencies: list[list[float]] = [[] for _ in range(connections)]
    start = time.monotonic()
    end = start + seconds

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=10)
        lat = latencies[i]
        while time.monotonic() < end and len(lat) < MAX_REQUESTS:
            t0 = time.perf_counter()
            conn.request("GET", path)
            conn.getresponse().read()
            lat.append(time.perf_counter() - t0)
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    allv = sorted(v for lat in latencies for v in lat)
    n = len(allv)
    return {
        "requests": n,
        "seconds": elapsed,
        "p50_ms": allv[n // 2] * 1e3 if n else 0.0,
        "p99_ms": allv[min(n - 1, int(n * 0.99))] * 1e3 if n else 0.0,
    }


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]))))
