"""What one request may cost: the longest window of each kind, and how many run at once.

Every timed window (``profile``, ``trace``, ``<name>?seconds=N``) takes a slot from one
process-wide pool for as long as it runs; a request past the pool's size gets Go's error
shape with 429 at once instead of queueing. The costliest windows have their own, lower
maximum length: the trace hooks every loop step, and heap's window mode turns tracemalloc
on for the whole process (measured: a ``/hello`` route fell from 1 743 to 49 req/s while
one ran). ``heap_window=False`` refuses window mode altogether.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .profiles import ProfileError

if TYPE_CHECKING:
    from .options import Options

__all__ = ["KINDS", "check_window", "max_seconds", "open_windows", "window_slot"]

KINDS = frozenset({"profile", "trace", "delta", "heap_window"})
"""The kinds of window: CPU profile, trace, a delta profile, heap's window mode."""

HEAP_WINDOW_REFUSED = (
    "heap window mode is turned off on this server (heap_window=False): "
    "start tracing with asgi_pprof.start_tracing() to use heap?seconds=N"
)

_lock = threading.Lock()
_open: dict[str, int] = {}


def max_seconds(kind: str, options: Options) -> int:
    """Return the longest window of ``kind`` that ``options`` allow."""
    if kind not in KINDS:
        raise ValueError(f"unknown window kind {kind!r}; the kinds are: {', '.join(sorted(KINDS))}")
    if kind == "trace":
        return min(options.max_seconds, options.max_trace_seconds)
    if kind == "heap_window":
        return min(options.max_seconds, options.max_heap_window_seconds)
    return options.max_seconds


def check_window(kind: str, seconds: float, options: Options) -> None:
    """Raise :class:`ProfileError` when a ``kind`` window of ``seconds`` is not allowed.

    400 with Go's text when it is longer than the limit (Go's ``WriteTimeout`` check),
    403 for heap's window mode when ``heap_window=False``.
    """
    if kind == "heap_window" and not options.heap_window:
        raise ProfileError(403, HEAP_WINDOW_REFUSED)
    limit = max_seconds(kind, options)
    if seconds > limit:
        raise ProfileError(400, f"profile duration exceeds server's limit of {limit} seconds")


def open_windows() -> int:
    """Return the number of windows open in this process now."""
    with _lock:
        return sum(_open.values())


@contextlib.contextmanager
def window_slot(kind: str, options: Options) -> Iterator[None]:
    """Hold one of the process's ``max_windows`` window slots while the block runs.

    Raises :class:`ProfileError` 429 (Go's error shape; a 4xx: the server is fine, the
    client asked for more than it allows at once) when all slots are taken. A plain
    (not async) context manager: taking and giving back a slot never waits, so it can
    neither be cancelled half-way nor leak a slot.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown window kind {kind!r}; the kinds are: {', '.join(sorted(KINDS))}")
    with _lock:
        total = sum(_open.values())
        if total >= options.max_windows:
            raise ProfileError(
                429,
                f"too many profiling windows open (limit {options.max_windows}); "
                "try again when one ends",
            )
        _open[kind] = _open.get(kind, 0) + 1
    try:
        yield
    finally:
        with _lock:
            _open[kind] -= 1
