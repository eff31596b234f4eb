"""The execution trace's writer: raw records of one capture -> Chrome Trace Event JSON.

Pure: no hooks, no threads, no I/O. ``tracing`` records what happened as cheaply as it
can (tuples of ints and code objects); this module turns that into tracks a viewer
labels well (Perfetto UI, chrome://tracing, speedscope all read the JSON Object Format).

Layout, per process:

* one track per thread (tid = the OS thread id): on a thread that runs an asyncio
  loop whose steps are visible, each loop step is a slice and the stack samples taken
  during the step are nested under it (the flame chart of that step); on any other
  thread the stack samples alone make the flame chart;
* one ``gc`` track: every collection with its generation, duration and what it collected;
* one ``asyncio tasks`` track per loop: an instant when a task is created or finishes,
  and a counter of the loop's live tasks.

Every slice is a complete (``X``) event with integer microsecond ``ts`` and ``dur``, so
nesting on a track is exact (no float rounding can make a child outlive its parent).
"""

from __future__ import annotations

import bisect
import heapq
import json
import os
import sys
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .model import Frame, Stack, function_name

__all__ = [
    "DONE",
    "GC",
    "NEW",
    "SAMPLE",
    "STEP",
    "LoopInfo",
    "RawTrace",
    "render",
]

# Record kinds (the first item of every raw record).
STEP = 0
"""``(STEP, loop_id, t0, t1, what, task_name, request)``: one callback or task step ran on
the loop (whose thread is its ``LoopInfo.ident``); ``request`` numbers the HTTP request a
task serves (see ``RawTrace.request_labels``), or None."""
SAMPLE = 1
"""``[SAMPLE, ident, t_first, t_last, codes, seq]``: a thread's stack (leaf first), as
seen from ``t_first`` to ``t_last`` (within one loop step when inside one); ``codes == ()``
marks the thread gone."""
GC = 2
"""``(GC, ident, t0, t1, generation, collected, uncollectable)``: one collection."""
NEW = 3
"""``(NEW, ident, t, loop_id, task_name, code, task_id, request)``: a task was created."""
DONE = 4
"""``(DONE, ident, t, loop_id, task_name, code, task_id, request, state)``: a task finished."""

_SYNTHETIC_TID = 1_000_000_000
"""Synthetic track ids start here: above any Linux thread id (pid_max <= 2**22)."""


@dataclass(slots=True)
class LoopInfo:
    """An event loop seen during the capture."""

    loop_id: int
    type_name: str
    ident: int
    """``threading.get_ident()`` of the thread that runs it."""
    steps_visible: bool
    """False for loops whose handles are not ``asyncio.Handle`` (uvloop)."""
    slow_ns: int
    """Steps at least this long are marked slow (the loop's ``slow_callback_duration``)."""
    tasks_at_start: int = -1
    """Live tasks when the capture started; -1 when the loop's tasks were not tracked."""


@dataclass(slots=True)
class RawTrace:
    """Everything one capture recorded, ready for :func:`render`."""

    start_ns: int
    end_ns: int
    wall_start: float
    sample_hz: int
    max_events: int
    records: list[Any]
    step_code: types.CodeType | None
    """Code of the hook that runs a loop step: frames below it in a sample belong to the step."""
    skip_codes: frozenset[types.CodeType] = frozenset()
    """Frames of the hook itself, between ``step_code`` and the step's callback."""
    threads: dict[int, tuple[int | None, str]] = field(default_factory=dict)
    """``ident -> (native id, name)`` of every thread seen."""
    loops: list[LoopInfo] = field(default_factory=list)
    truncated_ns: int | None = None
    """When the capture hit ``max_events`` (it kept running, recording nothing new)."""
    dropped: int = 0
    """Records not kept after the limit was reached."""
    ended_early: bool = False
    notes: list[str] = field(default_factory=list)
    request_labels: dict[int, str] = field(default_factory=dict)
    """``request number -> "GET /items/{item_id}"`` of the HTTP requests tasks served."""
    cpu_ticks: list[tuple[int, int, Stack]] = field(default_factory=list)
    """The CPU sampler's ticks: ``(perf_counter_ns, thread ident, stack leaf first)``, each
    one ``cpu_period_ns`` of that thread's CPU."""
    cpu_period_ns: int = 10_000_000
    late_names: dict[int, str] = field(default_factory=dict)
    """``task id -> name`` of the tasks still running when the capture ended."""
    cpu_exact: int | None = None
    cpu_ns: dict[int, int] = field(default_factory=dict)
    """``thread ident -> CPU ns`` each thread burnt during the capture, from its CPU clock."""
    """Ident of the thread that took its own ticks (SIGPROF on the main thread): exact frames."""


class _Names:
    """Turns code objects into ``module.qualname`` names users recognise."""

    def __init__(self) -> None:
        self._module_of_file: dict[str, str] | None = None

    def _modules(self) -> dict[str, str]:
        if self._module_of_file is None:
            table: dict[str, str] = {}
            for name, mod in list(sys.modules.items()):
                path = getattr(mod, "__file__", None)
                if isinstance(path, str):
                    table.setdefault(path, name)
            self._module_of_file = table
        return self._module_of_file

    def code(self, code: types.CodeType) -> str:
        """Return the name of a code object (``module.Class.method``)."""
        return function_name(code, self._modules().get(code.co_filename))

    def what(self, what: object) -> str:
        """Return the name of a step's callback (a function, a code object or a string)."""
        if isinstance(what, str):
            return what
        if isinstance(what, types.CodeType):
            return self.code(what)
        code = getattr(what, "__code__", None)
        if isinstance(code, types.CodeType):
            return self.code(code)
        qual = getattr(what, "__qualname__", None)
        return qual if isinstance(qual, str) else type(what).__qualname__


_SORT_CHUNK = 4096


def gentle_sorted(items: Iterable[Any], key: Callable[[Any], Any]) -> list[Any]:
    """Return ``sorted(items, key=key)`` without holding the GIL for long.

    One ``sort`` of a big list runs in C from start to end, and the event loop, waiting
    for the GIL, stalls that long (about 150 ms for 200 000 events). Small sorts merged
    in Python let the interpreter switch threads between them.
    """
    data = list(items)
    if len(data) <= _SORT_CHUNK:
        return sorted(data, key=key)
    runs = [sorted(data[i : i + _SORT_CHUNK], key=key) for i in range(0, len(data), _SORT_CHUNK)]
    return list(heapq.merge(*runs, key=key))


Timed = tuple[int, int, str]
"""One timed event: ``(ts, -dur, its JSON)``, so plain tuple order puts parents first.

Events are encoded as soon as they are made: a JSON string is no container the garbage
collector tracks, where hundreds of thousands of surviving dicts would set off full
collections (100-200 ms each, with the GIL held) while the trace is written.
"""

_encode = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode


def timed(event: dict[str, Any]) -> Timed:
    """Return ``event`` (with ``ts`` and, for slices, ``dur``) as a :data:`Timed`."""
    return (event["ts"], -event.get("dur", 0), _encode(event))


def _us(t_ns: int, start_ns: int) -> int:
    """Return a time as whole microseconds since the capture started (floor, never negative)."""
    return max(0, (t_ns - start_ns) // 1000)


class _Track:
    """The slices of one track, built from stacks that change over time."""

    def __init__(self, pid: int, tid: int, start_ns: int, names: _Names) -> None:
        self.pid = pid
        self.tid = tid
        self.start_ns = start_ns
        self.names = names
        self.events: list[Timed] = []
        self._open: list[tuple[types.CodeType, int]] = []  # (code, start ns), root first
        self._end = 0

    def slice(
        self, name: str, t0: int, t1: int, cat: str, args: dict[str, Any], **extra: str
    ) -> None:
        """Add one complete slice from ``t0`` to ``t1`` (ns)."""
        ts = _us(t0, self.start_ns)
        event = {
            "ph": "X",
            "name": name,
            "cat": cat,
            "pid": self.pid,
            "tid": self.tid,
            "ts": ts,
            "dur": max(0, _us(t1, self.start_ns) - ts),
            "args": args,
            **extra,
        }
        self.events.append(timed(event))

    def stack(self, t0: int, t1: int, codes: Sequence[types.CodeType]) -> None:
        """Extend the flame chart with ``codes`` (root first) running from ``t0`` to ``t1``.

        Frames shared with the previous stack stay one slice when the two are contiguous.
        """
        keep = 0
        if t0 == self._end:
            for (code, _), new in zip(self._open, codes, strict=False):
                if code is not new:
                    break
                keep += 1
        self.close(keep)
        for code in codes[keep:]:
            self._open.append((code, t0))
        self._end = t1

    def detach(self) -> None:
        """Make the next stack start new slices even if it starts where the last ended."""
        self._end = -1

    def close(self, keep: int = 0) -> None:
        """Close the open frames deeper than ``keep`` at the end of the last stack."""
        while len(self._open) > keep:
            code, t0 = self._open.pop()
            self.slice(
                self.names.code(code),
                t0,
                self._end,
                "python",
                {"file": code.co_filename, "line": code.co_firstlineno},
            )


def _step_frames(codes: tuple[Any, ...], raw: RawTrace) -> list[types.CodeType] | None:
    """Return the frames a sample shows inside a loop step (root first), None if not in one."""
    if raw.step_code is None:
        return None
    try:
        at = codes.index(raw.step_code)
    except ValueError:
        return None
    inner = [c for c in codes[:at] if c not in raw.skip_codes]
    inner.reverse()
    return inner


def _thread_tracks(
    raw: RawTrace, pid: int, names: _Names, steps: dict[int, list[tuple[Any, ...]]]
) -> Iterator[tuple[int, _Track]]:
    """Yield ``(ident, track)`` for every sampled or stepping thread."""
    samples: dict[int, list[list[Any]]] = {}
    for r in raw.records:
        if r[0] == SAMPLE:
            samples.setdefault(r[1], []).append(r)
    for ident in sorted(set(samples) | set(steps)):
        native = raw.threads.get(ident, (None, ""))[0]
        track = _Track(pid, native if native is not None else ident, raw.start_ns, names)
        recs = samples.get(ident, [])
        loop_steps = gentle_sorted(steps.get(ident, ()), key=lambda s: (s[2], -s[3]))
        if loop_steps:
            _loop_track(track, recs, loop_steps, raw, names)
        else:
            for i, r in enumerate(recs):
                end = recs[i + 1][2] if i + 1 < len(recs) else raw.end_ns
                codes = list(reversed(r[4]))
                track.stack(r[2], max(r[2], end), codes)
            track.close()
        yield ident, track


def _loop_track(
    track: _Track,
    recs: list[list[Any]],
    loop_steps: list[tuple[Any, ...]],
    raw: RawTrace,
    names: _Names,
) -> None:
    """Fill a loop thread's track: each step a slice, its sampled frames nested under it."""
    slow = {li.loop_id: li.slow_ns for li in raw.loops}
    starts = [s[2] for s in loop_steps]
    pieces: dict[int, list[tuple[int, int, list[types.CodeType]]]] = {}
    for i, r in enumerate(recs):
        inner = _step_frames(r[4], raw)
        if not inner:
            continue
        seen0, seen1 = r[2], r[3]
        nxt = recs[i + 1][2] if i + 1 < len(recs) else raw.end_ns
        # The stack was seen from seen0 to seen1 (the sampler starts a new record when a
        # step ends) and may have lasted until the next sample: give it to the step that
        # ran while it was seen, clipped to that step.
        j = max(0, bisect.bisect_right(starts, seen0) - 1)
        while j < len(loop_steps) and loop_steps[j][2] <= seen1:
            s = loop_steps[j]
            lo, hi = max(seen0, s[2]), min(nxt, s[3])
            if lo <= hi and s[3] >= seen0:
                pieces.setdefault(j, []).append((lo, hi, inner))
            j += 1
    labels = raw.request_labels
    for j, s in enumerate(loop_steps):
        _, loop_id, t0, t1, what, task_name, req = s
        name = names.what(what)
        args: dict[str, Any] = {"callback" if task_name is None else "coro": name}
        if task_name is not None:
            args["task"] = task_name
        if isinstance(what, types.CodeType):
            args["file"], args["line"] = what.co_filename, what.co_firstlineno
        slow_ns = slow.get(loop_id, 100_000_000)
        request = labels.get(req) if req is not None else None
        if request is not None:
            # A server's request task: named after the request, so that viewers which
            # group slices by name group them by route (the task's name is one per request).
            args["request"] = request
            label = request
        else:
            label = name if task_name is None else f"{task_name} {name}"
        if t1 - t0 >= slow_ns:
            # Constant per loop, so viewers that merge slices by name and args still do.
            args["slow"] = f"held the loop >= {slow_ns / 1e6:g} ms (slow_callback_duration)"
            # cname "terrible": chrome://tracing's red.
            track.slice(label, t0, t1, "asyncio.step,slow", args, cname="terrible")
        else:
            track.slice(label, t0, t1, "asyncio.step", args)
        for lo, hi, inner in pieces.get(j, ()):
            track.stack(lo, hi, inner)
        track.close()
        track.detach()


_C_LOOP = Frame("[uvloop]", "<C code of the event loop: polling, or its C callbacks>", 0, 0)
_RUN_ENTRIES = frozenset({"asyncio.runners.Runner.run", "asyncio.runners.run", "uvloop.run"})


def _cpu_events(
    raw: RawTrace, pid: int, tid: int, ticks: list[tuple[int, int, Stack]], period: int
) -> list[Timed]:
    """Return the flame chart of one thread's CPU ticks (in time order).

    A tick says the thread had burnt one more period of CPU, in that stack: it becomes
    slices of ``period`` (the thread's CPU over the window per tick) ending at the tick
    (or starting where the previous one ended), so each function's total on the track is
    its CPU time as sampled, without the GIL bias of a wall-clock sampler thread. Frames
    shared with the previous tick stay one slice when the two touch.
    """
    out: list[Timed] = []
    opened: list[tuple[Frame, int]] = []  # root first
    end = -1

    def close(keep: int) -> None:
        while len(opened) > keep:
            fr, t0 = opened.pop()
            ts = _us(t0, raw.start_ns)
            event = {
                "ph": "X",
                "name": fr.function,
                "cat": "cpu",
                "pid": pid,
                "tid": tid,
                "ts": ts,
                "dur": max(0, _us(end, raw.start_ns) - ts),
                "args": {"file": fr.filename, "line": fr.start_line},
            }
            out.append(timed(event))

    for t, _, stack in ticks:
        # Two ticks can be recorded closer than a period apart (a handler runs late, at
        # the next bytecode boundary): the later one moves right, so that every tick
        # keeps its full length and the track's totals stay ticks x period.
        t0 = max(t - period, end, raw.start_ns)
        frames = list(reversed(stack))
        if frames and frames[-1].function in _RUN_ENTRIES:
            # A C event loop (uvloop) below the frame that runs it: say so, or its time
            # would show as Runner.run's own.
            frames.append(_C_LOOP)
        keep = 0
        if t0 == end:
            for (fr, _), new in zip(opened, frames, strict=False):
                if fr.function != new.function or fr.filename != new.filename:
                    break
                keep += 1
        close(keep)
        opened.extend((fr, t0) for fr in frames[keep:])
        end = t0 + period
    close(0)
    return out


def _task_tracks(
    raw: RawTrace, pid: int, names: _Names, tid_of_loop: dict[int, int]
) -> list[Timed]:
    """Return the instants and counters of task creation and completion, per loop."""
    out: list[Timed] = []
    alive = {li.loop_id: li.tasks_at_start for li in raw.loops}
    recs = gentle_sorted((r for r in raw.records if r[0] in (NEW, DONE)), key=lambda r: r[2])
    # A task may be named after its factory ran (3.11/3.12): its completion carries the
    # final name, or, still running when the capture ended, the name it had then. (Later
    # records first: a task id is reused only after that task is gone.)
    final: dict[int, str] = {}
    late = dict(raw.late_names)
    task_names: list[str] = [r[4] for r in recs]
    for i in range(len(recs) - 1, -1, -1):
        r = recs[i]
        if r[0] == DONE:
            final[r[6]] = r[4]
        elif r[6] in final:
            task_names[i] = final.pop(r[6])
        elif r[6] in late:
            task_names[i] = late.pop(r[6])
    for r, task_name in zip(recs, task_names, strict=True):
        kind, _, t, loop_id = r[0], r[1], r[2], r[3]
        tid = tid_of_loop.get(loop_id)
        if tid is None:
            continue
        coro = names.what(r[5]) if r[5] is not None else "?"
        args: dict[str, Any] = {"task": task_name, "coro": coro}
        if kind == DONE:
            args["state"] = r[8]
        request = raw.request_labels.get(r[7]) if r[7] is not None else None
        if request is not None:
            args["request"] = request
            coro = f"{coro} · {request}"
        ts = _us(t, raw.start_ns)
        verb = "created" if kind == NEW else "done"
        out.append(
            timed(
                {
                    "ph": "i",
                    "s": "t",
                    "name": f"{verb} {task_name} {coro}",
                    "cat": f"asyncio.task.{verb}",
                    "pid": pid,
                    "tid": tid,
                    "ts": ts,
                    "args": args,
                }
            )
        )
        n = alive.get(loop_id, -1)
        if n >= 0:
            n = max(0, n + (1 if kind == NEW else -1))
            alive[loop_id] = n
            out.append(
                timed(
                    {
                        "ph": "C",
                        "name": f"asyncio tasks (loop {loop_id:#x})",
                        "cat": "asyncio.task",
                        "pid": pid,
                        "tid": tid,
                        "ts": ts,
                        "args": {"alive": n},
                    }
                )
            )
    return out


def _gc_events(raw: RawTrace, pid: int, tid: int) -> list[Timed]:
    out = []
    for r in raw.records:
        if r[0] != GC:
            continue
        _, ident, t0, t1, gen, collected, uncollectable = r
        ts = _us(t0, raw.start_ns)
        out.append(
            timed(
                {
                    "ph": "X",
                    "name": f"gc gen{gen}",
                    "cat": "gc",
                    "pid": pid,
                    "tid": tid,
                    "ts": ts,
                    "dur": max(0, _us(t1, raw.start_ns) - ts),
                    "args": {
                        "generation": gen,
                        "collected": collected,
                        "uncollectable": uncollectable,
                        "thread": raw.threads.get(ident, (None, str(ident)))[1],
                    },
                }
            )
        )
    return out


def _meta(pid: int, tid: int, kind: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"ph": "M", "name": kind, "pid": pid, "tid": tid, "ts": 0, "args": args}


def events(raw: RawTrace) -> tuple[list[dict[str, Any]], list[Timed], dict[str, Any]]:
    """Return ``(metadata events, timed events, otherData)`` of a capture.

    The timed events are in time order, at most ``max_events`` of them (plus the marker
    that says the trace was cut).
    """
    pid = os.getpid()
    names = _Names()
    steps: dict[int, list[tuple[Any, ...]]] = {}
    ident_of = {li.loop_id: li.ident for li in raw.loops}
    for r in raw.records:
        if r[0] == STEP:
            steps.setdefault(ident_of.get(r[1], 0), []).append(r)
    evs: list[Timed] = []
    meta: list[dict[str, Any]] = []
    loops_of = {li.ident: li for li in raw.loops}
    tid_of_loop: dict[int, int] = {}
    ticks_of: dict[int, list[tuple[int, int, Stack]]] = {}
    for tick in raw.cpu_ticks:
        ticks_of.setdefault(tick[1], []).append(tick)
    order = 0
    cpu_tid = _SYNTHETIC_TID + 1000
    shown: list[int] = []
    for ident, track in _thread_tracks(raw, pid, names, steps):
        evs.extend(track.events)
        tname = raw.threads.get(ident, (None, f"thread {ident}"))[1] or f"thread {ident}"
        li = loops_of.get(ident)
        if li is not None:
            tname += f" · asyncio loop {li.type_name} {li.loop_id:#x}"
            if not li.steps_visible:
                tname += " (steps not visible)"
        meta.append(_meta(pid, track.tid, "thread_name", {"name": tname}))
        meta.append(_meta(pid, track.tid, "thread_sort_index", {"sort_index": order}))
        order += 2  # its CPU track goes right below it
        shown.append(ident)
    # Threads that burnt CPU but were never sampled on the wall clock (ours) come last.
    idents = shown + sorted(i for i in ticks_of if i not in shown)
    for n, ident in enumerate(idents):
        ticks = ticks_of.get(ident)
        if not ticks:
            continue
        ticks.sort(key=lambda k: k[0])
        tid = cpu_tid + n
        # The thread's real CPU over the window (its CPU clock) spread over its ticks, as
        # the CPU profile's cpu/nanoseconds does: ticks come at kernel ticks and a loaded
        # machine loses some, so ticks x period alone can be short of what was burnt.
        burnt = raw.cpu_ns.get(ident)
        period = raw.cpu_period_ns
        if burnt is not None and burnt > 0:
            period = max(1, burnt // len(ticks))
        evs.extend(_cpu_events(raw, pid, tid, ticks, period))
        tname = raw.threads.get(ident, (None, f"thread {ident}"))[1] or f"thread {ident}"
        how = (
            "exact: its own SIGPROF ticks"
            if ident == raw.cpu_exact
            else "read at its CPU timer's tick"
        )
        label = f"{tname} · CPU, one slice per tick: {period / 1e6:.3g} ms of it ({how})"
        meta.append(_meta(pid, tid, "thread_name", {"name": label}))
        index = 2 * shown.index(ident) + 1 if ident in shown else 2 * len(shown) + n
        meta.append(_meta(pid, tid, "thread_sort_index", {"sort_index": index}))
    gc_tid = _SYNTHETIC_TID
    evs.extend(_gc_events(raw, pid, gc_tid))
    meta.append(_meta(pid, gc_tid, "thread_name", {"name": "gc (all threads)"}))
    meta.append(_meta(pid, gc_tid, "thread_sort_index", {"sort_index": 10_000}))
    for n, li in enumerate(raw.loops):
        tid = _SYNTHETIC_TID + 1 + n
        tid_of_loop[li.loop_id] = tid
        thread = raw.threads.get(li.ident, (None, str(li.ident)))[1]
        meta.append(
            _meta(
                pid,
                tid,
                "thread_name",
                {"name": f"asyncio tasks · {thread} loop {li.loop_id:#x}"},
            )
        )
        meta.append(_meta(pid, tid, "thread_sort_index", {"sort_index": 10_001 + n}))
    evs.extend(_task_tracks(raw, pid, names, tid_of_loop))

    # By start, then longest first: parents before their children.
    evs = gentle_sorted(evs, key=_start)
    truncated_us = None if raw.truncated_ns is None else _us(raw.truncated_ns, raw.start_ns)
    if len(evs) > raw.max_events:
        # Keep the earliest events: the cut is a single point in time on every track.
        cut = evs[raw.max_events][0]
        evs = evs[: raw.max_events]
        truncated_us = cut if truncated_us is None else min(truncated_us, cut)
    if truncated_us is not None:
        marker = {
            "ph": "i",
            "s": "g",
            "name": "asgi_pprof: trace truncated (max events reached)",
            "cat": "asgi_pprof",
            "pid": pid,
            "tid": gc_tid,
            "ts": max(truncated_us, evs[-1][0] if evs else 0),
            "args": {"max_events": raw.max_events},
        }
        evs.append(timed(marker))
    argv = " ".join(getattr(sys, "orig_argv", None) or sys.argv)
    meta.insert(0, _meta(pid, 0, "process_name", {"name": f"python {argv}"[:200]}))
    meta.insert(
        1,
        _meta(
            pid,
            0,
            "process_labels",
            {"labels": f"pid {pid}, Python {sys.version.split()[0]}"},
        ),
    )
    other = {
        "producer": "asgi_pprof /debug/pprof/trace",
        "python": sys.version,
        "platform": sys.platform,
        "pid": pid,
        "argv": list(getattr(sys, "orig_argv", None) or sys.argv),
        "start_unix_seconds": raw.wall_start,
        "duration_us": _us(raw.end_ns, raw.start_ns),
        "sample_hz": raw.sample_hz,
        "cpu_sample_period_ns": raw.cpu_period_ns,
        "cpu_ticks": len(raw.cpu_ticks),
        "max_events": raw.max_events,
        "events": len(evs),
        "truncated": truncated_us is not None,
        "truncated_at_us": truncated_us,
        "dropped_records": raw.dropped,
        "ended_early": raw.ended_early,
        "loops": [
            {
                "loop": f"{li.loop_id:#x}",
                "type": li.type_name,
                "thread": raw.threads.get(li.ident, (None, str(li.ident)))[1],
                "steps_visible": li.steps_visible,
                "slow_step_ms": li.slow_ns / 1e6,
            }
            for li in raw.loops
        ],
        "notes": list(raw.notes),
    }
    return meta, evs, other


def _start(e: Timed) -> tuple[int, int]:
    return (e[0], e[1])


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def render(raw: RawTrace) -> bytes:
    """Return the trace as Chrome Trace Event Format JSON (the JSON Object Format)."""
    meta, evs, other = events(raw)
    parts = [
        b'{"displayTimeUnit":"ms","otherData":',
        json.dumps(other).encode(),
        b',"traceEvents":[',
        ",".join(_encode(m) for m in meta).encode(),
    ]
    for chunk in _chunks(evs, 2000):
        parts.append(b",")
        parts.append(",".join(e[2] for e in chunk).encode())
    parts.append(b"]}\n")
    return b"".join(parts)
