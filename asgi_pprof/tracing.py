"""The execution trace: what every thread and event loop did, moment by moment.

``capture(seconds, window, options)`` hooks the process for the length of the window
and returns Chrome Trace Event Format JSON (written by ``trace_events``). Hooked, and
only while a capture runs:

* ``asyncio.Handle._run`` (class attribute): every callback or task step an asyncio
  event loop of this process runs, timed with ``perf_counter_ns`` by the step hook
  (``trace_hook``: in C when built, else one flat Python function). A task's first
  step in the capture also records it as created
  and finds the HTTP request it serves (``trace_routes``), before the step runs. uvloop
  runs its own (Cython) handles: its steps are not seen.
* on uvloop only, the task factory of the loop the request runs on (asyncio loops need
  none: the step hook sees their tasks): when tasks are created and finish.
* ``gc.callbacks``: every collection, its generation, duration and what it collected.
* the CPU profiler's sampler (``sampler.get_sampler``, shared with ``/profile``),
  subscribed with a timeline: one stack per tick of every thread's CPU clock, read by
  the main thread itself in its ``SIGPROF`` handler (no GIL bias): the CPU tracks.
* wall-clock samples of every thread's stack, read in one C call
  (``frames.current_code_stacks``): at 50 Hz (what threads wait on), taken in the main
  thread's CPU ticks while it burns CPU (the GIL held already: no hand-over, and the loop
  is seen where its CPU goes), else by a sampler thread (``asgi_pprof-trace``), which also
  samples at ``trace_sample_hz`` while a loop step runs long (where the loop was stuck,
  blocking calls included). Each of its wake-ups takes the GIL from the running threads,
  which costs more than the sample itself: it wakes once per sample, no more.

Everything is put back the moment the window ends, however it ends (the client
disconnects, the server shuts down, the request is cancelled); the JSON is written in a
worker thread, and only for a client still there. One capture at a time: a second
request gets Go's 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, cast

from . import trace_hook
from .concurrency import THREAD_PREFIX, is_own_thread, run_in_thread
from .frames import code_stack, current_code_stacks
from .profiles import ProfileError
from .sampler import Capture, Sampler, get_sampler
from .trace_events import DONE, GC, NEW, SAMPLE, LoopInfo, RawTrace, render
from .trace_hook import Hook, code_of
from .trace_routes import Requests

if TYPE_CHECKING:
    from ._tracestep import StepCapture
    from .concurrency import Window
    from .options import Options

__all__ = ["BUSY", "capture", "is_capturing"]

log = logging.getLogger("asgi_pprof")

BUSY = "Could not enable tracing: runtime error: tracing is already enabled"
"""Go's text for a trace requested while another one runs."""

_now = time.perf_counter_ns
_get_ident = threading.get_ident

_lock = threading.Lock()
_active: _Recorder | None = None
"""The running capture (its task factory and done callbacks check they are still it)."""
_native_hook: bool | None = None
"""Which step hook captures install: None for the C one when loaded (``trace_hook``);
the tests and the benchmark set True or False to compare the two."""

_TAKE_CHUNK = 4096
"""Records :meth:`_Recorder.all_records` takes from the C hook per call (~1.4 ms of GIL)."""

_IDLE_HZ = 50
"""Wall-clock sampling rate while no loop step runs long (then ``trace_sample_hz``)."""


_UVLOOP_NOTE = (
    "loop {type} does not run asyncio.Handle callbacks (uvloop runs its own, in C): its "
    "steps are not shown, so neither are its callbacks, slow steps, nor which request a "
    "stretch of the loop's time served. Shown: task creation and completion (named after "
    "the request a task serves), the thread's CPU track (time in uvloop's C code, its "
    "polling included, is the [uvloop] frame) and wall-clock samples, and GC."
)
_ASYNCIO_NOTE = (
    "On asyncio loops a task is recorded as created at its first step in the capture (at "
    "most one loop iteration after asyncio created it); tasks started eagerly "
    "(eager_task_factory) show from their second step on."
)


def is_capturing() -> bool:
    """Return True while a trace capture runs in this process."""
    return _active is not None


def _threads_cpu_ns() -> dict[int, int]:
    """Return ``ident -> CPU ns`` of every thread, from its CPU clock (Linux; else empty).

    The clock id is built from the kernel thread id (``CPUCLOCK_SCHED`` of that thread),
    never from a ``pthread_t`` that a thread exiting meanwhile would free.
    """
    out: dict[int, int] = {}
    if not sys.platform.startswith("linux"):
        return out
    for th in threading.enumerate():
        tid = th.native_id
        if th.ident is None or tid is None:
            continue
        try:
            out[th.ident] = time.clock_gettime_ns(((~tid) << 3) | 4 | 2)
        except OSError:  # it has just ended
            continue
    return out


def _task_state(task: asyncio.Future[Any]) -> str:
    """Return how a finished task ended, without retrieving its exception.

    ``Task.exception()`` would mark the exception retrieved, and asyncio would no longer
    log "Task exception was never retrieved" for it: the trace must not change that.
    """
    if task.cancelled():
        return "cancelled"
    return "exception" if getattr(task, "_exception", None) is not None else "result"


class _Recorder:
    """Collects one capture's raw records, bounded in all: :attr:`records`, and the C step
    hook's steps and task ends, held in C until the trace is written (:meth:`all_records`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, options: Options) -> None:
        self.loop = loop
        self.limit = options.trace_max_events
        self.hz = options.trace_sample_hz
        self._cpu_hz = options.trace_cpu_hz
        self.cpu_period_ns = 1_000_000_000 // options.sample_hz
        """The CPU ticks' mean period as the capture ended (the sampler's at the rate a
        concurrent CPU profile asked for, else ``trace_cpu_hz``'s)."""
        self.records: list[Any] = []
        self.late_names: dict[int, str] = {}
        self.step_start = 0
        """When the running loop step started, written by the Python step hook."""
        self.step_end = 0
        """When the last loop step ended (``perf_counter_ns``), written by the Python step hook."""
        self.hook: Hook | None = None
        """The step hook while installed (it tells when steps start and end)."""
        self.step_code: types.CodeType | None = None
        self.skip_codes: frozenset[types.CodeType] = frozenset()
        self.truncated_ns: int | None = None
        self.dropped = 0
        self.loops: dict[int, tuple[asyncio.AbstractEventLoop, int]] = {}
        self.last_loop: object = None
        self.requests = Requests()
        self.request_of = self.requests.of_task  # read by the step hook on every task step
        self.steps_visible = isinstance(loop, asyncio.BaseEventLoop)
        self.seen: set[int] = set()
        """Ids of the tasks whose first step in this capture was seen (until they finish)."""
        self.existing = {id(t) for t in asyncio.all_tasks(loop)} if self.steps_visible else set()
        """Ids of the request loop's tasks made before the capture, not yet stepped."""
        self.tasks_at_start = (
            len(self.existing) if self.steps_visible else len(asyncio.all_tasks(loop))
        )
        self.threads: dict[int, tuple[int | None, str]] = {}
        self._gc_t0 = 0
        self._gc_callback: Callable[[str, dict[str, int]], None] = self.on_gc
        """The ``gc.callbacks`` entry: :meth:`on_gc`, or the C capture's twin of it."""
        self._task_requests: Requests | StepCapture = self.requests
        """What finds a new task's request and labels it when done (``task_created``,
        ``finished``): ``requests`` itself, or the C capture's twins (the same dicts)."""
        self._prev_factory: Any = None
        self._watched: weakref.WeakSet[asyncio.Future[Any]] = weakref.WeakSet()
        self._stopped = threading.Lock()
        """Held until the capture ends: the sampler thread's wait (see :meth:`_sample`)."""
        self._stopped.acquire()
        self._sampler: threading.Thread | None = None
        self._current: dict[int, list[Any]] = {}
        """Each thread's open sample record (extended while its stack stays the same)."""
        self._skip: set[int] = set()
        """Threads the wall-clock samples leave out (ours), refreshed by the sampler thread."""
        self._sampling = threading.Lock()
        """Held while a wall-clock sample is taken: by the sampler thread, or tried by the
        main thread's CPU tick (:meth:`_on_main_tick`), which skips it when taken."""
        self._sampled_ns = 0
        """When the last wall-clock sample was taken (``perf_counter_ns``), by either."""
        self._tick_sampled_ns = 0
        """When the last one was taken in a CPU tick."""
        self.tick_samples = 0
        """Wall-clock samples taken in the main thread's CPU ticks (the others: the thread's)."""
        self.tick_error: BaseException | None = None
        """What ended the tick samples, if something did (logged when the capture ends)."""
        self._cpu_sampler: Sampler = get_sampler(options.sample_hz, options.switch_interval)
        self._cpu: Capture | None = None
        self.cpu_exact: int | None = None
        """Ident of the thread whose CPU ticks are exact (the main thread's own SIGPROF)."""
        self.cpu_ns: dict[int, int] = {}
        """``ident -> CPU ns`` each thread burnt during the capture."""
        self._cpu_start: dict[int, int] = {}
        self.loop_ident = _get_ident()  # made on the loop's thread
        self.start_ns = _now()
        self.wall_start = time.time()
        self.end_ns = self.start_ns

    # --- the bound --------------------------------------------------------------------

    @property
    def _capture(self) -> StepCapture | None:
        """The C step hook's capture while it is this recorder's hook, else None."""
        return self.hook.capture if self.hook is not None else None

    def count(self) -> int:
        """Return how many records the capture holds: the list's, and the C hook's steps
        and task ends it holds in C until the trace is written (see :meth:`all_records`)."""
        capture = self._capture
        return len(self.records) + (capture.held() if capture is not None else 0)

    def all_records(self) -> list[Any]:
        """Return every record: :attr:`records`, with the C hook's held ones moved into it
        (made into tuples here, by the trace's writer, not on the loop)."""
        capture = self._capture
        # A chunk at a time: one C call holds the GIL (~340 ns a record, 70 ms for 200 000),
        # and between two calls the loop takes it back.
        while capture is not None and capture.held():
            self.records.extend(capture.take_records(_TAKE_CHUNK))
        return self.records

    def full(self, t: int) -> bool:
        """Return True (and count a dropped record) once the capture holds ``limit`` records."""
        if self.count() < self.limit:
            return False
        if self.truncated_ns is None:
            self.truncated_ns = t
        self.dropped += 1
        return True

    # --- hooks ------------------------------------------------------------------------

    def see_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Remember a loop seen running a step (called by the step hook, in its thread)."""
        self.last_loop = loop
        if id(loop) not in self.loops:
            self.loops[id(loop)] = (loop, _get_ident())

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        """Record one collection (a ``gc.callbacks`` entry)."""
        t = _now()
        if phase == "start":
            self._gc_t0 = t
            return
        if self.full(t):
            return
        self.records.append(
            (
                GC,
                _get_ident(),
                self._gc_t0 or t,
                t,
                info.get("generation", -1),
                info.get("collected", 0),
                info.get("uncollectable", 0),
            )
        )

    def task_factory(
        self,
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, Any] | Generator[Any, None, Any],
        **kwargs: Any,
    ) -> asyncio.Task[Any]:
        """Create a task as the loop would, and record its creation."""
        prev = self._prev_factory
        task: asyncio.Task[Any]
        if prev is not None:
            task = cast("asyncio.Task[Any]", prev(loop, coro, **kwargs))
        else:
            task = asyncio.Task(coro, loop=loop, **kwargs)
        if _active is not self:
            # Someone set a factory over ours during the capture and still calls ours:
            # after it, we only pass tasks through (and keep nothing).
            return task
        t = _now()
        if not self.full(t):
            code = code_of(coro)
            req = self._task_requests.task_created(id(task), coro, code)
            # The name may still change (3.11/3.12 set it after the factory returns): the
            # task's completion, or the end of the capture (see read_names), tells.
            self.records.append(
                (NEW, _get_ident(), t, id(loop), task.get_name(), code, id(task), req)
            )
            if task.done():
                self._on_done(task)
            elif not self.steps_visible:
                task.add_done_callback(self._on_done)
                self._watched.add(task)
        return task

    def first_step(self, task: asyncio.Task[Any]) -> None:
        """Note a task's first step in this capture, before it runs (asyncio loops only).

        A task of the request's loop that did not exist when the capture started is
        recorded as created now: for a task, its first step follows its creation within
        one loop iteration, and watching steps costs less than a task factory would.
        """
        key = id(task)
        self.seen.add(key)
        coro = task.get_coro()
        code = getattr(coro, "cr_code", None) or code_of(coro)
        req = self.requests.task_created(key, coro, code)
        if key in self.existing:
            self.existing.discard(key)  # a later task with this id is a new one
            return
        if task.get_loop() is not self.loop:
            return  # creation is tracked on the loop that serves the trace request
        t = _now()
        if self.count() < self.limit:
            name = task.get_name()
            self.records.append((NEW, _get_ident(), t, id(self.loop), name, code, key, req))
        else:
            self.full(t)

    def _on_done(self, task: asyncio.Future[Any]) -> None:
        if _active is not self:
            return
        t = _now()
        req = self.request_of.get(id(task))
        if req is not None:
            self._task_requests.finished(req)
        if self.full(t):
            return
        get_name = getattr(task, "get_name", None)
        name = get_name() if get_name is not None else "?"
        coro = getattr(task, "get_coro", lambda: None)()
        self.records.append(
            (
                DONE,
                _get_ident(),
                t,
                id(task.get_loop()),
                name,
                code_of(coro),
                id(task),
                req,
                _task_state(task),
            )
        )

    # --- the sampler thread -------------------------------------------------------------

    def _refresh_threads(self) -> set[int]:
        skip = set()
        for th in threading.enumerate():
            if th.ident is None:
                continue
            self.threads[th.ident] = (th.native_id, th.name)
            if is_own_thread(th.name):
                skip.add(th.ident)
        return skip

    def _learn_threads(self, idents: dict[int, Any]) -> set[int]:
        """Record the threads among ``idents`` not seen before (as :meth:`_refresh_threads`
        does for all) and return which of them are ours, without ``threading.enumerate()``:
        in a signal handler, the code it interrupted may hold the lock that takes. Read from
        threading's own table (ident -> Thread) under the GIL instead. While the ticks take
        the samples the sampler thread does not refresh: a thread that starts and ends then
        would otherwise have no name in the trace."""
        table: dict[int, threading.Thread] = getattr(threading, "_active", {})
        ours = set()
        for ident in idents:
            if ident in self.threads or (th := table.get(ident)) is None:
                continue
            self.threads[ident] = (th.native_id, th.name)
            if is_own_thread(th.name):
                ours.add(ident)
        return ours

    def _sample(self) -> None:
        me = _get_ident()
        fast = 1 / self.hz
        slow = max(fast, 1 / _IDLE_HZ)
        fast_ns = 1_000_000_000 // self.hz
        refresh_at = 0
        stopped = self._sample_wait()
        while not stopped(fast if self._stalled(fast_ns) else slow, fast_ns):
            now = _now()
            if now >= refresh_at:
                self._skip = self._refresh_threads() | {me}
                refresh_at = now + 100_000_000
            with self._sampling:
                self._sample_once(self._current, self._skip)
                self._sampled_ns = now

    def _sample_wait(self) -> Callable[[float, int], bool]:
        """Return the wait between two samples: ``wait(timeout, stall_ns)`` is True once
        stopped.

        One wake-up per sample: every wake-up takes the GIL from the threads that run,
        which costs more than the sample itself. With the C hook, its capture's wait: the
        GIL is then handed over by the next loop step rather than raced for
        (StepCapture.wait: ~400 futile wake-ups per sample without it), and none is taken
        while the main thread's CPU ticks take the samples (:meth:`_on_main_tick`) unless
        a loop step has run ``stall_ns``. Else a lock released at the stop, so the wait
        sees it at once; one C call, about half the CPU of an Event.wait (a Condition's
        waiter lock, made and dropped in Python).
        """
        capture = self._capture
        if capture is not None:
            wait: Callable[[float, int], bool] = capture.wait
            return wait
        return self._stop_wait

    def _stop_wait(self, timeout: float, stall_ns: int) -> bool:
        # StepCapture.wait's rules, with the GIL taken at each look (the Python hook's).
        period = int(timeout * 1e9)
        while not self._stopped.acquire(timeout=timeout):
            now = _now()
            if (stall_ns > 0 and self._stalled(stall_ns)) or now - self._tick_sampled_ns >= period:
                return False
            timeout = (self._tick_sampled_ns + 2 * period - now) / 1e9
        return True

    def _on_main_tick(self, frame: types.FrameType) -> None:
        """Take a wall-clock sample in the main thread's CPU tick, at most one per idle period.

        The tick's ``SIGPROF`` handler holds the GIL already: a sample here needs no
        hand-over, where the sampler thread's each cost the loop a GIL turn and the
        process ~0.3 ms of CPU (measured on a traced busy uvicorn: 14-16 ms of the
        sampler thread's CPU a second at 50 samples, a quarter of it context switches).
        The main thread's own stack is read from the interrupted ``frame`` (below this
        handler), every other thread's as the sampler thread reads it. The sampler thread
        sleeps on while these come (``StepCapture.note_sample``), and samples itself
        while the main thread idles, or when a loop step stalls (the finer rate).
        """
        if _active is not self or self.tick_error is not None:
            return
        now = _now()
        # One per period of its own (less half a tick: the first tick after it, ~a period
        # on average), and not within half a period of the thread's last: the thread's
        # wait defers only to the ticks' samples, so they must come in between.
        period = 1_000_000_000 // _IDLE_HZ
        own = period - self._cpu_sampler.tick_period_ns() // 2
        if now - self._tick_sampled_ns < own or now - self._sampled_ns < period // 2:
            return
        if not self._sampling.acquire(blocking=False):
            return  # the sampler thread is sampling, or this handler interrupted itself
        try:
            self._sample_once(self._current, self._skip, (_get_ident(), frame))
            self._sampled_ns = self._tick_sampled_ns = now
            self.tick_samples += 1
            capture = self._capture
            if capture is not None:
                capture.note_sample()
        except Exception as e:  # in a signal handler: never into the interrupted code
            self.tick_error = e
        finally:
            self._sampling.release()

    def _stalled(self, after_ns: int) -> bool:
        """Return True while a loop step has been running for ``after_ns`` or longer."""
        hook = self.hook
        if hook is None:
            return False
        start, end = hook.step_times()
        return start > end and _now() - start >= after_ns

    def _sample_once(
        self,
        current: dict[int, list[Any]],
        skip: set[int],
        own: tuple[int, types.FrameType] | None = None,
    ) -> None:
        """Read every thread's stack once; a stack that did not change extends its record.

        The stacks are read in one C call (``frames.current_code_stacks``: only the code
        objects, which is all a sample keeps): no other thread's frame is ever held while
        that thread may run. ``own``: (this thread's ident, the frame its stack is read
        from), for a sample taken in a signal handler (not the handler's own frames).
        """
        stacks = current_code_stacks()
        if own is not None:
            stacks[own[0]] = code_stack(own[1])
            skip.update(self._learn_threads(stacks))  # ours started since the last refresh
        t = _now()
        hook = self.hook
        steps_done = hook.step_times()[1] if hook is not None else 0
        step_code = self.step_code
        records = self.records
        for ident, stack in stacks.items():
            if ident in skip:
                continue
            cur = current.get(ident)
            # The same stack, seen once more: the same record, unless it is inside a loop
            # step and a step ended meanwhile (then it is most likely another step that
            # runs the same code, and each step gets only what was seen during it).
            if (
                cur is not None
                and cur[4] == stack
                and (cur[5] == steps_done or step_code not in stack)
            ):
                cur[3] = t
                cur[5] = steps_done
                continue
            if self.full(t):
                continue
            cur = [SAMPLE, ident, t, t, stack, steps_done]
            records.append(cur)
            current[ident] = cur
        for ident in [i for i in current if i not in stacks]:
            # The thread ended: close its flame chart here.
            del current[ident]
            if not self.full(t):
                records.append([SAMPLE, ident, t, t, (), steps_done])

    def _sampler_main(self) -> None:
        try:
            self._sample()
        except Exception:  # a sampler must never die silently
            log.exception("asgi_pprof: the trace sampler failed; the trace has no more samples")

    # --- install / uninstall ----------------------------------------------------------

    def install(self) -> None:
        """Hook the process (on the loop's thread). Undo with :meth:`uninstall`."""
        global _active
        self._refresh_threads()
        if not self.steps_visible:
            # uvloop runs its own handles: the step hook never sees its tasks, a factory does.
            self._prev_factory = self.loop.get_task_factory()
            self.loop.set_task_factory(self.task_factory)
        hook = self.hook = trace_hook.install(self, _native_hook)
        self.step_code, self.skip_codes = hook.step_code, hook.skip_codes
        # With the C hook its capture records collections in C: under load young ones run
        # thousands of times a second, and this Python callback cost ~1 % of the loop.
        if hook.capture is not None:
            self._gc_callback = hook.capture.on_gc
            # And the task factory's per-task work (uvloop, whose steps are not seen): the
            # request a task serves, found without a frame or f_locals, and its label.
            self._task_requests = hook.capture
        gc.callbacks.append(self._gc_callback)
        _active = self
        # The CPU profiler's sampler (shared with /profile): exact CPU ticks of the main
        # thread from its own SIGPROF handler, other threads' from their CPU timers.
        # The wall-clock samples are taken in the main thread's ticks too while it burns CPU
        # (_on_main_tick): the sampler thread's wait then sleeps on.
        self._cpu = self._cpu_sampler.subscribe(
            timeline=True,
            on_main_tick=self._on_main_tick,
            tick_ns=1_000_000_000 // self._cpu_hz,
        )
        self._cpu_start = _threads_cpu_ns()
        self._sampler = threading.Thread(
            target=self._sampler_main, name=THREAD_PREFIX + "trace", daemon=True
        )
        self._sampler.start()
        # Before the sampler thread's first refresh: the ticks may sample first.
        self._skip = self._refresh_threads()

    def uninstall(self) -> None:
        """Put back everything :meth:`install` changed and stop the sampler, at once.

        Synchronous and cheap (it runs on the loop, also when the client has left): what
        is only needed to write the trace waits for :meth:`raw`.
        """
        global _active
        self.end_ns = _now()
        _active = None
        if self.hook is not None:
            self.hook.stop()
            if self.hook.capture is not None:
                self.hook.capture.stop_waits()
        if self._stopped.locked():
            self._stopped.release()
        if self._cpu is not None:
            # Whether the main thread took its own ticks (exact) or was read from outside.
            # (Sampler keeps it private; asked for a public property.)
            if getattr(self._cpu_sampler, "_main_by_signal", False):
                self.cpu_exact = threading.main_thread().ident
            self.cpu_period_ns = self._cpu_sampler.tick_period_ns()  # as it ended
            self._cpu_sampler.unsubscribe(self._cpu)  # cheap, synchronous
            end = _threads_cpu_ns()
            self.cpu_ns = {
                i: ns - self._cpu_start[i] for i, ns in end.items() if i in self._cpu_start
            }
            self._cpu_sampler.release_signal()
        if self.tick_error is not None:
            log.warning(
                "asgi_pprof: the trace's wall-clock samples in CPU ticks failed; the "
                "sampler thread took them from then on",
                exc_info=self.tick_error,
            )
        try:
            if self.hook is not None and not self.hook.uninstall():
                log.warning("asgi_pprof: asyncio.Handle._run was replaced during a trace")
        finally:
            with contextlib.suppress(ValueError):
                gc.callbacks.remove(self._gc_callback)
            if self.loop.get_task_factory() == self.task_factory:
                self.loop.set_task_factory(self._prev_factory)
            for task in list(self._watched):
                task.remove_done_callback(self._on_done)
            self._watched = weakref.WeakSet()
            if self._sampler is not None:
                # It wakes at once (the event is set) and finishes at most one sample.
                self._sampler.join(5)
                self._sampler = None
        # Labels come from the scopes of requests still running: read them now, on the
        # loop's thread, while nothing else changes them.
        self.requests.finish_all()
        self._refresh_threads()

    def read_names(self) -> None:
        """Read the names of the tasks still running (on the loop, for a trace to be written)."""
        self.late_names = {id(t): t.get_name() for t in asyncio.all_tasks(self.loop)}

    def forget_in_child(self) -> None:
        """In a child forked during the capture: put back the step hook and the gc callback
        (no capture runs there: the capture's task, its window and its sampler thread stay
        in the parent), and drop what was recorded."""
        if self.hook is not None:
            self.hook.uninstall()
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._gc_callback)
        self.discard()

    def discard(self) -> None:
        """Drop everything recorded (the client left: nothing will be written)."""
        if self._capture is not None:
            self._capture.drop_records()
        self.records = []
        self.loops = {}
        self.requests = Requests()
        self._cpu = None

    def raw(self, ended_early: bool) -> RawTrace:
        """Return the records as a :class:`RawTrace` (after :meth:`uninstall`; any thread)."""
        loops: list[LoopInfo] = []
        seen = dict(self.loops)
        seen.setdefault(id(self.loop), (self.loop, self.loop_ident))
        notes = []
        for loop_id, (loop, ident) in seen.items():
            visible = isinstance(loop, asyncio.BaseEventLoop)
            slow = getattr(loop, "slow_callback_duration", 0.1)
            loops.append(
                LoopInfo(
                    loop_id=loop_id,
                    type_name=f"{type(loop).__module__}.{type(loop).__qualname__}",
                    ident=ident,
                    steps_visible=visible,
                    slow_ns=int(slow * 1e9),
                    tasks_at_start=self.tasks_at_start if loop is self.loop else -1,
                )
            )
            if not visible:
                notes.append(_UVLOOP_NOTE.format(type=loops[-1].type_name))
            elif loop is self.loop:
                notes.append(_ASYNCIO_NOTE)
        if len(loops) > 1:
            notes.append(
                "Task creation is tracked on the loop that served the trace request only; "
                "other loops show steps and task completion."
            )
        raw = RawTrace(
            start_ns=self.start_ns,
            end_ns=self.end_ns,
            wall_start=self.wall_start,
            sample_hz=self.hz,
            max_events=self.limit,
            records=self.all_records(),
            step_code=self.step_code,
            skip_codes=self.skip_codes,
            threads=dict(self.threads),
            loops=loops,
            truncated_ns=self.truncated_ns,
            dropped=self.dropped,
            ended_early=ended_early,
            notes=notes,
            request_labels=self.requests.labels,
            cpu_ticks=list(self._cpu.timeline or ()) if self._cpu is not None else [],
            cpu_period_ns=self.cpu_period_ns,
            cpu_exact=self.cpu_exact,
            cpu_ns=self.cpu_ns,
            late_names=self.late_names,
        )
        self._cpu = None
        self.records = []
        self.loops = {}
        return raw


def _after_fork_in_child() -> None:
    # A capture of the parent does not run here: its hooks must not either, and its lock
    # (held by the parent's capture, or by a thread that does not exist here) is free.
    global _active, _lock
    rec, _active = _active, None
    _lock = threading.Lock()
    if rec is not None:
        rec.forget_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


async def capture(seconds: float, window: Window, options: Options) -> bytes:
    """Return a trace of the next ``seconds`` as Chrome Trace Event Format JSON.

    Raises :class:`ProfileError` 500 with Go's text when a trace is already running, and
    500 ``context canceled`` when the window says the client left. The hooks and the
    sampler are removed the moment the window ends, however it ends (its wait may also
    be cancelled); the trace is written, off the loop, only for a client still there.
    When the window ends early (the server shuts down) the trace holds what was
    captured and says so.
    """
    if not _lock.acquire(blocking=False):
        raise ProfileError(500, BUSY)
    try:
        rec = _Recorder(asyncio.get_running_loop(), options)
        t0 = time.monotonic()
        completed = False
        try:
            rec.install()
            completed = await window.wait(seconds)
        finally:
            rec.uninstall()
            if not completed:
                rec.discard()
        if not completed:
            raise ProfileError(500, "context canceled")
        early = time.monotonic() - t0 < seconds - 0.01
        rec.read_names()
        return await run_in_thread(_write, rec, early)
    finally:
        _lock.release()


def _write(rec: _Recorder, ended_early: bool) -> bytes:
    return render(rec.raw(ended_early=ended_early))
