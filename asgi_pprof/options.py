"""The options of one pprof app, checked once when the app is made."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .exposure import LOOPBACK, check_allow

if TYPE_CHECKING:
    from .exposure import AllowRule
    from .profiles import NamedProfile

__all__ = ["Options"]


def _int_in(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


@dataclass(frozen=True)
class Options:
    """What ``create_app(**options)`` accepts. Every field is documented in the README."""

    sample_hz: int = 100
    """CPU profile sampling rate: one sample per 1/sample_hz s of a thread's CPU time."""

    max_seconds: int = 600
    """Longest window a ``seconds=N`` request may ask for (profile, trace, delta profiles)."""

    switch_interval: float | None = 0.0001
    """GIL switch interval (s) while a CPU profile runs (0.1 ms), so samples land where CPU burns.

    Lowered only while it buys accuracy: while a thread other than the main one (which
    takes its own ticks) runs, and no CPU-bound threads contend for the GIL (``sampler``).
    None leaves the interpreter's setting alone (cheaper for GIL-heavy threads, but
    bursts shorter than the interval are then charged to the line the thread blocked on).
    """

    track_task_creation: bool = False
    """Record where each asyncio task was created (a task factory on the loop)."""

    tracemalloc_frames: int = 0
    """Start tracemalloc with this many frames when ``create_app`` makes the app (a mounted
    app gets no lifespan events); 0 leaves it alone."""

    heap_window_frames: int = 16
    """Frames traced by ``heap?seconds=N`` when tracemalloc is off (window mode)."""

    trace_sample_hz: int = 250
    """Wall-clock stack sampling rate during ``/trace`` while a loop step runs long (50 Hz
    otherwise: each wake-up takes the GIL). The trace's CPU tracks come from the CPU
    sampler (``trace_cpu_hz``)."""

    trace_cpu_hz: int = 100
    """CPU ticks per second of a thread's CPU during ``/trace`` while no CPU profile runs
    (the trace's CPU tracks, and the loop's wall-clock samples while it burns CPU); a CPU
    profile running at the same time ticks both at ``sample_hz``. Each tick costs the
    ticked thread ~0.3 ms of CPU on a virtual machine, so this is most of the samplers'
    cost (50 saves 2-3 points of the trace's, but dilutes the loop's wall-clock samples:
    see the README); at most ``sample_hz``."""

    trace_max_events: int = 200_000
    """Most events one trace keeps (about 45 MB of JSON); past it the trace says it was cut."""

    max_windows: int = 8
    """Most timed windows (profile, trace, ``seconds=N``) open at once in the process; past
    it a request gets 429 at once. A scraper holds one; 8 leaves room for people."""

    max_trace_seconds: int = 30
    """Longest ``/trace`` window (the trace hooks every loop step: about +10 % CPU per request)."""

    max_heap_window_seconds: int = 30
    """Longest ``heap?seconds=N`` window in window mode (tracemalloc on process-wide)."""

    heap_window: bool = True
    """Allow ``heap?seconds=N`` to turn tracemalloc on for its window when it is off."""

    max_symbol_bytes: int = 1 << 20
    """Largest ``/symbol`` POST body (1 MiB: about 70 000 addresses); larger gets 413."""

    block_profile_rate: int | None = None
    """Block profile rate in ns (Go's ``SetBlockProfileRate``: 0 off, 1 every wait); None
    leaves the process's setting (``ASGI_PPROF_BLOCK_PROFILE_RATE``) alone."""

    mutex_profile_fraction: int | None = None
    """Mutex profile fraction (Go's ``SetMutexProfileFraction``: 0 off, 1 in n kept); None
    leaves the process's setting (``ASGI_PPROF_MUTEX_PROFILE_FRACTION``) alone."""

    loopstall_threshold: float | None = None
    """Switch the loopstall watchdog on with this threshold in seconds (a loop away from its
    selector longer is stalled; 20 ms is a good start), or off with 0; None leaves the
    process's setting (off unless ``ASGI_PPROF_LOOPSTALL_THRESHOLD``) alone."""

    memory_profile_rate: int | None = None
    """Sample about one allocation per this many bytes for heap/allocs (Go's
    ``runtime.MemProfileRate``; 0 off, 1 every allocation); None leaves the process's rate."""

    allow: Sequence[AllowRule] = LOOPBACK
    """Who may read profiles: CIDR strings and/or callables of the request returning True.
    Loopback only by default; the client address is ASGI's ``scope["client"]``."""

    auth_token: str | None = None
    """A token that lets any address in: ``Authorization: Bearer <token>``, or the password
    of Basic auth (any user name: ``http://pprof:<token>@host/...`` for go tool pprof)."""

    hide_cmdline_args: bool = False
    """Serve only the program's name at ``/cmdline``, not its arguments."""

    profiles: Sequence[NamedProfile] = field(default_factory=tuple)
    """Extra named profiles served beside the built-in ones (Go's ``pprof.NewProfile``)."""

    def __post_init__(self) -> None:
        _int_in("sample_hz", self.sample_hz, 1, 1000)
        _int_in("max_seconds", self.max_seconds, 1, 24 * 3600)
        if self.switch_interval is not None:
            si = self.switch_interval
            if isinstance(si, bool) or not isinstance(si, int | float):
                raise ValueError("switch_interval must be a number of seconds or None")
            if not (math.isfinite(si) and 1e-6 <= si <= 0.1):
                raise ValueError(f"switch_interval must be between 1e-06 and 0.1 seconds, got {si}")
        if not isinstance(self.track_task_creation, bool):
            raise ValueError("track_task_creation must be True or False")
        _int_in("tracemalloc_frames", self.tracemalloc_frames, 0, 1000)
        _int_in("heap_window_frames", self.heap_window_frames, 1, 1000)
        _int_in("trace_sample_hz", self.trace_sample_hz, 1, 10_000)
        _int_in("trace_cpu_hz", self.trace_cpu_hz, 1, 1000)
        _int_in("trace_max_events", self.trace_max_events, 1000, 100_000_000)
        if self.block_profile_rate is not None:
            _int_in("block_profile_rate", self.block_profile_rate, 0, 10**15)
        if self.mutex_profile_fraction is not None:
            _int_in("mutex_profile_fraction", self.mutex_profile_fraction, 0, 10**9)
        lst = self.loopstall_threshold
        if lst is not None and (
            isinstance(lst, bool)
            or not isinstance(lst, int | float)
            or not (lst == 0 or 0.001 <= lst <= 60)
        ):
            raise ValueError(f"loopstall_threshold must be 0 or 0.001 to 60 seconds, got {lst!r}")
        _int_in("max_windows", self.max_windows, 1, 10_000)
        _int_in("max_trace_seconds", self.max_trace_seconds, 1, 24 * 3600)
        _int_in("max_heap_window_seconds", self.max_heap_window_seconds, 1, 24 * 3600)
        if not isinstance(self.heap_window, bool):
            raise ValueError("heap_window must be True or False")
        _int_in("max_symbol_bytes", self.max_symbol_bytes, 1024, 1 << 30)
        if self.memory_profile_rate is not None:
            _int_in("memory_profile_rate", self.memory_profile_rate, 0, 1 << 62)
        check_allow(self.allow)
        if self.auth_token is not None and (
            not isinstance(self.auth_token, str) or len(self.auth_token) < 8
        ):
            raise ValueError("auth_token must be a string of at least 8 characters, or None")
        if not isinstance(self.hide_cmdline_args, bool):
            raise ValueError("hide_cmdline_args must be True or False")
        from .profiles import NamedProfile  # runtime import: profiles imports nothing of ours here

        names: set[str] = set()
        for p in self.profiles:
            if not isinstance(p, NamedProfile):
                raise ValueError("profiles must be NamedProfile instances")
            if not p.name or p.name in names:
                raise ValueError(f"profile name {p.name!r} is empty or used twice")
            names.add(p.name)
