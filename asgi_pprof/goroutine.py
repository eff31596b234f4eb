"""The ``goroutine`` and ``threadcreate`` named profiles, and the ``debug=2`` dump.

A "goroutine" is an asyncio task of any running loop or a Python thread (see
``tasks``). ``debug=0`` is profile.proto with one ``goroutine/count`` sample per
distinct stack and label set; ``debug=1`` Go's count text; ``debug=2`` a dump in the
spirit of Go's panic output: identical tasks share a block, and every task has a line of
its own with its id, name, wait and who awaits it, so ``grep`` finds any of them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

from . import tasks, threads
from .concurrency import run_in_thread
from .model import Frame, Labels, ProfileData, Sample, Stack, ValueType, labels_of
from .options import Options
from .profiles import NamedProfile
from .tasks import StackRecord
from .text import count_profile_text

__all__ = ["GoroutineProfile", "ThreadcreateProfile", "dump", "profiles", "to_profile"]

_GOROUTINE = ValueType("goroutine", "count")
_NO_FRAME = (Frame("[no Python frame]", "<unknown>", 0, 0),)


_LabelKey = tuple[str, str, str, str, Labels]


def _label_key(rec: StackRecord) -> _LabelKey:
    where = rec.loop if rec.kind == "task" else rec.name
    return (rec.kind, rec.state, rec.wait, where, rec.labels)


def _labels(key: _LabelKey) -> Labels:
    # Low-cardinality values only, so -tagfocus splits and debug=1 still groups:
    # task names and ids are often unique and live in the debug=2 dump. The code's own
    # labels (asgi_pprof.labels, LabelMiddleware's http.route) come after ours.
    kind, state, wait, where, code_labels = key
    return labels_of(
        [
            ("kind", kind),
            ("state", state),
            ("wait", wait),
            ("loop" if kind == "task" else "thread", where),
            *code_labels,
        ]
    )


def to_profile(records: Iterable[StackRecord]) -> ProfileData:
    """Return the goroutine profile of ``records``: one sample per stack and label set."""
    # Counted straight into one entry per distinct (stack, labels): one object per
    # task would mean tens of thousands the garbage collector must track and walk.
    labels: dict[_LabelKey, Labels] = {}
    counts: dict[tuple[Stack, Labels], int] = {}
    for r in records:
        lk = _label_key(r)
        lab = labels.get(lk)
        if lab is None:
            lab = labels[lk] = _labels(lk)
        key = (r.stack or _NO_FRAME, lab)
        counts[key] = counts.get(key, 0) + 1
    return ProfileData(
        sample_types=[_GOROUTINE],
        period_type=_GOROUTINE,
        period=1,
        samples=[Sample(stack, [n], lab) for (stack, lab), n in counts.items()],
        time_nanos=time.time_ns(),
    )


# --- debug=2 ------------------------------------------------------------------------------


def _frame_lines(rec: StackRecord) -> list[str]:
    out = []
    for f in rec.stack or _NO_FRAME:
        out.append(f"{f.function}(...)")
        out.append(f"\t{f.filename}:{f.line}")
    return out


def _quoted(name: str) -> str:
    # A task name is any string: one with a quote or a line break must not break the dump.
    if name.isprintable() and '"' not in name and "\\" not in name:
        return f'"{name}"'
    return json.dumps(name)


def _link(a: tasks.Link) -> str:
    return f"task {a.task_id:#x} {_quoted(a.task_name)} ({a.how})"


def task_line(rec: StackRecord) -> str:
    """Return a task's one line: ``task ID "NAME" [STATE: WAIT, waiting S s; awaited by ...]``.

    Every task of the dump has one (its block's header, or a member line of a group),
    so ``grep NAME`` finds its id, what it waits on and who waits for it.
    """
    status = rec.state + (f": {rec.detail}" if rec.detail else "")
    if rec.waiting is not None:
        status += f", waiting {rec.waiting:.3g} s"
    if rec.awaited_by:
        status += "; awaited by " + ", ".join(_link(a) for a in rec.awaited_by)
    return f"task {rec.ident:#x} {_quoted(rec.name)} [{status}]"


def _created(rec: StackRecord) -> list[str]:
    c = rec.created
    if c is None:
        if rec.kind == "thread":
            return []
        if rec.tracked:
            return ["created by: unknown (created before tracking started on this loop)"]
        return ["created by: not tracked (create_app(track_task_creation=True) records it)"]
    by = f" in task {c.task_id:#x} {_quoted(c.task_name)}" if c.task_id else " outside any task"
    return [
        f"created by {c.frame.function}{by}, {c.age:.3g} s ago",
        f"\t{c.frame.filename}:{c.frame.line}",
    ]


def _group_key(rec: StackRecord) -> tuple[object, ...]:
    c = rec.created
    site = (c.frame, c.task_name) if c is not None else None
    return (rec.loop, rec.state, rec.wait, rec.stack, site, rec.tracked)


def dump(records: Iterable[StackRecord]) -> str:
    """Return the ``debug=2`` text: a header, then one block per task, group or thread.

    Tasks with the same loop, state, wait, stack and creation site form one block that
    lists every member on its own line (:func:`task_line`), the largest group first.
    Records are taken one at a time and kept as text: one object per task kept alive
    for the garbage collector to walk would stall the loop on 10 000 tasks.
    """
    firsts: dict[tuple[object, ...], StackRecord] = {}
    members: dict[tuple[object, ...], list[str]] = {}
    threads: list[StackRecord] = []
    loops: set[str] = set()
    n_tasks = 0
    tracked = False
    for r in records:
        if r.kind != "task":
            threads.append(r)
            continue
        n_tasks += 1
        loops.add(r.loop)
        tracked = tracked or r.tracked
        key = _group_key(r)
        lines = members.get(key)
        if lines is None:
            firsts[key] = r
            lines = members[key] = []
        lines.append(task_line(r))
    head = [
        f"goroutine dump: {n_tasks} tasks on {len(loops)} event "
        f"loop{'s' if len(loops) != 1 else ''}, {len(threads)} threads",
        "creation sites: "
        + (
            "tracked"
            if tracked
            else "not tracked (create_app(track_task_creation=True) records them)"
        ),
    ]
    blocks: list[str] = []
    order = sorted(
        firsts,
        key=lambda k: (
            firsts[k].state != "running",
            firsts[k].loop,
            -len(members[k]),
            firsts[k].ident,
        ),
    )
    for key in order:
        first, lines = firsts[key], members[key]
        if len(lines) == 1:
            out = [f"{lines[0]} on loop {first.loop}:"]
        else:
            lines.sort()  # by id: each line starts "task 0x<id>"
            out = [f"{len(lines)} tasks [{first.state}: {first.wait}] on loop {first.loop}:"]
            out += ["    " + line for line in lines]
        out += _frame_lines(first)
        out += _created(first)
        blocks.append("\n".join(out))
    for r in threads:
        status = r.state + (f": {r.detail}" if r.detail else "")
        lines = [f"thread {r.ident} {_quoted(r.name)} [{status}]:", *_frame_lines(r)]
        blocks.append("\n".join(lines))
    return "\n".join(head) + "\n\n" + "\n\n".join(blocks) + "\n"


# --- the named profiles ---------------------------------------------------------------------


class GoroutineProfile(NamedProfile):
    """``/debug/pprof/goroutine``: every asyncio task and every thread."""

    name = "goroutine"
    description = (
        "Stack traces of all current goroutines. Use debug=2 as a query parameter "
        "to export in the same format as an unrecovered panic."
    )

    def __init__(self, track_creation: bool = False) -> None:
        self.track_creation = track_creation

    def count(self) -> int:
        """Return the number of live tasks and threads (O(tasks), on the loop)."""
        tasks.note_loop(self.track_creation)
        return tasks.count()

    def _profile(self) -> ProfileData:
        return to_profile(tasks.snapshot(self.track_creation))

    def _text(self, debug: int) -> str:
        records = tasks.snapshot(self.track_creation)
        if debug >= 2:
            return dump(records)
        return count_profile_text(self.name, to_profile(records))

    async def collect(self, *, gc: bool = False) -> ProfileData:
        """Return the goroutine profile, read and built in a worker thread."""
        tasks.note_loop(self.track_creation)
        return await run_in_thread(self._profile)

    async def text(self, debug: int, *, gc: bool = False) -> str:
        """Return Go's count text for ``debug=1``, the full dump for ``debug>=2``."""
        tasks.note_loop(self.track_creation)
        return await run_in_thread(self._text, debug)


class ThreadcreateProfile(NamedProfile):
    """``/debug/pprof/threadcreate``: threads created, with the stack that created each."""

    name = "threadcreate"
    description = "Stack traces that led to the creation of new OS threads"

    def __init__(self) -> None:
        # Made by create_app: from here on, each Thread.start() records its stack.
        threads.install()

    def count(self) -> int:
        """Return the number of threads created so far."""
        return threads.created_count()

    async def collect(self, *, gc: bool = False) -> ProfileData:
        """Return the threadcreate profile (sites counted since the first app was made)."""
        data = await run_in_thread(threads.profile)
        data.time_nanos = time.time_ns()
        return data


def profiles(options: Options) -> list[NamedProfile]:
    """Return the goroutine and threadcreate profiles for an app with ``options``."""
    return [GoroutineProfile(options.track_task_creation), ThreadcreateProfile()]
