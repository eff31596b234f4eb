"""The CPU sampler: one thread that samples the Python stacks of all threads by CPU time.

How a sample is taken (Linux): every profiled thread gets a POSIX timer on *its own* CPU
clock (``timer_create`` on the thread's CPU clock id), set to fire every ``1/hz`` s of that
thread's CPU time and to deliver its signal to the sampler thread only
(``SIGEV_THREAD_ID``). The sampler blocks that signal and reads it from a ``signalfd``.
So a tick means "this thread has just burned one period of CPU": idle threads never
tick, a thread blocked on I/O, a lock or the GIL never ticks, and the tick's weight is
exact. The sampler then takes the GIL and reads the thread's frame. Because the ticking
thread held the GIL a moment ago, that wait is bounded by the switch interval, which a
capture lowers (``Options.switch_interval``, 0.2 ms by default) so that the frame read is
the one that burned the CPU, not the line where a short burst ended (see "The GIL
sampling bias" in the README). Each tick's stack goes to every subscriber, so several
concurrent ``/profile`` requests share one sampler.

Elsewhere (no ``timer_create``/``signalfd``), a polling fallback samples every thread
whose CPU clock moved since the previous sample, weighted by that CPU time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import signal
import struct
import sys
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field

from .concurrency import THREAD_PREFIX, is_own_thread
from .model import Frame, Stack, frame_of

__all__ = ["Capture", "Sampler", "get_sampler"]

log = logging.getLogger("asgi_pprof")

_MAX_DEPTH = 256
_RESCAN_S = 0.05
"""How often the sampler looks for new and finished threads."""


# --- stacks ------------------------------------------------------------------------------

_frames: dict[tuple[types.CodeType, int], Frame] = {}


def sample_stack(frame: types.FrameType | None) -> Stack:
    """Return the stack (leaf first) of a live frame, reusing Frame objects across samples."""
    out: list[Frame] = []
    cache = _frames
    n = 0
    while frame is not None and n < _MAX_DEPTH:
        key = (frame.f_code, frame.f_lineno or 0)
        fr = cache.get(key)
        if fr is None:
            if len(cache) > 200_000:
                cache.clear()
            fr = cache[key] = frame_of(frame)
        out.append(fr)
        frame = frame.f_back
        n += 1
    return tuple(out)


# --- subscribers -------------------------------------------------------------------------


def _thread_cpu_ns(tid: int) -> int | None:
    """Return a thread's precise CPU time (ns) from its kernel tid, None if it is gone.

    ``CPUCLOCK_SCHED``: the exact runtime, unlike the tick-accounted clock the timers use.
    """
    try:
        return time.clock_gettime_ns(((~tid) << 3) | 4 | 2)
    except OSError:
        return None


Key = tuple[Stack, str]


@dataclass
class Capture:
    """One profile window's samples: ticks and CPU nanoseconds by (stack, thread name).

    A tick says where a thread was when it had used another period of CPU; its weight is
    the thread's precise CPU time since its previous sample in this window, read from its
    CPU clock, so each thread's total is its real CPU time, not ticks x period (the
    tick-accounted clock that times the ticks is itself a sample: +-7 % for a thread
    using 17 % of a core over 4 s).
    """

    period_ns: int
    start_ns: int = field(default_factory=time.time_ns)
    start_mono: float = field(default_factory=time.monotonic)
    counts: dict[Key, list[int]] = field(default_factory=dict)
    signal_counts: dict[Key, list[int]] = field(default_factory=dict)
    """What the main thread recorded itself (kept apart: two threads write them)."""
    last_cpu: dict[int, int] = field(default_factory=dict)
    """Each thread's CPU clock (by kernel tid) at its previous sample or the window's start."""
    end_mono: float = 0.0

    def weigh(self, tid: int | None, cpu_now: int | None, ticks: int) -> int:
        """Return the CPU (ns) a sample of thread ``tid`` stands for, and remember ``cpu_now``.

        A thread first seen mid-window (no start reading) counts ``ticks`` periods.
        """
        if cpu_now is None or tid is None:
            return ticks * self.period_ns
        prev = self.last_cpu.get(tid)
        self.last_cpu[tid] = cpu_now
        if prev is None:
            return ticks * self.period_ns
        return max(0, cpu_now - prev)

    @staticmethod
    def add_to(table: dict[Key, list[int]], key: Key, ticks: int, ns: int) -> None:
        """Add ``ticks`` and ``ns`` to ``table[key]``."""
        cell = table.get(key)
        if cell is None:
            table[key] = [ticks, ns]
        else:
            cell[0] += ticks
            cell[1] += ns

    def totals(self) -> dict[Key, list[int]]:
        """Return [ticks, cpu ns] per key from both sources, summed."""
        # dict() copies in one step under the GIL: the main thread's handler may still be
        # adding a last tick while this runs in a worker thread.
        out = {k: list(v) for k, v in dict(self.counts).items()}
        for key, (n, ns) in dict(self.signal_counts).items():
            Capture.add_to(out, key, n, ns)
        return out


# --- libc glue (Linux) ---------------------------------------------------------------------

_SIGEV_THREAD_ID = 4
_SFD_NONBLOCK = 0o4000
_SFD_CLOEXEC = 0o2000000
_SIGINFO_SIZE = 128


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

    The kernel encodes it as ``(~tid << 3) | CPUCLOCK_PERTHREAD | CPUCLOCK_PROF``: the
    clock ``ITIMER_PROF`` uses, which advances at scheduler ticks, so a timer on it fires
    at a tick while the thread runs, a moment independent of what the thread does.
    (Measured: ``CPUCLOCK_SCHED``, the precise clock, gave a 3:1 workload as 1.7:1.)
    Built from the tid, not ``pthread_getcpuclockid``, which would read a possibly freed
    ``pthread_t`` of a thread that has just exited.
    """
    return ((~tid) << 3) | 4


class _Libc:
    """The four libc calls the timer sampler needs, or None where they are missing."""

    def __init__(self) -> None:
        # The running process's own symbols first: dlopen(NULL) is instant, while
        # find_library runs ldconfig (tens of ms, on the event loop's thread).
        libc = ctypes.CDLL(None, use_errno=True)
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
        base = ctypes.CDLL(None, use_errno=True)
        self.signalfd = base.signalfd
        self.signalfd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        self.sigemptyset = base.sigemptyset
        self.sigaddset = base.sigaddset


_libc: _Libc | bool | None = False


def _get_libc() -> _Libc | None:
    global _libc
    if _libc is False:
        try:
            _libc = _Libc() if sys.platform.startswith("linux") else None
        except (OSError, AttributeError):
            _libc = None
    return _libc if isinstance(_libc, _Libc) else None


# --- the GIL switch interval, shared by every running sampler ------------------------------

_switch_lock = threading.Lock()
_switch_holders = 0
_switch_saved = 0.0
_switch_ours = 0.0


def _hold_switch_interval(value: float) -> None:
    """Lower the switch interval to ``value`` while at least one sampler runs."""
    global _switch_holders, _switch_saved, _switch_ours
    with _switch_lock:
        if _switch_holders == 0:
            _switch_saved = sys.getswitchinterval()
            _switch_ours = value
            sys.setswitchinterval(value)
        elif value < _switch_ours:
            _switch_ours = value
            sys.setswitchinterval(value)
        _switch_holders += 1


def _release_switch_interval() -> None:
    """Put back the interpreter's switch interval when the last sampler stops.

    Unless somebody else changed it meanwhile: then theirs stays.
    """
    global _switch_holders
    with _switch_lock:
        _switch_holders -= 1
        if _switch_holders == 0 and abs(sys.getswitchinterval() - _switch_ours) < 1e-9:
            sys.setswitchinterval(_switch_saved)


# --- the sampler ---------------------------------------------------------------------------

_SIGNAL = signal.SIGPROF


@dataclass
class _Timed:
    tid: int
    timer: ctypes.c_void_p


class Sampler:
    """One sampler thread at ``hz``; captures subscribe and unsubscribe while it runs."""

    def __init__(self, hz: int, switch_interval: float | None) -> None:
        self.hz = hz
        self.period_ns = 1_000_000_000 // hz
        self.switch_interval = switch_interval
        self.mode = "timers" if _get_libc() is not None else "polling"
        self._lock = threading.Lock()
        # Replaced, never mutated: the signal handler reads it without taking the lock
        # (it may interrupt the main thread while that thread holds the lock).
        self._captures: tuple[Capture, ...] = ()
        self._main_by_signal = False
        self._main_name = ""
        self._main_tid: int | None = None
        self._previous_handler: object = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.ticks = 0
        self.overruns = 0

    # subscription (called from the event loop; cheap)

    def subscribe(self) -> Capture:
        """Return a new capture that receives every sample from now until unsubscribed."""
        cap = Capture(period_ns=self.period_ns)
        for tid in self._targets().values():
            cpu = _thread_cpu_ns(tid)
            if cpu is not None:
                cap.last_cpu[tid] = cpu
        with self._lock:
            self._captures = (*self._captures, cap)
            if self._thread is None:
                self._start()
        return cap

    def unsubscribe(self, cap: Capture) -> None:
        """Stop feeding ``cap``; stop the sampler thread when nobody is left."""
        thread = None
        with self._lock:
            if cap in self._captures:
                self._captures = tuple(c for c in self._captures if c is not cap)
                cap.end_mono = time.monotonic()
            if not self._captures and self._thread is not None:
                thread = self._thread
                self._thread = None
                self._stop.set()
                if self.switch_interval is not None:
                    _release_switch_interval()
        if thread is not None:
            thread.join()

    def release_signal(self) -> None:
        """Put back the main thread's SIGPROF handler once no capture runs.

        Call on the main thread after :meth:`unsubscribe` (which deletes the timers).
        Python runs signal handlers on the main thread only, so this cannot happen in
        ``unsubscribe``, which runs in a worker thread.
        """
        with self._lock:
            if self._thread is not None or not self._main_by_signal:
                return
            if threading.current_thread() is not threading.main_thread():
                return
            self._main_by_signal = False
            previous = self._previous_handler
        signal.signal(_SIGNAL, previous)  # type: ignore[arg-type]

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        # The main thread's own tick: ``frame`` is exactly where it was burning CPU.
        if frame is None:
            return
        captures = self._captures
        if not captures:
            return
        stack = sample_stack(frame)
        key = (stack, self._main_name)
        cpu_now = time.thread_time_ns()
        for cap in captures:
            Capture.add_to(cap.signal_counts, key, 1, cap.weigh(self._main_tid, cpu_now, 1))
        self.ticks += 1

    def _use_signal_for_main(self) -> bool:
        # Only from the main thread, only with the timers available, and never over a
        # SIGPROF handler somebody else installed.
        if self.mode != "timers" or self._main_by_signal:
            return self._main_by_signal
        if threading.current_thread() is not threading.main_thread():
            return False
        current = signal.getsignal(_SIGNAL)
        if current not in (signal.SIG_DFL, signal.SIG_IGN):
            return False
        self._previous_handler = current
        self._main_name = threading.main_thread().name
        self._main_tid = threading.main_thread().native_id
        signal.signal(_SIGNAL, self._on_signal)
        self._main_by_signal = True
        return True

    @property
    def running(self) -> bool:
        """Return True while the sampler thread runs."""
        return self._thread is not None

    def _start(self) -> None:
        self._stop = threading.Event()
        self._use_signal_for_main()
        if self.switch_interval is not None:
            _hold_switch_interval(self.switch_interval)
        target: Callable[[threading.Event], None] = (
            self._run_timers if self.mode == "timers" else self._run_polling
        )
        self._thread = threading.Thread(
            target=self._guard, args=(target, self._stop), name=THREAD_PREFIX + "sampler"
        )
        self._thread.daemon = True
        self._thread.start()

    def _guard(self, target: Callable[[threading.Event], None], stop: threading.Event) -> None:
        # A sampler must never die silently: log, and fall back to polling.
        try:
            target(stop)
        except Exception:
            log.exception("asgi_pprof: CPU sampler (%s) failed; falling back to polling", self.mode)
            if self.mode == "timers" and not stop.is_set():
                self.mode = "polling"
                self._run_polling(stop)

    def _deliver(self, ident_ticks: dict[int, int], frames: dict[int, types.FrameType]) -> None:
        threads = {t.ident: t for t in threading.enumerate()}
        batch: list[tuple[int | None, Stack, str, int, int | None]] = []
        for ident, ticks in ident_ticks.items():
            thread = threads.get(ident)
            frame = frames.get(ident)
            if thread is None or frame is None or is_own_thread(thread.name):
                continue
            tid = thread.native_id
            cpu_now = _thread_cpu_ns(tid) if tid is not None else None
            batch.append((tid, sample_stack(frame), thread.name, ticks, cpu_now))
        del frames
        with self._lock:
            for cap in self._captures:
                for tid, stack, name, ticks, cpu_now in batch:
                    ns = cap.weigh(tid, cpu_now, ticks)
                    Capture.add_to(cap.counts, (stack, name), ticks, ns)

    def _targets(self) -> dict[int, int]:
        """Return {ident: kernel tid} of the threads to profile (all but ours)."""
        return {
            t.ident: t.native_id
            for t in threading.enumerate()
            if t.ident is not None and t.native_id is not None and not is_own_thread(t.name)
        }

    # Linux: per-thread CPU timers read through a signalfd

    def _run_timers(self, stop: threading.Event) -> None:
        libc = _get_libc()
        assert libc is not None  # mode "timers" is only chosen when libc has the calls
        signal.pthread_sigmask(signal.SIG_BLOCK, {_SIGNAL})
        mask = ctypes.create_string_buffer(128)
        libc.sigemptyset(mask)
        libc.sigaddset(mask, int(_SIGNAL))
        fd = libc.signalfd(-1, mask, _SFD_NONBLOCK | _SFD_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "signalfd failed")
        my_tid = threading.get_native_id()
        main = threading.main_thread()
        timers: dict[int, _Timed] = {}
        keys: dict[int, int] = {}
        next_key = 1
        period = self.period_ns
        spec = _Itimerspec(
            _Timespec(period // 1_000_000_000, period % 1_000_000_000),
            _Timespec(period // 1_000_000_000, period % 1_000_000_000),
        )
        try:
            last_scan = 0.0
            while not stop.is_set():
                now = time.monotonic()
                if now - last_scan >= _RESCAN_S:
                    last_scan = now
                    targets = self._targets()
                    for ident in [i for i in timers if targets.get(i) != timers[i].tid]:
                        libc.timer_delete(timers.pop(ident).timer)
                    for ident, tid in targets.items():
                        if ident in timers:
                            continue
                        ev = _Sigevent()
                        ev.sigev_value = next_key
                        ev.sigev_signo = int(_SIGNAL)
                        ev.sigev_notify = _SIGEV_THREAD_ID
                        # The main thread takes its own ticks when our handler is in
                        # place (exact frames); every other thread's come to us.
                        by_signal = self._main_by_signal and ident == main.ident
                        ev.sigev_tid = tid if by_signal else my_tid
                        tid_timer = ctypes.c_void_p()
                        clock = _thread_cpu_clock(tid)
                        if libc.timer_create(clock, ctypes.byref(ev), ctypes.byref(tid_timer)):
                            continue  # the thread exited between enumerate and here
                        if libc.timer_settime(tid_timer, 0, ctypes.byref(spec), None):
                            libc.timer_delete(tid_timer)
                            continue
                        timers[ident] = _Timed(tid, tid_timer)
                        keys[next_key] = ident
                        next_key += 1
                    if targets and not timers:
                        # Every timer_create failed (a sandbox, an old kernel): an empty
                        # profile would look like an idle process. Fall back, loudly.
                        raise OSError(ctypes.get_errno(), "timer_create failed for every thread")
                # Wait without the GIL; a tick wakes us at once.
                ready, _, _ = select.select([fd], [], [], _RESCAN_S)
                if not ready:
                    continue
                # Read the frames first, before anything that could let go of the GIL
                # (os.read does): the ticking thread must not run on past its tick.
                frames = sys._current_frames()
                ticks = self._read_ticks(fd, keys)
                if ticks:
                    self._deliver(ticks, frames)
                del frames
        finally:
            for t in timers.values():
                libc.timer_delete(t.timer)
            self._drain(fd)
            os.close(fd)

    def _read_ticks(self, fd: int, keys: dict[int, int]) -> dict[int, int]:
        ticks: dict[int, int] = {}
        while True:
            try:
                buf = os.read(fd, _SIGINFO_SIZE * 64)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            for off in range(0, len(buf) - _SIGINFO_SIZE + 1, _SIGINFO_SIZE):
                (overrun,) = struct.unpack_from("I", buf, off + 32)
                (key,) = struct.unpack_from("Q", buf, off + 48)  # ssi_ptr: our sigev_value
                ident = keys.get(key)
                if ident is not None:
                    ticks[ident] = ticks.get(ident, 0) + 1 + overrun
                    self.ticks += 1 + overrun
                    self.overruns += overrun
            if len(buf) < _SIGINFO_SIZE * 64:
                break
        return ticks

    def _drain(self, fd: int) -> None:
        # Signals already queued for this thread must not outlive it unread.
        try:
            while os.read(fd, _SIGINFO_SIZE * 64):
                pass
        except OSError:
            pass

    # Elsewhere: poll thread CPU clocks

    def _run_polling(self, stop: threading.Event) -> None:
        last: dict[int, int] = {}
        interval = self.period_ns / 1e9
        while not stop.wait(interval):
            ticks: dict[int, int] = {}
            for ident in self._targets():
                try:
                    cpu = time.clock_gettime_ns(time.pthread_getcpuclockid(ident))
                except (OSError, AttributeError):
                    continue
                prev = last.get(ident)
                last[ident] = cpu
                if prev is not None and cpu > prev:
                    ticks[ident] = max(1, round((cpu - prev) / self.period_ns))
            if ticks:
                self.ticks += sum(ticks.values())
                self._deliver(ticks, sys._current_frames())


_samplers: dict[tuple[int, float | None], Sampler] = {}
_samplers_lock = threading.Lock()


def get_sampler(hz: int, switch_interval: float | None) -> Sampler:
    """Return the process's sampler for this rate (one sampler thread serves all captures)."""
    key = (hz, switch_interval)
    with _samplers_lock:
        s = _samplers.get(key)
        if s is None:
            s = _samplers[key] = Sampler(hz, switch_interval)
        return s
