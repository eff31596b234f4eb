"""The CPU sampler: one thread that samples the Python stacks of all threads by CPU time.

How a sample is taken (Linux): every profiled thread gets a ticker on *its own* CPU time
(``cputicks``: a perf task-clock event, else a POSIX CPU timer) that fires every ``1/hz``
s of that thread's CPU and signals the sampler thread only, which blocks the signal and
reads it from a ``signalfd``; the main thread takes its own ticks in a SIGPROF handler.
So a tick means "this thread has just burned one period of CPU": idle threads never
tick, a thread blocked on I/O, a lock or the GIL never ticks, and the tick's weight is
exact. The sampler then takes the GIL and reads the thread's frame. Because the ticking
thread held the GIL a moment ago, that wait is bounded by the switch interval, which a
capture lowers (``Options.switch_interval``, 0.1 ms by default) so that the frame read is
the one that burned the CPU, not the line where a short burst ended (see "The GIL
sampling bias" in the README). Each tick's stack goes to every subscriber, so several
concurrent ``/profile`` requests share one sampler.

Elsewhere (no ``timer_create``/``signalfd``), a polling fallback samples every thread
whose CPU clock moved since the previous sample, weighted by that CPU time.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import select
import signal
import sys
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field

from . import cputicks, threads
from .concurrency import THREAD_PREFIX, is_own_thread
from .frames import RawStack, current_stacks, resolve, stack_now
from .labelling import all_thread_labels, current_labels
from .model import Labels, Stack

__all__ = ["Capture", "Sampler", "TimelineTick", "get_sampler", "sample_stack"]

log = logging.getLogger("asgi_pprof")

_RESCAN_S = 0.05
"""How often the sampler looks for new and finished threads while a thread read from outside
runs (what the switch interval decision follows)."""

_IDLE_RESCAN_S = 1.0
"""How often while none does: the main thread takes its own ticks, so the rescan only looks
for threads that start or start running, and each wake-up takes the GIL from a busy loop.
Taking it is what costs: CPython wakes a thread waiting for the GIL each time the holder lets
it go, and a busy event loop lets it go and takes it straight back around every select(), so
one rescan woke this thread ~300 times (measured over a loop of short steps: 1 100-1 760
context switches and 18-28 ms of CPU a second at 4 rescans a second). A thread started with
``Thread.start()`` once ``create_app`` ran (``threads.install``) wakes the sampler at once
instead, and a capture's first reading is followed by one after :data:`_RESCAN_S`."""


# --- stacks ------------------------------------------------------------------------------

sample_stack = stack_now
"""Return the stack of one of this thread's frames, or of a suspended one (``frames.stack_now``).

Another thread's stack must be read with ``frames.current_stacks``: holding its frames
between two calls races it."""


# --- subscribers -------------------------------------------------------------------------


def _thread_cpu_ns(tid: int) -> int | None:
    """Return a thread's precise CPU time (ns) from its kernel tid, None if it is gone.

    ``CPUCLOCK_SCHED``: the exact runtime, unlike the tick-accounted clock the timers use.
    """
    try:
        return time.clock_gettime_ns(((~tid) << 3) | 4 | 2)
    except OSError:
        return None


def _thread_run_delay_ns(tid: int) -> int | None:
    """Return how long thread ``tid`` has waited for a CPU while runnable (ns), None if unknown.

    The second field of ``/proc/self/task/<tid>/schedstat``: time on a run queue, not time
    asleep (a thread waiting for the GIL sleeps on a condition variable and is not counted).
    """
    try:
        with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
            return int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _alive(tid: int) -> bool:
    """Return whether thread ``tid`` of this process still exists (True if unknown)."""
    if not os.path.isdir("/proc/self/task"):
        return True
    return os.path.exists(f"/proc/self/task/{tid}")


Key = tuple[Stack, str, Labels]
"""(stack, thread name, the code's own labels: ``asgi_pprof.labels``)."""

TimelineTick = tuple[int, int, Stack]
"""(``time.perf_counter_ns()``, thread ident, stack) of one CPU tick."""


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
    timeline: list[TimelineTick] | None = None
    """Every tick in the order taken, when subscribed with ``timeline=True``."""
    tick_ns: int = 0
    """The longest mean tick period this capture accepts (0: the sampler's period). The
    sampler ticks at the shortest of its captures' (:meth:`Sampler.tick_period_ns`)."""
    on_main_tick: Callable[[types.FrameType], None] | None = None
    """Called with the interrupted frame at each of the main thread's own ticks, in its
    ``SIGPROF`` handler (the GIL held, no hand-over needed): the trace takes its wall-clock
    samples there while the main thread burns CPU. It must not raise; one that does is not
    called again."""

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


_SFD_NONBLOCK = 0o4000
_SFD_CLOEXEC = 0o2000000


# --- the GIL switch interval, shared by every running sampler ------------------------------


class _SwitchInterval:
    """The interpreter's switch interval, lowered while some sampler wants it lower.

    Each sampler states what it wants (a value, or None for "leave it"); the lowest
    wanted value is in force, and the interpreter's own value comes back when nobody
    wants one. If somebody else changes the interval meanwhile, theirs stays: we stop
    touching it until every sampler has let go.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wants: dict[int, float] = {}
        self._saved: float | None = None  # the interval before we first lowered it
        self._ours: float | None = None  # what we set last
        self._yielded = False

    def want(self, key: int, value: float | None) -> None:
        """Record what sampler ``key`` wants, and apply the lowest of all wants."""
        with self._lock:
            if value is None:
                self._wants.pop(key, None)
            else:
                self._wants[key] = value
            current = sys.getswitchinterval()
            if self._ours is not None and abs(current - self._ours) > 1e-9:
                self._yielded = True  # someone else set it: theirs stays
            if self._yielded:
                if not self._wants:
                    self._yielded = False
                    self._saved = self._ours = None
                return
            target = min(self._wants.values()) if self._wants else None
            if target is None:
                if self._saved is not None:
                    sys.setswitchinterval(self._saved)
                self._saved = self._ours = None
            elif target != self._ours:
                if self._saved is None:
                    self._saved = current
                sys.setswitchinterval(target)
                self._ours = target

    def after_fork_in_child(self) -> None:
        """In a child forked mid-capture, put back the interval no sampler there holds."""
        self._lock = threading.Lock()
        if self._saved is not None and not self._yielded:
            sys.setswitchinterval(self._saved)
        self._wants.clear()
        self._saved = self._ours = None
        self._yielded = False


_switch = _SwitchInterval()

_BUSY_SHARE = 0.25
"""A thread using more than this share of a core (over the last rescan) is CPU-bound."""

_CONTENDED_SHARE = 0.9
"""CPU-bound threads using together more than this share of a core contend for the GIL
(with the GIL, Python threads can use at most one core between them)."""

_CALM_READINGS = 2
"""Readings in a row that must find no contention before the low interval comes back."""

_CANDIDATE_SHARE = 0.05
"""A thread using this share of a core may be CPU-bound on a core it shares with other
processes: its time waiting for a CPU is read too (:func:`_thread_run_delay_ns`)."""

_ACTIVE_SHARE = 0.005
"""A thread read from outside that used this share of a core (over the last rescan) runs:
its bursts are what the low interval is for."""


# --- the sampler ---------------------------------------------------------------------------

_SIGNAL = signal.SIGPROF


class Sampler:
    """One long-lived sampler thread at ``hz``; captures subscribe and unsubscribe at will.

    The thread starts with the first capture and then stays, idle (no timers, blocked on
    a condition) whenever no capture runs, so captures never start or join threads and
    ``threadcreate`` does not fill up with samplers.

    The SIGPROF rule (issue 8, item 1): the main thread's timer, the only one that signals
    the main thread, is created and deleted under ``_lock`` and only while our handler is
    installed; the handler is put back only when that timer is gone, and through
    ``SIG_IGN`` first, which discards a tick the kernel had already queued. So no order of
    subscribe, unsubscribe and release can leave a timer whose signal nobody handles.
    """

    def __init__(self, hz: int, switch_interval: float | None) -> None:
        self.hz = hz
        self.period_ns = 1_000_000_000 // hz
        self.switch_interval = switch_interval
        self.mode = "timers" if cputicks.get_libc() is not None else "polling"
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # Replaced, never mutated: the signal handler reads it without taking the lock
        # (it may interrupt the main thread while that thread holds the lock).
        self._captures: tuple[Capture, ...] = ()
        self._main_by_signal = False
        self._main_name = ""
        self._main_ident: int | None = None
        self._main_tid: int | None = None
        self._main_timer: cputicks.Ticker | None = None
        self._previous_handler: object = None
        self._thread: threading.Thread | None = None
        self._holding_switch = False
        self._cpu_seen: dict[int, int] = {}
        """Each thread's CPU clock (by kernel tid) at the last rescan: who burns CPU now."""
        self._cpu_at = 0.0
        self._contended = False
        """The last readings' verdict: threads contend for the GIL (:meth:`_still_contended`)."""
        self._calm = 0
        self._delay_seen: dict[int, int] = {}
        """Run-queue waits (by kernel tid) at the last rescan, of the threads that used
        :data:`_CANDIDATE_SHARE` of a core or more there."""
        self._wake_fds: tuple[int, int] | None = None
        """A pipe that wakes the sampler thread's wait (:meth:`_poke`), while that thread runs."""
        self._wake_lock = threading.Lock()
        """Guards ``_wake_fds``' lifetime: a write never reaches a closed (or reused) fd."""
        self._closed = False
        self.ticks = 0
        self.overruns = 0

    # subscription (called from the event loop or any thread; cheap, never blocks)

    def subscribe(
        self,
        *,
        timeline: bool = False,
        on_main_tick: Callable[[types.FrameType], None] | None = None,
        tick_ns: int = 0,
    ) -> Capture:
        """Return a new capture that receives every sample from now until unsubscribed.

        With ``timeline`` the capture also keeps every tick in order (``Capture.timeline``);
        ``on_main_tick`` is called at the main thread's own ticks (``Capture.on_main_tick``);
        ``tick_ns`` is the longest mean period between ticks the capture accepts (0: the
        sampler's; see :meth:`tick_period_ns`).
        """
        cap = Capture(
            period_ns=self.period_ns,
            timeline=[] if timeline else None,
            on_main_tick=on_main_tick,
            tick_ns=tick_ns,
        )
        for tid in self._targets().values():
            cpu = _thread_cpu_ns(tid)
            if cpu is not None:
                cap.last_cpu[tid] = cpu
        _at_exit_once()
        with self._lock:
            self._use_signal_for_main()
            first = not self._captures
            self._captures = (*self._captures, cap)
            self._retime_main()
            if first and self.switch_interval is not None and not self._holding_switch:
                _switch.want(id(self), self.switch_interval)
                self._holding_switch = True
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._guard, name=THREAD_PREFIX + "sampler", daemon=True
                )
                self._thread.start()
            self._wake.notify_all()
        return cap

    def unsubscribe(self, cap: Capture) -> None:
        """Stop feeding ``cap`` now. Cheap and synchronous: no join, no thread hop."""
        with self._lock:
            if cap in self._captures:
                self._captures = tuple(c for c in self._captures if c is not cap)
                cap.end_mono = time.monotonic()
                self._retime_main()
            if not self._captures:
                self._delete_main_timer()
                if self._holding_switch:
                    self._holding_switch = False
                    _switch.want(id(self), None)
                self._wake.notify_all()
                self._poke()  # its tickers close now, not at the next rescan

    def release_signal(self) -> None:
        """Put back the main thread's SIGPROF handler once no capture runs.

        Only the main thread can change a handler, so :meth:`unsubscribe` (any thread)
        cannot; call this on the main thread after it. A no-op while captures run.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        with self._lock:
            if self._captures or not self._main_by_signal:
                return
            self._delete_main_timer()
            self._main_by_signal = False
            # SIG_IGN discards a SIGPROF the kernel generated before the timer went and
            # has not delivered yet; only then is the previous (default: fatal) action safe.
            signal.signal(_SIGNAL, signal.SIG_IGN)
            signal.signal(_SIGNAL, self._previous_handler)  # type: ignore[arg-type]

    def tick_period_ns(self) -> int:
        """Return the mean tick period now: the shortest its captures accept.

        A capture that accepts longer periods (the trace's CPU tracks, ``trace_cpu_hz``)
        makes the ticks rarer while it runs alone: on a virtual machine each tick costs the
        ticked thread several times its handler's own work (the timer's interrupt, the
        signal, the caches), so the rate is what a capture costs. Any capture that wants
        the full rate (a CPU profile) gets it for all. The ticks' weights are the threads'
        own CPU clocks, so a rate that changes mid-capture changes no total.
        """
        return min(
            (max(cap.tick_ns, self.period_ns) for cap in self._captures), default=self.period_ns
        )

    def _retime_main(self) -> None:
        # Under self._lock: the main thread's ticker draws its next period from this.
        ticker = self._main_timer
        if ticker is not None:
            ticker.period_ns = self.tick_period_ns()

    def _delete_main_timer(self) -> None:
        # Under self._lock.
        ticker, self._main_timer = self._main_timer, None
        if ticker is not None:
            ticker.close()  # no tick of it is sent after this

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        # The main thread's own tick: ``frame`` is exactly where it was burning CPU.
        captures = self._captures
        if frame is None or not captures:
            return
        stack = stack_now(frame)
        # The handler runs in the interrupted code's context: the running task's labels.
        key = (stack, self._main_name, current_labels())
        cpu_now = time.thread_time_ns()
        for cap in captures:
            Capture.add_to(cap.signal_counts, key, 1, cap.weigh(self._main_tid, cpu_now, 1))
            if cap.timeline is not None:
                cap.timeline.append((time.perf_counter_ns(), self._main_ident or 0, stack))
        self.ticks += 1
        ticker = self._main_timer
        if ticker is not None:
            ticker.rearm()
        for cap in captures:
            listener = cap.on_main_tick
            if listener is not None:
                try:
                    listener(frame)
                except Exception:  # never into the interrupted code: the listener reports
                    cap.on_main_tick = None

    def _use_signal_for_main(self) -> None:
        # Under self._lock. Only on the main thread, only with the timers available, and
        # never over a SIGPROF handler somebody else installed.
        if self.mode != "timers" or self._main_by_signal:
            return
        if threading.current_thread() is not threading.main_thread():
            return
        current = signal.getsignal(_SIGNAL)
        if current not in (signal.SIG_DFL, signal.SIG_IGN, None):
            return
        self._previous_handler = current if current is not None else signal.SIG_DFL
        main = threading.main_thread()
        self._main_name = main.name
        self._main_ident = main.ident
        self._main_tid = threading.get_native_id()  # we are on it
        signal.signal(_SIGNAL, self._on_signal)
        self._main_by_signal = True

    @property
    def running(self) -> bool:
        """Return True while at least one capture is subscribed."""
        return bool(self._captures)

    def after_fork_in_child(self) -> None:
        """Forget the parent's thread, timers and captures (none of them exist in a child)."""
        self._main_tid = threading.get_native_id()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._captures = ()
        self._thread = None
        self._main_timer = None  # POSIX timers are not inherited across fork
        self._holding_switch = False
        self._wake_lock = threading.Lock()
        self._close_wake()

    def thread_started(self) -> None:
        """Have the sampler thread look for new threads now, not at its next rescan.

        Called by ``Thread.start()`` (``threads.start_listeners``) in the starting thread:
        one non-blocking write, only while a capture runs."""
        if self._captures:
            self._poke()

    def _poke(self) -> None:
        # Wake the sampler thread's wait: one non-blocking write. Never takes self._lock
        # (Thread.start calls this, and the sampler starts its thread under that lock).
        with self._wake_lock:
            if self._wake_fds is not None:
                with contextlib.suppress(OSError):  # full: it wakes anyway
                    os.write(self._wake_fds[1], b"\0")

    def _close_wake(self) -> None:
        with self._wake_lock:
            fds, self._wake_fds = self._wake_fds, None
        for fd in fds or ():
            with contextlib.suppress(OSError):
                os.close(fd)

    def _guard(self) -> None:
        # A sampler must never die silently: log, and fall back to polling.
        while True:
            try:
                if self.mode == "timers":
                    self._run_timers()
                else:
                    self._run_polling()
                return
            except Exception:
                log.exception("asgi_pprof: CPU sampler (%s) failed; polling instead", self.mode)
                with self._lock:
                    self._delete_main_timer()
                self.mode = "polling"

    def close(self, timeout: float = 5.0) -> None:
        """End every capture and the sampler thread (process exit, tests of private samplers)."""
        for cap in self._captures:
            self.unsubscribe(cap)
        with self._lock:
            self._closed = True
            self._wake.notify_all()
            thread = self._thread
        self.release_signal()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _idle(self) -> bool:
        """Block while no capture runs; return False once the sampler is closed."""
        with self._lock:
            while not self._captures and not self._closed:
                self._wake.wait()
            return not self._closed

    def _deliver(
        self,
        ident_ticks: dict[int, int],
        stacks: dict[int, RawStack],
        labels: dict[int, Labels],
    ) -> None:
        threads = {t.ident: t for t in threading.enumerate()}
        now = time.perf_counter_ns()
        batch: list[tuple[int | None, int, Key, int, int | None]] = []
        for ident, ticks in ident_ticks.items():
            thread = threads.get(ident)
            raw = stacks.get(ident)
            if thread is None or not raw:
                continue
            tid = thread.native_id
            cpu_now = _thread_cpu_ns(tid) if tid is not None else None
            key = (resolve(raw), thread.name, labels.get(ident, ()))
            batch.append((tid, ident, key, ticks, cpu_now))
        with self._lock:
            for cap in self._captures:
                for tid, ident, key, ticks, cpu_now in batch:
                    ns = cap.weigh(tid, cpu_now, ticks)
                    Capture.add_to(cap.counts, key, ticks, ns)
                    if cap.timeline is not None:
                        cap.timeline.append((now, ident, key[0]))

    def _targets(self, threads: list[threading.Thread] | None = None) -> dict[int, int]:
        """Return {ident: kernel tid} of the threads to profile (ours too: labelled later),
        of ``threads`` (default: ``threading.enumerate()``)."""
        out = {
            t.ident: t.native_id
            for t in (threading.enumerate() if threads is None else threads)
            if t.ident is not None and t.native_id is not None
        }
        out.update(_forked_native_ids)
        return out

    # Linux: per-thread CPU timers read through a signalfd

    def _run_timers(self) -> None:
        libc = cputicks.get_libc()
        assert libc is not None  # mode "timers" is only chosen when libc has the calls
        signal.pthread_sigmask(signal.SIG_BLOCK, set(cputicks.TICK_SIGNALS))
        mask = ctypes.create_string_buffer(128)
        libc.sigemptyset(mask)
        for signo in cputicks.TICK_SIGNALS:
            libc.sigaddset(mask, int(signo))
        fd = libc.signalfd(-1, mask, _SFD_NONBLOCK | _SFD_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "signalfd failed")
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with self._wake_lock:
            self._wake_fds = (wake_r, wake_w)
        try:
            while self._idle():
                self._capture_timers(fd, wake_r)
        finally:
            self._close_wake()
            os.close(fd)

    def _capture_timers(self, fd: int, wake: int) -> None:
        """Sample while captures run; every ticker is closed before this returns."""
        my_tid = threading.get_native_id()
        main_ident = threading.main_thread().ident
        tickers: dict[int, tuple[int, cputicks.Ticker]] = {}
        keys: dict[int, int] = {}
        next_key = 1
        try:
            last_scan = 0.0
            rescan_s = _RESCAN_S
            first = True
            while self._captures:
                now = time.monotonic()
                if now - last_scan >= rescan_s:
                    last_scan = now
                    threads = threading.enumerate()
                    targets = self._targets(threads)
                    ours = {
                        t.ident for t in threads if t.ident is not None and is_own_thread(t.name)
                    }
                    rescan_s = self._adapt_switch_interval(
                        now, targets, threading.get_ident(), ours, first
                    )
                    first = False
                    for ident in [i for i in tickers if targets.get(i) != tickers[i][0]]:
                        gone = tickers.pop(ident)[1]
                        keys.pop(gone.key, None)
                        gone.close()
                    failed: list[int] = []
                    for ident, tid in targets.items():
                        # Not ourselves: our tick could only be read after the read it
                        # interrupted, so it would show the sampler reading stacks.
                        if ident in tickers or tid == my_tid:
                            continue
                        if ident == main_ident and self._main_by_signal:
                            if not self._arm_main(tid):
                                failed.append(tid)
                            continue
                        ticker = cputicks.open_ticker(tid, self.tick_period_ns(), my_tid, next_key)
                        if ticker is None:
                            failed.append(tid)
                            continue
                        tickers[ident] = (tid, ticker)
                        keys[ticker.key] = ident
                        next_key += 1
                    if (
                        not tickers
                        and self._main_timer is None
                        and self._captures  # else the main timer was not wanted
                        and any(_alive(tid) for tid in failed)
                    ):
                        # Every ticker failed (a sandbox, an old kernel): an empty profile
                        # would look like an idle process. Fall back, loudly. Not for a
                        # thread that ended since the scan (seen in CI: a capture's only
                        # other thread exiting as the next capture began).
                        raise OSError(ctypes.get_errno(), "no CPU ticker for any thread")
                # Wait without the GIL; a tick or a new thread wakes us at once.
                timeout = max(0.0, last_scan + rescan_s - time.monotonic())
                ready, _, _ = select.select([fd, wake], [], [], timeout)
                if wake in ready:
                    with contextlib.suppress(OSError):
                        os.read(wake, 4096)
                    last_scan = 0.0  # rescan now
                if fd not in ready:
                    continue
                # Read every stack first, in one C call, before anything that lets go of
                # the GIL (os.read does): the ticking thread must not run on past its tick,
                # and no thread may run while its frames are read (see frames.py).
                stacks = current_stacks()
                labels = all_thread_labels()  # at once: a worker may end its request next
                ticks = self._read_ticks(fd, keys)
                if ticks:
                    self._deliver(ticks, stacks, labels)
                    period = self.tick_period_ns()
                    for ident in ticks:
                        ticker = tickers[ident][1]
                        ticker.period_ns = period
                        ticker.rearm()
                del stacks
        finally:
            for _, ticker in tickers.values():
                ticker.close()
            with self._lock:
                if not self._captures:
                    self._delete_main_timer()
            self._drain(fd)

    def _adapt_switch_interval(
        self, now: float, targets: dict[int, int], my_ident: int, ours: set[int], first: bool
    ) -> float:
        """Lower the switch interval only while it buys accuracy (issue 8, item 14); return
        the seconds until the next rescan: :data:`_RESCAN_S` while a thread read from outside
        runs, after the first reading of a capture (``first``) and after a reading that found
        a new thread (to judge it at the next one), else :data:`_IDLE_RESCAN_S`.

        The low interval exists so that a thread whose CPU burst is shorter than the
        interpreter's 5 ms lets us read its frame before the burst ends. It costs nothing
        while threads take turns (bursts, then waits), but threads that all want the GIL at
        once would hand it over every 0.1 ms (measured: x1.42-1.46 CPU for two CPU-bound
        threads). And while they contend, the default interval's forced hand-offs already
        stop them inside their CPU-bound code, where the samples belong. So the low
        interval stays unless two or more threads are CPU-bound (:data:`_BUSY_SHARE`) and
        together keep the GIL busy (:data:`_CONTENDED_SHARE` of the last rescan's wall
        time). A thread's share is its own CPU clock's, plus, for a thread that used
        :data:`_CANDIDATE_SHARE` of a core or more, the time it waited runnable for a CPU:
        where workers outnumber cores, contending threads hold the GIL all the time but get
        only part of a core (measured: two of them beside one busy process on their core
        read 0.5 of a core between them, and had the low interval all capture long).

        Nor is it lowered when no thread read from outside runs at all (:data:`_ACTIVE_SHARE`):
        the main thread takes its own ticks (exact whatever the interval), and our own
        threads are not what a profile is for. An asyncio service whose only busy thread is
        its loop then keeps the interpreter's interval: measured side by side, the low one
        made the samplers' threads wake every 0.1 ms for the GIL whenever the loop was off
        its core (2-5 us of CPU per request of a busy uvicorn sharing its core).
        """
        busy = 0
        total = 0.0
        active = fresh = False
        main = self._main_ident if self._main_by_signal else None
        elapsed = now - self._cpu_at
        seen: dict[int, int] = {}
        delays: dict[int, int] = {}
        for ident, tid in targets.items():
            if ident == my_ident:
                continue  # our own reading is not contention we could avoid
            cpu = _thread_cpu_ns(tid)
            if cpu is None:
                continue
            seen[tid] = cpu
            prev = self._cpu_seen.get(tid)
            if prev is None or elapsed <= 0:
                # A thread new to us: its run-queue wait too, so the next rescan has a base,
                # and that rescan soon, to judge it (Thread.start() woke us for it).
                if (delay := _thread_run_delay_ns(tid)) is not None:
                    delays[tid] = delay
                fresh = fresh or ident not in ours
                continue
            share = (cpu - prev) / 1e9 / elapsed
            if share >= _ACTIVE_SHARE and ident != main and ident not in ours:
                active = True
            if share >= _CANDIDATE_SHARE and (delay := _thread_run_delay_ns(tid)) is not None:
                delays[tid] = delay
                before = self._delay_seen.get(tid)
                if before is not None:
                    share += (delay - before) / 1e9 / elapsed
            if share > _BUSY_SHARE:
                busy += 1
                total += share
        self._delay_seen = delays
        self._cpu_seen, self._cpu_at = seen, now
        if first or elapsed > 2 * _IDLE_RESCAN_S:
            self._contended, self._calm = False, 0
            return (
                _RESCAN_S  # shares since a reading long ago (the previous capture) say nothing now
            )
        rescan_s = _RESCAN_S if active or fresh else _IDLE_RESCAN_S
        with self._lock:
            if self.switch_interval is None or not self._captures:
                return rescan_s
            want_low = active and not self._still_contended(busy > 1 and total >= _CONTENDED_SHARE)
            if want_low != self._holding_switch:
                self._holding_switch = want_low
                _switch.want(id(self), self.switch_interval if want_low else None)
        return rescan_s

    def _still_contended(self, contended: bool) -> bool:
        """Return whether threads contend for the GIL, given this reading's ``contended``: a
        reading that says they stopped counts only when :data:`_CALM_READINGS` in a row do
        (two contending threads may take turns within one 50 ms reading, and each reading
        that says they stopped would hand the GIL over every 0.1 ms until the next one)."""
        if contended:
            self._calm = 0
        elif self._contended:
            self._calm += 1
            contended = self._calm < _CALM_READINGS
        self._contended = contended
        return contended

    def _arm_main(self, tid: int) -> bool:
        """Arm the main thread's ticker if it is wanted; return False if that failed."""
        # The main thread takes its own ticks in our SIGPROF handler (exact frames). Its
        # ticker exists only while a capture runs and the handler is ours (see the class doc).
        with self._lock:
            if self._main_timer is None and self._captures and self._main_by_signal:
                self._main_timer = cputicks.open_ticker(
                    tid, self.tick_period_ns(), tid, 0, perf_signal=_SIGNAL
                )
                return self._main_timer is not None
        return True

    def _read_ticks(self, fd: int, keys: dict[int, int]) -> dict[int, int]:
        ticks: dict[int, int] = {}
        size = cputicks.SIGINFO_SIZE
        while True:
            try:
                buf = os.read(fd, size * 64)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            for off in range(0, len(buf) - size + 1, size):
                key, overrun = cputicks.tick_key(buf, off)
                ident = keys.get(key)
                if ident is not None:
                    ticks[ident] = ticks.get(ident, 0) + 1 + overrun
                    self.ticks += 1 + overrun
                    self.overruns += overrun
            if len(buf) < size * 64:
                break
        return ticks

    def _drain(self, fd: int) -> None:
        # Signals already queued for this thread must not be read by the next capture.
        try:
            while os.read(fd, cputicks.SIGINFO_SIZE * 64):
                pass
        except OSError:
            pass

    # Elsewhere: poll thread CPU clocks

    def _run_polling(self) -> None:
        while self._idle():
            last: dict[int, int] = {}
            interval = self.period_ns / 1e9
            while self._captures:
                time.sleep(interval)
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
                    self._deliver(ticks, current_stacks(list(ticks)), all_thread_labels())


# --- process lifecycle: exit and fork -------------------------------------------------------

_atexit_registered = False


def _at_exit_once() -> None:
    global _atexit_registered
    if not _atexit_registered:
        _atexit_registered = True
        atexit.register(_stop_all_at_exit)


def _stop_all_at_exit() -> None:
    """End every capture before the interpreter resets signal handlers (a tick after that
    would take the default, fatal, action)."""
    for s in list(_samplers.values()):
        s.close(timeout=1.0)


_forked_native_ids: dict[int, int] = {}
"""The forking thread's kernel tid in a child: 3.11's threading keeps the parent's."""


def _after_fork_in_child() -> None:
    global _samplers_lock
    _samplers_lock = threading.Lock()
    _forked_native_ids.clear()
    _forked_native_ids[threading.get_ident()] = threading.get_native_id()
    cputicks.after_fork_in_child()
    for s in _samplers.values():
        s.after_fork_in_child()
    _switch.after_fork_in_child()


_samplers: dict[tuple[int, float | None], Sampler] = {}
_samplers_lock = threading.Lock()


def get_sampler(hz: int, switch_interval: float | None) -> Sampler:
    """Return the process's sampler for this rate (one sampler thread serves all captures)."""
    key = (hz, switch_interval)
    with _samplers_lock:
        s = _samplers.get(key)
        if s is None:
            s = _samplers[key] = Sampler(hz, switch_interval)
            threads.start_listeners.append(s.thread_started)
        return s


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
