"""Per-thread CPU ticks (Linux): a signal each time a thread has burned one more period.

Two sources, the first that works:

* **perf task-clock** (``perf_event_open``, ``PERF_COUNT_SW_TASK_CLOCK`` on one thread).
  Its overflow is timed by a high-resolution timer on the thread's exact CPU time, so a
  tick lands at a uniformly random point of the thread's running time whatever else the
  machine does. The tick is a signal (``F_SETSIG``) sent to one thread
  (``F_SETOWN_EX``), with the event's fd in ``si_fd``.
* **POSIX CPU timers** (``timer_create`` on the thread's CPU clock, ``SIGEV_THREAD_ID``),
  what Go uses. The kernel checks them only at its scheduler tick, on the thread that is
  running then. That is unbiased while the thread has a core to itself, but when the
  machine is oversubscribed the scheduler hands the core over at those same ticks, and
  the timer sees the thread at the same few moments of its bursts. Measured on a 2-core
  machine with two busy processes beside a loop doing 3 ms alpha, 1 ms beta, 2 ms sleep:
  timers gave alpha:beta = 15-33:1, task-clock 3.0-3.3:1.

perf is missing where ``kernel.perf_event_paranoid`` is 3 (Debian's default) or a
seccomp filter refuses the call (Docker's default profile); the timers are used there.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import random
import signal
import struct
import sys
import threading

__all__ = ["TICK_SIGNALS", "Libc", "Ticker", "get_libc", "open_ticker", "source", "tick_key"]

TIMER_SIGNAL = signal.SIGPROF
"""What POSIX timers send, and what a perf event on the main thread sends it."""

PERF_SIGNAL: int | None = signal.SIGRTMAX - 2 if sys.platform.startswith("linux") else None
"""What perf events of other threads send the sampler thread: a real-time signal, so
ticks of several threads queue instead of merging (a POSIX timer queues its own, so
SIGPROF suffices there). The sampler thread blocks it; it is never sent to another thread."""

TICK_SIGNALS = tuple(s for s in (TIMER_SIGNAL, PERF_SIGNAL, signal.SIGIO) if s is not None)
"""What the sampler thread blocks and reads. SIGIO: where a real-time signal cannot be
queued (``RLIMIT_SIGPENDING`` reached), the kernel sends a plain SIGIO instead, whose
default action ends the process; read, it is a lost tick."""

_SIGEV_THREAD_ID = 4
_SI_TIMER = -2
_FD_KEY = 1 << 40
"""perf ticks are keyed ``_FD_KEY | fd``; timer keys (our own counter) stay below it."""


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _Sigevent(ctypes.Structure):
    # glibc layout: sigval (8 bytes), signo, notify, then a 48-byte union whose first
    # int is the target thread id for SIGEV_THREAD_ID.
    _fields_ = [
        ("sigev_value", ctypes.c_void_p),
        ("sigev_signo", ctypes.c_int),
        ("sigev_notify", ctypes.c_int),
        ("sigev_tid", ctypes.c_int),
        ("_pad", ctypes.c_int * 11),
    ]


def _thread_cpu_clock(tid: int) -> int:
    """Return the Linux clock id of a thread's CPU clock (user + system time) from its tid.

    The kernel encodes it as ``(~tid) << 3 | CPUCLOCK_PERTHREAD | CPUCLOCK_PROF``, the
    clock ``ITIMER_PROF`` uses. (Measured: a timer on ``CPUCLOCK_SCHED``, the precise
    clock, gave a 3:1 workload as 1.7:1.) Built from the tid, not
    ``pthread_getcpuclockid``, which would read a possibly freed ``pthread_t`` of a thread
    that has just exited.
    """
    return ((~tid) << 3) | 4


class Libc:
    """The libc calls the tick sources and the sampler's signalfd need."""

    def __init__(self) -> None:
        # The running process's own symbols first: dlopen(NULL) is instant, while
        # find_library runs ldconfig (tens of ms, on the event loop's thread).
        base = ctypes.CDLL(None, use_errno=True)
        libc = base
        if not hasattr(libc, "timer_create"):  # glibc < 2.34 keeps timers in librt
            libc = ctypes.CDLL(ctypes.util.find_library("rt") or "librt.so.1", use_errno=True)
        self.timer_create = libc.timer_create
        self.timer_create.argtypes = [
            ctypes.c_int,
            ctypes.POINTER(_Sigevent),
            ctypes.POINTER(ctypes.c_void_p),
        ]
        self.timer_settime = libc.timer_settime
        self.timer_settime.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.POINTER(_Itimerspec),
            ctypes.c_void_p,
        ]
        self.timer_delete = libc.timer_delete
        self.timer_delete.argtypes = [ctypes.c_void_p]
        self.signalfd = base.signalfd
        self.signalfd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        self.sigemptyset = base.sigemptyset
        self.sigaddset = base.sigaddset
        self.syscall = base.syscall
        self.syscall.restype = ctypes.c_long


_libc: Libc | bool | None = False


def get_libc() -> Libc | None:
    """Return the libc glue, or None off Linux or where the timer calls are missing."""
    global _libc
    if _libc is False:
        try:
            _libc = Libc() if sys.platform.startswith("linux") else None
        except (OSError, AttributeError):
            _libc = None
    return _libc if isinstance(_libc, Libc) else None


# --- perf task-clock ---------------------------------------------------------------------

_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "riscv64": 241, "ppc64le": 319}
_PERF_TYPE_SOFTWARE = 1
_PERF_COUNT_SW_TASK_CLOCK = 1
_PERF_FLAG_FD_CLOEXEC = 8
_ATTR_DISABLED = 1 << 0
_ATTR_EXCLUDE_KERNEL = 1 << 5
_ATTR_EXCLUDE_HV = 1 << 6
_IOC_ENABLE = 0x2400
_IOC_DISABLE = 0x2401
_IOC_PERIOD = 0x40082404  # _IOW('$', 4, __u64)
_F_SETSIG = 10
_F_SETOWN_EX = 15
_F_OWNER_TID = 0

_perf_flags: int | None = None
"""The attr flags the kernel accepted (kernel time counted if allowed), or None before
the first try; -1 once perf is known to be unavailable."""

_open_fds: set[int] = set()
"""Every perf fd open now: a forked child closes its copies (they count the parent's threads)."""
_fds_lock = threading.Lock()


def _perf_open(tid: int, period_ns: int, flags: int) -> int:
    libc = get_libc()
    nr = _PERF_EVENT_OPEN.get(os.uname().machine)
    if libc is None or nr is None:
        return -1
    # struct perf_event_attr, PERF_ATTR_SIZE_VER0 (64 bytes): type, size, config,
    # sample_period, sample_type, read_format, the flag bits, wakeup_events, bp_type,
    # config1. Not sampling into a ring buffer: the overflow signal is the sample.
    attr = struct.pack(
        "IIQQQQQIIQ",
        _PERF_TYPE_SOFTWARE,
        64,
        _PERF_COUNT_SW_TASK_CLOCK,
        period_ns,
        0,
        0,
        flags,
        0,
        0,
        0,
    )
    buf = ctypes.create_string_buffer(attr, 64)
    return int(libc.syscall(nr, buf, tid, -1, -1, _PERF_FLAG_FD_CLOEXEC))


def _open_perf(tid: int, period_ns: int, to_tid: int, signo: int) -> int | None:
    """Return an enabled task-clock event on ``tid`` that signals ``to_tid``, or None."""
    global _perf_flags
    if _perf_flags == -1:
        return None
    if _perf_flags is not None:
        tries = [_perf_flags]
    else:
        # Where kernel time may not be watched, user time only: a tick that falls in a
        # system call is then dropped, and its CPU goes to the next tick's stack (weights
        # come from the thread's clock), which is mostly the same line.
        tries = [
            _ATTR_DISABLED | _ATTR_EXCLUDE_HV,
            _ATTR_DISABLED | _ATTR_EXCLUDE_HV | _ATTR_EXCLUDE_KERNEL,
        ]
    fd = -1
    for flags in tries:
        fd = _perf_open(tid, period_ns, flags)
        if fd >= 0:
            break
    if fd < 0:
        if _perf_flags is None and ctypes.get_errno() not in _TRANSIENT:
            _perf_flags = -1  # not on this machine (paranoid 3, seccomp): never again
        return None
    _perf_flags = flags
    try:
        fcntl.fcntl(fd, _F_SETSIG, signo)
        fcntl.fcntl(fd, _F_SETOWN_EX, struct.pack("ii", _F_OWNER_TID, to_tid))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
        fcntl.ioctl(fd, _IOC_ENABLE, 0)
    except OSError:
        os.close(fd)
        return None
    with _fds_lock:
        _open_fds.add(fd)
    return fd


_TRANSIENT = (errno.ESRCH, errno.EMFILE, errno.ENFILE, errno.EINTR)
"""Failures that say "not this thread, not now" rather than "no perf here"."""


def _close_perf(fd: int) -> None:
    # Disable and un-async before closing: a forked child may still hold the same open
    # file, and the event must not outlive this call and signal a thread whose handler
    # is about to go back to the default (fatal) action.
    try:
        fcntl.ioctl(fd, _IOC_DISABLE, 0)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_ASYNC)
    except OSError:
        pass
    with _fds_lock:
        _open_fds.discard(fd)
    os.close(fd)


# --- the tick source -----------------------------------------------------------------------


class Ticker:
    """One thread's ticks: a perf event (``fd``) or a POSIX timer (``timer``).

    A perf event ticks at exact multiples of its period of CPU time, so a workload whose
    CPU cycle is near a multiple of the period would be seen at the same phase of every
    cycle (aliasing: measured, a 3:1 loop read as anything from 0.8:1 to 2.8:1 once
    coverage's tracer stretched its cycle to about 4 ms). So after each tick the next
    period is drawn afresh, uniformly from half to one and a half periods: the mean
    rate stays, and ticks land at independent points of the thread's running time.
    (The timers' ticks are already scattered: the kernel checks them at its own tick.)
    """

    __slots__ = ("_lock", "_random", "fd", "key", "period_ns", "timer")

    def __init__(
        self, key: int, fd: int | None, timer: ctypes.c_void_p | None, period_ns: int = 0
    ) -> None:
        self.key = key
        self.fd = fd
        self.timer = timer
        self.period_ns = period_ns
        """The mean period of the next draws (perf events); set it to change the rate."""
        self._lock = threading.Lock()
        self._random = random.Random()

    def rearm(self) -> None:
        """Draw the next period (perf events; timers need none).

        Safe from a signal handler on the thread that may be inside :meth:`close`: the
        lock is only tried, and a tick that loses the race keeps the previous period.
        """
        if self.fd is None or not self._lock.acquire(blocking=False):
            return
        try:
            if self.fd is not None:
                p = self.period_ns
                period = self._random.randint(p // 2, p + p // 2)
                with contextlib.suppress(OSError):
                    fcntl.ioctl(self.fd, _IOC_PERIOD, struct.pack("Q", period))
        finally:
            self._lock.release()

    def close(self) -> None:
        """Stop the ticks; no signal of this ticker is sent after this returns."""
        with self._lock:
            fd, self.fd = self.fd, None
            timer, self.timer = self.timer, None
        if fd is not None:
            _close_perf(fd)
        elif timer is not None:
            libc = get_libc()
            if libc is not None:
                libc.timer_delete(timer)


def _open_timer(tid: int, period_ns: int, to_tid: int, key: int) -> ctypes.c_void_p | None:
    libc = get_libc()
    if libc is None:
        return None
    ev = _Sigevent()
    ev.sigev_value = key
    ev.sigev_signo = int(TIMER_SIGNAL)
    ev.sigev_notify = _SIGEV_THREAD_ID
    ev.sigev_tid = to_tid
    timer = ctypes.c_void_p()
    if libc.timer_create(_thread_cpu_clock(tid), ctypes.byref(ev), ctypes.byref(timer)):
        return None  # the thread exited between enumerate and here
    s, ns = divmod(period_ns, 1_000_000_000)
    spec = _Itimerspec(_Timespec(s, ns), _Timespec(s, ns))
    if libc.timer_settime(timer, 0, ctypes.byref(spec), None):
        libc.timer_delete(timer)
        return None
    return timer


def open_ticker(
    tid: int, period_ns: int, to_tid: int, key: int, *, perf_signal: int | None = None
) -> Ticker | None:
    """Return a ticker for thread ``tid`` every ``period_ns`` of its CPU, or None.

    Its signal goes to thread ``to_tid``: ``perf_signal`` (default :data:`PERF_SIGNAL`)
    from a perf event, else :data:`TIMER_SIGNAL` from a timer whose ``si_value`` is
    ``key``. :func:`tick_key` reads a ticker's ``key`` back from either.
    """
    signo = perf_signal if perf_signal is not None else PERF_SIGNAL
    if signo is not None and os.environ.get("ASGI_PPROF_CPU_TICKS") != "timer":
        fd = _open_perf(tid, period_ns, to_tid, int(signo))
        if fd is not None:
            return Ticker(_FD_KEY | fd, fd, None, period_ns)
    timer = _open_timer(tid, period_ns, to_tid, key)
    return None if timer is None else Ticker(key, None, timer)


SIGINFO_SIZE = 128


def tick_key(buf: bytes, off: int) -> tuple[int, int]:
    """Return (ticker key, overrun) of the ``signalfd_siginfo`` at ``buf[off:]``."""
    (code,) = struct.unpack_from("i", buf, off + 8)
    if code == _SI_TIMER:
        (overrun,) = struct.unpack_from("I", buf, off + 32)
        (key,) = struct.unpack_from("Q", buf, off + 48)  # ssi_ptr: our sigev_value
        return key, overrun
    (fd,) = struct.unpack_from("i", buf, off + 20)  # ssi_fd: the perf event's
    return _FD_KEY | fd, 0


def source() -> str:
    """Return which source new tickers use: "perf", "timer" or "none" (untried: "perf?")."""
    if get_libc() is None:
        return "none"
    if os.environ.get("ASGI_PPROF_CPU_TICKS") == "timer" or _perf_flags == -1:
        return "timer"
    return "perf" if _perf_flags is not None else "perf?"


def after_fork_in_child() -> None:
    """Close the perf events a forked child inherited (they watch the parent's threads)."""
    global _fds_lock
    _fds_lock = threading.Lock()
    for fd in list(_open_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _open_fds.clear()
