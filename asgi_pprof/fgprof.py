"""fgprof: a wall-clock profile of every thread and every asyncio task, running or waiting.

fgprof's semantics (github.com/felixge/fgprof): about 99 times a second of wall time,
one sample of every thread (running or waiting: a thread parked on an Event counts its
whole wait) and of every asyncio task of every running loop (a suspended task counts its
waiting time at the line it awaits). Sample types ``samples/count`` and
``time/nanoseconds`` (each sample weighs the wall time since the previous one), period
type ``wallclock/nanoseconds``. Labels: ``kind`` (``thread`` or ``task``), ``state``
(``running``, ``waiting``, and ``runnable`` for a woken task not yet stepped), ``thread``
(a thread's name; for a task, the thread of its loop), plus the code's own labels
(:mod:`labels`). A task that is running is sampled as the task, and its thread's sample
is left out, so each moment of each thread counts once.

One sampler thread (``asgi_pprof-fgprof``) serves every concurrent request and ends when
the last one leaves. It never calls into a loop: tasks are read as the goroutine profile
reads them (:mod:`chains`), and a suspended task's reading is kept while it waits on the
same future (it cannot move without being woken), so an idle task costs a few C steps per
reading. With many tasks, readings are spaced so they take about 3 % of a core (at least
one every 0.1 s); between two, each suspended task counts where it was last seen.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import statistics
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import compress, repeat
from typing import TYPE_CHECKING, Any

from . import chains, frames, tasks, waits
from .concurrency import Window, is_own_thread, run_in_thread

# By name from the module: the package exports the function labels(), which shadows the
# module as an attribute of the package.
from .labelling import all_thread_labels, task_labels
from .model import Labels, ProfileData, Sample, Stack, ValueType

if TYPE_CHECKING:
    from .options import Options

__all__ = ["HZ", "Capture", "FgprofSampler", "get_sampler", "profile", "to_profile"]

HZ = 99
"""fgprof's rate: 99 samples per second of wall time (off 100 Hz, to avoid lockstep)."""

TASK_BUDGET = 0.03
"""Share of a core reading tasks should take (3 %): with many tasks they are read less
often than every tick (10 000 idle tasks: ~1-3 ms a reading, so 10-30 times a second),
and between two readings each suspended task counts at the line it was last seen at.
Not lower: a few busy request tasks cost 0.1-1 ms a reading (each new task is read in
full), and at 1 % their readings were spaced out, which miscounted each short await by
up to a reading interval (a 50 ms await's line read 14-30 % off, in CI)."""
COST_READINGS = 5
"""Readings whose median CPU time sets the spacing: one slow reading (a collection, a
burst of new tasks) does not space out the next ones."""
MAX_TASK_INTERVAL = 0.1
"""Longest time between two readings of the tasks (a task that moved or ended is seen
within it; the first reading of many tasks, which reads every one, is the slow one)."""

THREAD_NAME = "asgi_pprof-fgprof"
_log = logging.getLogger("asgi_pprof")

Key = tuple[Stack, Labels]


@dataclass(slots=True)
class Capture:
    """One request's window: sample counts and wall time per (stack, labels)."""

    start_ns: int = field(default_factory=time.time_ns)
    start_mono: float = field(default_factory=time.monotonic)
    end_mono: float | None = None
    last_ns: int = field(default_factory=time.perf_counter_ns)
    counts: dict[int, list[int]] = field(default_factory=dict)
    """Key id -> [samples, time/nanoseconds]; ids index ``keys``."""
    keys: list[Key] = field(default_factory=list)
    ticks: int = 0


class _Threads(chains.ThreadStacks):
    """chains' thread stacks, read with :func:`frames.current_stacks` (no frame kept)."""

    def __init__(self, stacks: dict[int, Stack]) -> None:
        self.stacks = stacks
        self.refreshes = 0

    def refresh(self) -> None:
        me = threading.get_ident()
        self.stacks = {i: frames.resolve(r) for i, r in frames.current_stacks().items() if i != me}


_FUT_WAITER = operator.attrgetter("_fut_waiter")
_FIRST = operator.itemgetter(0)
_SECOND = operator.itemgetter(1)
_MISS = (object(), 0)
"""Cache entry of a task not in it: its waiter is never this object."""
_PACE = 0.001
"""Seconds of fresh task readings between two voluntary releases of the GIL.

Not :func:`concurrency.yield_gil`: its clock runs across ticks, so it would offer the GIL
at the start of a tick's readings, and the loop then moves on between what this tick
read before and after (measured: 4 of 8 label runs saw the running task unlabelled)."""
_PRUNE_EVERY = 16
"""Ticks between two prunings of the task cache (a finished task is freed within 0.16 s)."""


class FgprofSampler:
    """The sampler thread and its subscribers; subscribe/unsubscribe from any thread."""

    def __init__(self, hz: int = HZ) -> None:
        self.interval = 1.0 / hz
        self._lock = threading.Lock()
        self._subs: list[Capture] = []
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        # task -> (its waiter, key id): a suspended task's reading, kept while it waits
        # on the same future. Holds the task and waiter, so neither id is reused. Every
        # capture shares the key table.
        self._cache: dict[Any, tuple[Any, int]] = {}
        self._ticks = 0
        self._next_tasks = 0.0
        self._last_pass: Counter[int] = Counter()
        self._costs: deque[float] = deque(maxlen=COST_READINGS)
        self._last_thread: dict[int, tuple[Stack, Labels, str, int]] = {}
        self._resolved: dict[int, tuple[frames.RawStack, Stack]] = {}
        self._keys: list[Key] = [((), ())]
        self._ids: dict[Key, int] = {}
        self.errors = 0

    def subscribe(self) -> Capture:
        """Return a new capture that starts now; starts the thread if none runs."""
        cap = Capture(keys=self._keys)
        with self._lock:
            self._subs.append(cap)
            if self._thread is None:
                self._wake.clear()
                self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
                self._thread.start()
        return cap

    def unsubscribe(self, cap: Capture) -> threading.Thread | None:
        """End ``cap`` now (cheap, never waits); return the thread if it is ending."""
        with self._lock:
            if cap.end_mono is None:
                cap.end_mono = time.monotonic()
            if cap in self._subs:
                self._subs.remove(cap)
            if self._subs or self._thread is None:
                return None
            ending, self._thread = self._thread, None
            self._wake.set()
            return ending

    # --- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        me = threading.current_thread()
        next_at = time.monotonic()
        while True:
            with self._lock:
                if self._thread is not me:
                    self._cache.clear()
                    self._last_thread.clear()
                    self._resolved.clear()
                    self._last_pass = Counter()
                    self._next_tasks = 0.0
                    self._costs.clear()
                    return
            try:
                self._tick()
            except Exception:  # never die silently, never take the host down
                self.errors += 1
                if self.errors <= 3:
                    _log.exception("fgprof sampler: a tick failed")
            next_at += self.interval
            now = time.monotonic()
            if next_at < now:  # fell behind (a long tick, a busy GIL): no burst to catch up
                next_at = now + self.interval
            if self._wake.wait(next_at - now):
                continue

    def _tick(self) -> None:
        each_tick, task_pass = self._sample()
        # Counters of small ints: no stack is hashed here. Between two readings of the
        # tasks, the suspended ones count where the last reading saw them.
        per_tick = Counter(each_tick)
        if task_pass is not None:
            self._last_pass = Counter(task_pass)
        per_pass = self._last_pass
        now = time.perf_counter_ns()
        with self._lock:
            subs = list(self._subs)
        for cap in subs:
            if cap.end_mono is not None:
                continue
            cap.ticks += 1
            elapsed = now - cap.last_ns
            cap.last_ns = now
            _add(cap.counts, per_tick, elapsed)
            _add(cap.counts, per_pass, elapsed)

    def _intern(self, key: Key) -> int:
        i = self._ids.get(key)
        if i is None:
            i = self._ids[key] = len(self._keys)
            self._keys.append(key)
        return i

    def _sample(self) -> tuple[list[int], list[int] | None]:
        """Return key ids read now: those weighing the time since the last tick (threads,
        running tasks), and suspended tasks' (None when tasks were not read this tick)."""
        me = threading.get_ident()
        names = {t.ident: t.name for t in threading.enumerate()}
        # A thread that did not move has an equal raw stack (same code objects, lines and
        # globals, compared in C): its resolved stack is reused.
        resolved = self._resolved
        stacks: dict[int, Stack] = {}
        raws = frames.current_stacks()
        # Read at once after the stacks (a copy in C): read after the task pass, which
        # gives the GIL back, a worker could have finished its request by then.
        thread_labels = all_thread_labels()
        for ident, raw in raws.items():
            if ident == me or is_own_thread(names.get(ident, "")):
                continue
            known = resolved.get(ident)
            if known is not None and known[0] == raw:
                stacks[ident] = known[1]
            else:
                stack = stacks[ident] = frames.resolve(raw)
                resolved[ident] = (raw, stack)
        if len(resolved) > len(stacks) + 64:  # threads that ended
            for ident in [i for i in resolved if i not in stacks]:
                del resolved[ident]
        ids: list[int] = []
        idle: list[int] | None = None
        busy: set[int] = set()
        start = time.monotonic()
        if start >= self._next_tasks:
            c0 = time.thread_time()
            idle = []
            busy = self._sample_tasks(stacks, ids, idle)
            # Many tasks: read them less often than every tick, so reading them costs about
            # TASK_BUDGET of a core, but at least every MAX_TASK_INTERVAL.
            self._costs.append(time.thread_time() - c0)
            spacing = min(MAX_TASK_INTERVAL, statistics.median(self._costs) / TASK_BUDGET)
            self._next_tasks = start + spacing - self.interval / 2
        else:
            busy = self._sample_running(stacks, ids)
        last = self._last_thread
        seen: dict[int, tuple[Stack, Labels, str, int]] = {}
        for ident, stack in stacks.items():
            if ident in busy:
                continue  # its running task was sampled as the task
            name = names.get(ident, f"thread {ident}")
            own = thread_labels.get(ident, ())
            prev = last.get(ident)
            # Same Frames (cached per code and line) compare by identity: a thread that
            # did not move costs no hashing of its stack.
            if prev is not None and prev[0] == stack and prev[1] is own and prev[2] == name:
                i = prev[3]
            else:
                state = "waiting" if waits.thread_wait(stack) else "running"
                labs = _merge(own, ("kind", "thread"), ("state", state), ("thread", name))
                i = self._intern((stack, labs))
            seen[ident] = (stack, own, name, i)
            ids.append(i)
        self._last_thread = seen
        return ids, idle

    def _sample_running(self, stacks: dict[int, Stack], running: list[int]) -> set[int]:
        """Between two readings of every task: append key ids of the task each loop runs
        now (so a loop thread's time stays the running task's, with its labels); return
        their threads."""
        busy: set[int] = set()
        threads: _Threads | None = None
        for loop in tasks.known_loops():
            try:
                task = asyncio.current_task(loop)  # a dict lookup, safe from any thread
            except Exception:
                continue
            coro: Any = task.get_coro() if task is not None else None
            code = getattr(coro, "cr_code", None)
            if code is None or not getattr(coro, "cr_running", False):
                continue
            if threads is None:
                threads = _Threads(stacks)
            ident = getattr(loop, "_thread_id", None)
            got = threads.running(code, ident if isinstance(ident, int) else None)
            if got is None:
                continue
            labs = _merge(
                task_labels(task),
                ("kind", "task"),
                ("state", "running"),
                ("thread", tasks.loop_thread(loop)),
            )
            running.append(self._intern((got[0], labs)))
            busy.add(got[1])
        return busy

    def _sample_tasks(
        self, stacks: dict[int, Stack], running: list[int], idle: list[int]
    ) -> set[int]:
        """Append key ids of running tasks to ``running``, of the others to ``idle``;
        return the threads running a task."""
        loops = {id(lp): lp for lp in tasks.known_loops()}
        if not loops:
            self._cache.clear()
            return set()
        # The goroutine profile's finder of every task (C copies of asyncio's sets), kept
        # to the running loops' in C: a pending task of a dead loop (kept alive by a
        # reference) would otherwise cost Python steps every reading, which spaces the
        # readings out; 3 000 of them made a finished await count 25-60 % too long.
        all_tasks = _of_loops(tasks._all_tasks(), loops)
        # Every task's waiter and its cache entry, compared in C: an idle task costs a
        # few C steps per tick, no bytecode, no allocation, no stack hashed.
        try:
            waiters = list(map(_FUT_WAITER, all_tasks))
        except AttributeError:  # a task class of its own: the slow way
            waiters = [getattr(t, "_fut_waiter", None) for t in all_tasks]
        cache = self._cache
        entries = list(map(cache.get, all_tasks, repeat(_MISS)))
        same = list(map(operator.is_, map(_FIRST, entries), waiters))
        idle.extend(compress(map(_SECOND, entries), same))
        self._ticks += 1
        if self._ticks % _PRUNE_EVERY == 0:
            # Tasks gone or moved leave the cache (it holds them: they stay alive until then).
            cache = self._cache = dict(compress(zip(all_tasks, entries, strict=True), same))
        threads: _Threads | None = None
        loop_info: dict[int, tuple[float | None, int | None, str]] = {}
        busy: set[int] = set()
        misses = zip(all_tasks, waiters, strict=True)
        give_back = time.perf_counter() + _PACE
        for task, waiter in compress(misses, map(operator.not_, same)):
            if time.perf_counter() >= give_back:
                # Many fresh readings (the first pass over thousands of tasks): hand the
                # GIL back every millisecond, as the goroutine profile's reader does, so a
                # loop waiting for it gets in at once rather than after the switch interval.
                time.sleep(0)
                give_back = time.perf_counter() + _PACE
            try:
                if task.done():
                    continue
                loop = task.get_loop()
            except Exception:
                continue
            info = loop_info.get(id(loop))
            if info is None:
                try:
                    lt: float | None = loop.time()
                except Exception:
                    lt = None
                ident = getattr(loop, "_thread_id", None)
                info = loop_info[id(loop)] = (
                    lt,
                    ident if isinstance(ident, int) else None,
                    tasks.loop_thread(loop),
                )
            if threads is None:
                threads = _Threads(stacks)
            got = chains.read(task, threads, info[0], info[1])
            if got is None:
                continue
            if got.thread is not None:
                state = "running"
                busy.add(got.thread)
            elif got.wait is None:
                state = "waiting"
            else:
                state = "runnable" if got.wait.wait == "runnable" else "waiting"
            own = task_labels(task)
            key = (got.stack, _merge(own, ("kind", "task"), ("state", state), ("thread", info[2])))
            i = self._intern(key)
            (running if state == "running" else idle).append(i)
            if state != "running" and waiter is not None and _waiter_of(task) is waiter:
                # Suspended on this future: it cannot move until woken, and a woken task
                # drops the future (asyncio clears _fut_waiter at the step's start).
                cache[task] = (waiter, i)
        return busy


def _add(acc: dict[int, list[int]], counted: Counter[int], elapsed: int) -> None:
    for k, n in counted.items():
        got = acc.get(k)
        if got is None:
            acc[k] = [n, n * elapsed]
        else:
            got[0] += n
            got[1] += n * elapsed


_GET_LOOP = operator.methodcaller("get_loop")


def _of_loops(found: list[Any], loops: dict[int, Any]) -> list[Any]:
    """Return the tasks of ``found`` whose loop is one of ``loops`` (by id)."""
    try:
        ids = map(id, map(_GET_LOOP, found))
        return list(compress(found, map(loops.__contains__, ids)))
    except Exception:  # a task class of its own: the slow way
        return [t for t in found if id(getattr(t, "_loop", None)) in loops]


def _waiter_of(task: Any) -> Any:
    return getattr(task, "_fut_waiter", None)


def _merge(own: Labels, *ours: tuple[str, str]) -> Labels:
    if not own:
        return ours
    merged = dict(own)
    merged.update(ours)
    return tuple(sorted(merged.items()))


_sampler: FgprofSampler | None = None
_sampler_lock = threading.Lock()


def get_sampler() -> FgprofSampler:
    """Return the process's fgprof sampler (one for every request)."""
    global _sampler
    with _sampler_lock:
        if _sampler is None:
            _sampler = FgprofSampler()
        return _sampler


def to_profile(cap: Capture, hz: int = HZ) -> ProfileData:
    """Return the wall-clock profile of a finished capture."""
    end = cap.end_mono or time.monotonic()
    return ProfileData(
        sample_types=[ValueType("samples", "count"), ValueType("time", "nanoseconds")],
        period_type=ValueType("wallclock", "nanoseconds"),
        period=1_000_000_000 // hz,
        samples=[
            Sample(stack=cap.keys[i][0], values=list(v), labels=cap.keys[i][1])
            for i, v in cap.counts.items()
        ],
        time_nanos=cap.start_ns,
        duration_nanos=int((end - cap.start_mono) * 1e9),
    )


async def profile(
    seconds: float, window: Window, options: Options | None = None
) -> ProfileData | None:
    """Return the wall-clock profile of the next ``seconds``, None if the client left first.

    Unsubscribing is synchronous and cheap; the ending sampler thread is joined and the
    profile built in a worker thread, never on the loop.
    """
    tasks.note_loop()  # the serving loop is known from the first request
    sampler = get_sampler()
    cap = sampler.subscribe()
    try:
        completed = await window.wait(seconds)
    finally:
        ending = sampler.unsubscribe(cap)
    if ending is not None:
        await run_in_thread(ending.join, 2.0)
    if not completed:
        return None
    return await run_in_thread(to_profile, cap)
