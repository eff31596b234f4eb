"""The ``loopstall`` profile: where each event loop was stuck, read while it was stuck.

One watchdog thread (``asgi_pprof-loopstall``) keeps a heartbeat with every running loop
it knows, through the public loop API only (``call_soon_threadsafe``, ``is_running``,
``is_closed``), so it works the same on asyncio and uvloop:

* every ``threshold/2`` it posts a tiny callback to the loop; the loop runs it once it is
  back from whatever it was doing and through its selector, and notes the time;
* when a heartbeat stays unanswered for longer than ``threshold`` (20 ms by default),
  the loop is stalled: the watchdog reads the loop thread's stack
  (``sys._current_frames()``, walked at once) every few ms until the heartbeat comes
  back, and weighs each stack by the time since the previous reading. The running task's
  name and coroutine are labels, with the loop's thread name.

What the numbers mean: a stall is timed from the unanswered heartbeat to its answer, so
it reads at most one heartbeat interval (``threshold/2``) shorter than it was; stalls
longer than ``1.5 x threshold`` are always caught. Code that holds the GIL without
letting go (a long C call: a regex, a big ``json.dumps``, ``sum`` over a huge range)
keeps the watchdog out: it then reads the stack right after the GIL comes back, which
still shows the Python line that made the call, and that reading carries the whole
time it was kept out and the label ``gil=held``.

Off by default (its measured cost was not shown to be negligible, see ``_auto``);
switched on by :func:`set_loopstall_threshold`, ``create_app(loopstall_threshold=s)``,
``ASGI_PPROF_LOOPSTALL_THRESHOLD=s`` (read by :func:`configure_from_env`) or
:func:`watch`. While on, loops are found when they serve a pprof request
(:func:`note_running_loop`), through :func:`watch`, and every second among the loops
of all asyncio tasks of the process (so ``start_server``'s thread sees the app's loop
too). The thread ends by itself when no watched loop runs any more, and comes back
with the next loop it is given.
"""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import logging
import os
import sys
import threading
import time

from . import tasks
from .concurrency import THREAD_PREFIX, run_in_thread
from .frames import current_stacks, resolve
from .model import Frame, Labels, ProfileData, Sample, Stack, ValueType, labels_of
from .options import Options
from .profiles import NamedProfile
from .text import frame_lines, go_quote, stack_header, tabwrite

__all__ = [
    "DEFAULT_THRESHOLD",
    "ENV",
    "LoopstallProfile",
    "note_running_loop",
    "profile",
    "profiles",
    "set_loopstall_threshold",
    "watch",
    "watched_count",
]

log = logging.getLogger("asgi_pprof")

DEFAULT_THRESHOLD = 0.02
"""Seconds a loop may stay away from its selector before it counts as stalled."""
ENV = "ASGI_PPROF_LOOPSTALL_THRESHOLD"
"""Environment variable with the threshold in seconds (0 turns the watchdog off)."""
THREAD_NAME = THREAD_PREFIX + "loopstall"

STALLS = ValueType("stalls", "count")
DELAY = ValueType("delay", "nanoseconds")
UNREAD: Stack = (Frame("[stall ended before its stack could be read]", "<loopstall>", 0, 0),)
_MAX_RECORDS = 5000
"""Past this many distinct (stack, labels) records, new ones drop the task name."""
_DISCOVER_NS = 1_000_000_000

_now = time.monotonic_ns
_lock = _thread.allocate_lock()  # raw: never a profiled wrapper
_threshold_ns = int(DEFAULT_THRESHOLD * 1e9)
_watched: dict[int, _Loop] = {}
_thread_obj: threading.Thread | None = None
_stopping = False
_auto = False
"""Whether a pprof request starts watching its loop. Off by default: on this project's
2-core test machine the measured cost (an idle loop woken 100 times a second: 0.7 % of a
core) was not shown to be under 0.5 %; any explicit switch-on sets it."""
_table: dict[tuple[Stack, Labels], list[int]] = {}


class _Stall:
    __slots__ = ("last", "parts", "start")

    def __init__(self, start: int) -> None:
        self.start = start
        self.last = start
        self.parts: dict[tuple[Stack, Labels], int] = {}


class _Loop:
    """One watched loop: its heartbeat (a timer the loop re-arms) and the stall going on."""

    __slots__ = (
        "beat_at",
        "beats",
        "dead",
        "due",
        "ident",
        "last_key",
        "late",
        "loop",
        "name",
        "seen",
        "stall",
        "started",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, ident: int | None) -> None:
        self.loop = loop
        self.ident = ident
        self.name = _thread_name(ident) if ident is not None else ""
        self.started = False
        self.dead = False
        self.beats = 0
        """Heartbeats run so far (written by the loop)."""
        self.seen = 0
        """Heartbeats the watchdog has looked at."""
        self.due = 0
        self.beat_at = 0
        self.late = 0
        self.stall: _Stall | None = None
        self.last_key: tuple[Stack, Labels] | None = None

    def beat(self) -> None:
        """Runs on the loop, once per heartbeat interval: it is back, and on time or late."""
        if self.dead:
            return
        now = _now()
        if self.due:
            self.late = now - self.due
        if self.ident is None:
            self.ident = threading.get_ident()
            self.name = threading.current_thread().name
        interval = _threshold_ns // 2
        self.beat_at = now
        self.due = now + interval
        self.beats += 1
        self.loop.call_later(interval / 1e9, self.beat)


def _thread_name(ident: int) -> str:
    t = threading._active.get(ident)  # type: ignore[attr-defined]
    return t.name if t is not None else f"thread {ident}"


# --- switching ----------------------------------------------------------------------------


def set_loopstall_threshold(seconds: float) -> float:
    """Switch the watchdog on with this stall threshold in seconds, or off with 0.

    On, every loop that serves a pprof request (and every loop found through its tasks)
    is watched. Returns the previous threshold (0 when it was off).
    """
    global _threshold_ns
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise TypeError(f"seconds must be a number, not {type(seconds).__name__}")
    if not (seconds == 0 or 0.001 <= seconds <= 60):
        raise ValueError(f"the loopstall threshold must be 0 or 0.001 to 60 seconds, got {seconds}")
    global _auto
    old = _threshold_ns / 1e9 if _auto else 0.0
    _threshold_ns = int(seconds * 1e9)
    _auto = seconds > 0
    if seconds == 0:
        _stop()
    return old


def _stop() -> None:
    global _stopping
    with _lock:
        t = _thread_obj
        _stopping = True
        _watched.clear()
    if t is not None and t is not threading.current_thread():
        t.join(5)
    with _lock:
        _stopping = False


def configure_from_env() -> None:
    """Apply ``ASGI_PPROF_LOOPSTALL_THRESHOLD`` (seconds; 0 off) when it is set."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV} must be a number of seconds, got {raw!r}") from None
    set_loopstall_threshold(value)


def watch(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Watch ``loop`` (the running one by default) for stalls; idempotent, any thread.

    Works while the watchdog is off by default too (at the default 20 ms threshold);
    ``set_loopstall_threshold(0)`` stops it.
    """
    global _thread_obj
    ident: int | None = None
    if loop is None:
        loop = asyncio.get_running_loop()
        ident = threading.get_ident()
    if _threshold_ns <= 0:
        return
    with _lock:
        if _stopping:
            return
        if id(loop) not in _watched or _watched[id(loop)].loop is not loop:
            _watched[id(loop)] = _Loop(loop, ident)
        if _thread_obj is None:
            _thread_obj = threading.Thread(target=_run, name=THREAD_NAME, daemon=True)
            _thread_obj.start()


def note_running_loop() -> None:
    """Watch the running loop if the watchdog is on and it is not watched yet (cheap)."""
    if not _auto:
        return
    with contextlib.suppress(RuntimeError):
        loop = asyncio.get_running_loop()
        w = _watched.get(id(loop))
        if w is None or w.loop is not loop or _thread_obj is None:
            watch()


def watched_count() -> int:
    """Return how many loops are watched now."""
    return len(_watched)


# --- the watchdog ----------------------------------------------------------------------------


def _task_loops() -> list[asyncio.AbstractEventLoop]:
    """Return the loops of every asyncio task in the process (3.11-3.13 keep them in sets)."""
    found: dict[int, asyncio.AbstractEventLoop] = {}
    for attr in ("_scheduled_tasks", "_all_tasks", "_eager_tasks"):
        container = getattr(asyncio.tasks, attr, None)
        data = getattr(container, "data", container)
        if not isinstance(data, set):
            continue
        for ref in data.copy():  # one C call: atomic under the GIL
            t = ref() if callable(ref) else ref
            if t is not None:
                with contextlib.suppress(Exception):
                    lp = t.get_loop()
                    found.setdefault(id(lp), lp)
    return list(found.values())


def _discover() -> None:
    loops = tasks.known_loops() + _task_loops()
    for loop in loops:
        with contextlib.suppress(Exception):
            if id(loop) in _watched or not loop.is_running() or loop.is_closed():
                continue
            ident = getattr(loop, "_thread_id", None)  # asyncio says; uvloop: learnt on pong
            with _lock:
                _watched.setdefault(
                    id(loop), _Loop(loop, ident if isinstance(ident, int) else None)
                )


def _run() -> None:
    global _thread_obj
    next_discovery = 0
    try:
        while True:
            now = _now()
            if now >= next_discovery:
                _discover()
                next_discovery = now + _DISCOVER_NS
            with _lock:
                watched = list(_watched.values())
                if not watched or _stopping or _threshold_ns <= 0:
                    _thread_obj = None
                    return
            wait = _threshold_ns // 2
            for w in watched:
                wait = min(wait, _tend(w, _now()))
            time.sleep(max(wait, 200_000) / 1e9)
    except BaseException:  # never die silently
        log.exception("asgi_pprof: the loopstall watchdog stopped")
        with _lock:
            _thread_obj = None
        raise


def _forget(w: _Loop) -> None:
    w.dead = True  # its timer stops re-arming itself
    with _lock:
        if _watched.get(id(w.loop)) is w:
            del _watched[id(w.loop)]


def _sample_every() -> int:
    return max(1_000_000, min(5_000_000, _threshold_ns // 4))


def _tend(w: _Loop, now: int) -> int:
    """Look at one loop's heartbeat; return ns until it needs the watchdog again."""
    threshold = _threshold_ns
    loop = w.loop
    try:
        running = loop.is_running() and not loop.is_closed()
    except Exception:
        running = False
    if not running:
        if w.stall is not None:
            _finish(w, now)
        _forget(w)
        return threshold // 2
    if not w.started:
        w.started = True
        try:
            loop.call_soon_threadsafe(w.beat)
        except RuntimeError:  # closed meanwhile
            _forget(w)
        return threshold
    beats = w.beats
    if beats != w.seen:  # the loop came back since we last looked
        w.seen = beats
        if w.stall is not None:
            _finish(w, w.beat_at)
        elif w.late > threshold:
            # A stall the watchdog never saw going on (it was not scheduled, or kept out).
            w.stall = _Stall(w.beat_at - w.late)
            _finish(w, w.beat_at)
    if not w.due:
        return threshold
    late = now - w.due
    if w.stall is None and late <= threshold:
        return threshold - late + 1
    _sample(w, now)
    return _sample_every()


def _labels(w: _Loop) -> Labels:
    pairs = [("loop", w.name or "[unknown thread]")]
    with contextlib.suppress(Exception):
        task = asyncio.current_task(w.loop)
        if task is not None:
            if len(_table) < _MAX_RECORDS:
                pairs.append(("task", task.get_name()))
            coro = task.get_coro()
            pairs.append(("coroutine", getattr(coro, "__qualname__", type(coro).__name__)))
    return labels_of(pairs)


def _late_ns() -> int:
    # Past this, the watchdog was kept out of the GIL: a pure-Python thread gives it up
    # after the switch interval, so this much waiting means C code holding it.
    return max(25_000_000, int(4 * sys.getswitchinterval() * 1e9))


def _sample(w: _Loop, now: int) -> None:
    stall = w.stall
    if stall is None:
        stall = w.stall = _Stall(w.due)
        expected = w.due + _threshold_ns
    else:
        expected = stall.last + _sample_every()
    stack: Stack = ()
    if w.ident is not None:
        # One C call (frames.current_stacks): the loop's thread cannot move mid-read.
        raw = current_stacks((w.ident,)).get(w.ident)
        stack = resolve(raw) if raw else ()
    labels = _labels(w)
    if now - expected > _late_ns():
        labels = labels_of([*labels, ("gil", "held")])
    key = (stack or UNREAD, labels)
    stall.parts[key] = stall.parts.get(key, 0) + max(0, now - stall.last)
    stall.last = now
    w.last_key = key


def _finish(w: _Loop, end: int) -> None:
    stall = w.stall
    w.stall = None
    if stall is None:
        return
    key = w.last_key
    w.last_key = None
    if key is None or not stall.parts:
        key = (UNREAD, labels_of([("loop", w.name or "[unknown thread]")]))
    if end > stall.last:
        stall.parts[key] = stall.parts.get(key, 0) + (end - stall.last)
    if not stall.parts:
        return
    # One stall counts once: on the stack that had the most of its time.
    main = max(stall.parts, key=lambda k: stall.parts[k])
    with _lock:
        for k, ns in stall.parts.items():
            cell = _table.setdefault(k, [0, 0])
            cell[0] += k is main
            cell[1] += ns


# --- the profile ---------------------------------------------------------------------------


def profile() -> ProfileData:
    """Return the cumulative loopstall profile: stalls and their time by stack and labels."""
    with _lock:
        rows = [(k, list(v)) for k, v in _table.items()]
    samples = [Sample(stack, vals, labels) for (stack, labels), vals in rows]
    samples.sort(key=lambda s: -s.values[1])
    return ProfileData(
        sample_types=[STALLS, DELAY],
        period_type=DELAY,
        period=max(1, _threshold_ns),
        samples=samples,
        time_nanos=time.time_ns(),
        default_sample_type="delay",
    )


def stall_text(data: ProfileData) -> str:
    """Return the ``debug=1`` text: Go's contention layout, delay in ns, then stall count."""
    buf = [
        "--- loopstall:\n",
        "cycles/second=1000000000\n",
        f"threshold={_threshold_ns}\n",
    ]
    body = []
    for s in data.samples:
        count, delay = s.values
        body.append(f"{delay} {count} {stack_header(s.stack)}\n")
        if s.labels:
            inner = ", ".join(f"{go_quote(k)}:{go_quote(v)}" for k, v in s.labels)
            body.append("# labels: {" + inner + "}\n")
        body.extend(ln + "\n" for ln in frame_lines(s.stack))
        body.append("\n")
    return "".join(buf) + tabwrite("".join(body))


def _reset() -> None:
    """Forget every record (tests only)."""
    with _lock:
        _table.clear()


class LoopstallProfile(NamedProfile):
    """``/debug/pprof/loopstall``: where each event loop was stuck, and for how long."""

    name = "loopstall"
    description = (
        "Stack traces of event loops that stayed away from their selector longer than the "
        "threshold, read while they were stuck, weighted by the time. Labels: loop, task, "
        "coroutine."
    )

    @property
    def supports_delta(self) -> bool:
        """Return True: the profile is cumulative, so ``seconds=N`` makes a delta."""
        return True

    def count(self) -> int:
        """Return the number of records."""
        return len(_table)

    async def collect(self, *, gc: bool = False) -> ProfileData:
        """Return the cumulative profile, built in a worker thread."""
        note_running_loop()
        return await run_in_thread(profile)

    async def text(self, debug: int, *, gc: bool = False) -> str:
        """Return the ``debug=1`` text."""
        data = await self.collect()
        return await run_in_thread(stall_text, data)


def profiles(options: Options) -> list[NamedProfile]:
    """Return the loopstall profile; apply the app's threshold when it sets one."""
    if options.loopstall_threshold is not None:
        set_loopstall_threshold(options.loopstall_threshold)
    return [LoopstallProfile()]
