"""Go's `go func() { log.Println(http.ListenAndServe("localhost:6060", nil)) }()`:
any program, web service or not, with pprof on its own port.

Run: python debug_port.py
Then: go tool pprof -top 'http://127.0.0.1:6060/debug/pprof/profile?seconds=5'
"""

import time

from asgi_pprof import start_server


def debug_port_crunch() -> int:
    return sum(i * i for i in range(20_000))


def main() -> None:
    start_server(port=6060)  # http://127.0.0.1:6060/debug/pprof/, in a daemon thread
    end = time.monotonic() + 120
    while time.monotonic() < end:  # the program's own work
        debug_port_crunch()


if __name__ == "__main__":
    main()
