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
same future (it cannot move without being woken), so a tick costs little per idle task.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import chains, frames, labels, tasks, waits
from .concurrency import Window, is_own_thread, run_in_thread
from .model import Labels, ProfileData, Sample, Stack, ValueType

if TYPE_CHECKING:
    from .options import Options

__all__ = ["HZ", "Capture", "FgprofSampler", "get_sampler", "profile", "to_profile"]

HZ = 99
"""fgprof's rate: 99 samples per second of wall time (off 100 Hz, to avoid lockstep)."""

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
    counts: dict[Key, list[int]] = field(default_factory=dict)
    ticks: int = 0


class _Threads(chains.ThreadStacks):
    """chains' thread stacks, read with :func:`frames.current_stacks` (no frame kept)."""

    def __init__(self, stacks: dict[int, Stack]) -> None:
        self.stacks = stacks
        self.refreshes = 0

    def refresh(self) -> None:
        me = threading.get_ident()
        self.stacks = {i: frames.resolve(r) for i, r in frames.current_stacks().items() if i != me}


_FUT_WAITER = "_fut_waiter"


class FgprofSampler:
    """The sampler thread and its subscribers; subscribe/unsubscribe from any thread."""

    def __init__(self, hz: int = HZ) -> None:
        self.interval = 1.0 / hz
        self._lock = threading.Lock()
        self._subs: list[Capture] = []
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        # task -> (its waiter, its key): a suspended task's reading, kept while it waits
        # on the same future. Holds the task and waiter, so neither id is reused.
        self._cache: dict[Any, tuple[Any, Key]] = {}
        self.errors = 0

    def subscribe(self) -> Capture:
        """Return a new capture that starts now; starts the thread if none runs."""
        cap = Capture()
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
        keys = self._sample()
        counted = Counter(keys)
        now = time.perf_counter_ns()
        with self._lock:
            subs = list(self._subs)
        for cap in subs:
            if cap.end_mono is not None:
                continue
            elapsed = now - cap.last_ns
            cap.last_ns = now
            cap.ticks += 1
            acc = cap.counts
            for k, n in counted.items():
                got = acc.get(k)
                if got is None:
                    acc[k] = [n, n * elapsed]
                else:
                    got[0] += n
                    got[1] += n * elapsed

    def _sample(self) -> list[Key]:
        """Return one key per live thread and task, read now."""
        me = threading.get_ident()
        names = {t.ident: t.name for t in threading.enumerate()}
        stacks = {
            ident: frames.resolve(raw)
            for ident, raw in frames.current_stacks().items()
            if ident != me and not is_own_thread(names.get(ident, ""))
        }
        keys: list[Key] = []
        busy = self._sample_tasks(stacks, names, keys)
        for ident, stack in stacks.items():
            if ident in busy:
                continue  # its running task was sampled as the task
            name = names.get(ident, f"thread {ident}")
            state = "waiting" if waits.thread_wait(stack) else "running"
            own = labels.thread_labels(ident)
            keys.append(
                (stack, _merge(own, ("kind", "thread"), ("state", state), ("thread", name)))
            )
        return keys

    def _sample_tasks(
        self, stacks: dict[int, Stack], names: dict[Any, str], keys: list[Key]
    ) -> set[int]:
        loops = {id(lp): lp for lp in tasks.known_loops()}
        if not loops:
            self._cache.clear()
            return set()
        all_tasks = tasks._all_tasks()
        old = self._cache
        cache: dict[Any, tuple[Any, Key]] = {}
        threads: _Threads | None = None
        loop_info: dict[int, tuple[float | None, int | None, str]] = {}
        busy: set[int] = set()
        for task, waiter in zip(all_tasks, map(_waiter_of, all_tasks), strict=True):
            hit = old.get(task)
            if hit is not None and waiter is not None and hit[0] is waiter:
                cache[task] = hit
                keys.append(hit[1])
                continue
            try:
                if task.done():
                    continue
                loop = task.get_loop()
            except Exception:
                continue
            if id(loop) not in loops:
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
            own = labels.task_labels(task)
            key = (got.stack, _merge(own, ("kind", "task"), ("state", state), ("thread", info[2])))
            keys.append(key)
            if state != "running" and waiter is not None and _waiter_of(task) is waiter:
                cache[task] = (waiter, key)
        self._cache = cache
        return busy


def _waiter_of(task: Any) -> Any:
    return getattr(task, _FUT_WAITER, None)


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
        samples=[Sample(stack=k[0], values=list(v), labels=k[1]) for k, v in cap.counts.items()],
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
