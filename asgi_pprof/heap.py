"""The ``heap`` and ``allocs`` profiles from tracemalloc (and the GC-trigger sampler).

``heap`` is memory held by live allocations, grouped by the stack that allocated it, as
tracemalloc sees it (``inuse_objects``/``inuse_space``, Go's names and units). Tracing is
never started behind the user's back (see :mod:`.tracemalloc_owner`): tracing someone else
started is used, :func:`start_tracing` starts it for good, and ``heap?seconds=N`` with
tracing off traces for just that window.

asgi_pprof's own allocations (its name caches, the request being served) are left out:
any trace with one of our frames in its traceback is counted in the trailer's
``asgi_pprof.own_*`` facts instead of the profile.

``allocs`` is Go's "sampling of all past allocations" as far as pure Python can honestly
go: tracemalloc keeps only live blocks, so there is no cumulative allocation count to
report. It carries two cumulative columns from the GC-trigger sampler
(:mod:`.gcsampler`), plus the live tracemalloc columns when tracing is on. None of them
is named ``alloc_*``: they are not allocation counts, and scrapers that compute deltas
on those names must not treat them as such.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import threading
import time
import tracemalloc
from typing import TYPE_CHECKING

from . import gcsampler, heap_groups, limits, native
from .concurrency import Window, gc_deferred, run_in_thread, yield_gil
from .heap_names import cache_facts
from .heap_text import Row, heap_text, memory_facts
from .model import ProfileData, Sample, ValueType, subtract
from .profiles import NamedProfile, ProfileError
from .tracemalloc_owner import DEFAULT_FRAMES, _tracing, start_tracing, stop_tracing, tracing_state

if TYPE_CHECKING:
    from .options import Options

__all__ = [
    "DEFAULT_FRAMES",
    "NOT_TRACING",
    "AllocsProfile",
    "HeapProfile",
    "profiles",
    "start_tracing",
    "stop_tracing",
    "tracing_state",
]

NOT_TRACING = (
    "heap profile unavailable: tracemalloc is not tracing. Turn it on with "
    "PYTHONTRACEMALLOC=16, create_app(tracemalloc_frames=16) or "
    "asgi_pprof.start_tracing(16), or ask for heap?seconds=N to trace for N seconds only"
)
"""The 403 text for a plain ``heap`` request while tracing is off."""

HEAP_TYPES = [ValueType("inuse_objects", "count"), ValueType("inuse_space", "bytes")]
GC_TYPES = [ValueType("gc_collections", "count"), ValueType("gc_pause", "nanoseconds")]
PERIOD_TYPE = ValueType("space", "bytes")


# --- snapshots --------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Snapshot:
    """The live traced blocks grouped by traceback, ours left out, and what one took."""

    rows: list[Row]
    """``(inuse_objects, inuse_space, traceback)`` per traceback, not ours."""
    own_objects: int = 0
    own_bytes: int = 0
    blocks: int = 0
    """Traced blocks in the snapshot, ours included."""
    copy_seconds: float = 0.0
    """How long copying tracemalloc's traces held the GIL (the loop is stuck that long)."""
    seconds: float = 0.0
    thread: str = ""


last_snapshot = Snapshot([])
"""The facts of the latest snapshot (its rows are not kept)."""


def take_snapshot() -> Snapshot:
    """Return the live traced blocks by traceback; asgi_pprof's own blocks counted apart.

    Runs in a worker thread. tracemalloc builds its copy of the traces without tracing
    that copy; the grouping (:func:`.heap_groups.group`) makes one row per traceback and
    nothing per block.
    """
    import _tracemalloc  # the list of raw traces, without Snapshot's per-trace objects

    t0 = time.perf_counter()
    if not tracemalloc.is_tracing():
        return Snapshot([], thread=threading.current_thread().name)
    # The copy makes a tuple per live block: enough to trigger full collections, which
    # over a heap that big hold the GIL for 100s of ms. Freeing it gives the count back.
    with gc_deferred():
        # typeshed says Sequence; CPython returns a list of tuples.
        traces: list[heap_groups.Trace] = _tracemalloc._get_traces()  # type: ignore[assignment]
        copied = time.perf_counter() - t0
        blocks = len(traces)
        rows, own_objects, own_bytes = heap_groups.group(traces)
        _free(traces)
        del traces
    snap = Snapshot(
        rows,
        own_objects,
        own_bytes,
        blocks,
        copied,
        time.perf_counter() - t0,
        threading.current_thread().name,
    )
    global last_snapshot
    last_snapshot = dataclasses.replace(snap, rows=[])
    return snap


FREE_SLICE = 8192
"""Traces freed per step: ~2 ms holding the GIL (the copy of a real app's heap is
~700 000 tuples, whose one-call free held it 0.1-0.4 s)."""


def _free(traces: list[heap_groups.Trace]) -> None:
    """Empty ``traces`` from its end in slices, offering the GIL between them."""
    while traces:
        del traces[-FREE_SLICE:]
        yield_gil()


def heap_samples(rows: list[Row]) -> list[Sample]:
    """Return one sample per row: ``[inuse_objects, inuse_space]`` at its named stack."""
    # Deferred as the snapshot is: 40 000 samples are 120 000 container objects, enough
    # to trigger a full collection over the app's heap (0.2-0.5 s measured) each request.
    with gc_deferred():
        return heap_groups.samples(rows)


def _heap_data(samples: list[Sample]) -> ProfileData:
    return ProfileData(
        sample_types=list(HEAP_TYPES),
        period_type=PERIOD_TYPE,
        period=1,  # tracemalloc traces every allocation: nothing to scale
        samples=samples,
        time_nanos=time.time_ns(),
        comments=[
            f"tracemalloc frames={tracemalloc.get_traceback_limit()}",
            "asgi_pprof's own allocations are left out",
        ],
    )


def own_facts(snap: Snapshot) -> list[tuple[str, str]]:
    """Return the trailer facts about what asgi_pprof itself holds and the last snapshot."""
    return [
        ("asgi_pprof.own_objects", str(snap.own_objects)),
        ("asgi_pprof.own_bytes", str(snap.own_bytes)),
        ("asgi_pprof.snapshot_blocks", str(snap.blocks)),
        ("asgi_pprof.snapshot_seconds", f"{snap.seconds:.3f}"),
        *cache_facts(),
    ]


# --- the profiles -----------------------------------------------------------------------------


class _TracemallocProfile(NamedProfile):
    """What heap and allocs share: tracing ownership, the window mode, the text."""

    opens_window = True
    """Whether ``seconds=N`` turns tracing on for its window when it is off."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.window_frames = options.heap_window_frames
        self.records = 0

    def count(self) -> int:
        """Return the number of records the last collection found (cheap, may be stale)."""
        return self.records

    @abc.abstractmethod
    def _build(self, live: bool) -> ProfileData:
        """Return the profile now (in a worker thread); ``live=False`` leaves out tracemalloc."""

    def _check_tracing(self) -> None:
        if not tracemalloc.is_tracing() or _tracing.only_windows():
            raise ProfileError(403, NOT_TRACING)

    async def _collect(self, live: bool = True) -> ProfileData:
        data = await run_in_thread(self._build, live)
        self.records = len(data.samples)
        return data

    async def collect(self, *, gc: bool = False) -> ProfileData:
        """Return the profile now; 403 with how to turn tracing on when it is off."""
        self._check_tracing()
        return await self._collect()

    async def delta(self, seconds: int, window: Window) -> ProfileData | None:
        """Return growth and shrinkage by stack over ``seconds`` (Go's ``<name>-delta``).

        With tracing off, ``heap`` traces for just this window (window mode, within the
        app's limits): the result is what the window allocated that is still live at its
        end. None if the client left first.
        """
        if self.opens_window and not tracemalloc.is_tracing():
            limits.check_window("heap_window", seconds, self.options)
        # Acquire and release with no await between them and the try: an await could be
        # cancelled and leave tracing on. (start/stop hold the GIL anyway.)
        started = self.opens_window and _tracing.acquire_window(self.window_frames)
        try:
            # A window that started tracing has seen nothing yet: its baseline is empty.
            p0 = await self._collect(live=not started)
            p0.time_nanos = time.time_ns()
            if not await window.wait(seconds):
                return None
            p1 = await self._collect()
            p1.time_nanos = time.time_ns()
            return await run_in_thread(subtract, p0, p1)
        finally:
            if self.opens_window:
                _tracing.release_window()

    def _facts(self, snap: Snapshot) -> list[tuple[str, str]]:
        return [*memory_facts(), *own_facts(snap)]

    async def text(self, debug: int, *, gc: bool = False) -> str:
        """Return Go's heap text format with a Python memory trailer."""
        self._check_tracing()

        def render() -> str:
            snap = take_snapshot()
            snap.rows.sort(key=_largest_first)
            self.records = len(snap.rows)
            return heap_text(snap.rows, self._facts(snap))

        return await run_in_thread(render)


def _largest_first(r: Row) -> tuple[int, int]:
    return (-r[1], -r[0])


class HeapProfile(_TracemallocProfile):
    """``/debug/pprof/heap``: live memory by allocation stack, from tracemalloc."""

    name = "heap"
    description = (
        "A sampling of memory allocations of live objects. You can specify the gc GET "
        "parameter to run GC before taking the heap sample."
    )

    def _build(self, live: bool) -> ProfileData:
        return _heap_data(heap_samples(take_snapshot().rows) if live else [])

    async def encoded(self, *, gc: bool = False) -> bytes:
        """Return the heap as gzipped profile.proto. With the C extensions the snapshot's
        rows are encoded as they are, no Sample made (what a scraper's request meets)."""
        if heap_groups.native is None or native.wire is None:
            return await super().encoded(gc=gc)
        self._check_tracing()
        return await run_in_thread(self._encoded)

    def _encoded(self) -> bytes:
        from . import builder  # in the worker thread: protobuf's import is ~30 ms

        rows = take_snapshot().rows
        self.records = len(rows)
        return builder.encode(
            _heap_data([]), sample_fields=functools.partial(heap_groups.encoded, rows)
        )


class AllocsProfile(_TracemallocProfile):
    """``/debug/pprof/allocs``: GC-trigger samples (cumulative) plus live traced memory."""

    name = "allocs"
    description = "A sampling of all past memory allocations"
    # Scrapers fetch allocs every few seconds (Alloy's memory profile): a window there
    # would keep tracemalloc, and its cost, on nearly all the time. Only heap opens one.
    opens_window = False

    def _check_tracing(self) -> None:
        # allocs always has the GC samples to show; the live columns come with tracing.
        # Its sampler goes on gc.callbacks now, when first asked for, not at import.
        gcsampler.ensure_installed()

    def _build(self, live: bool) -> ProfileData:
        tracing = tracemalloc.is_tracing()
        heap = heap_samples(take_snapshot().rows) if live and tracing else []
        samples = [Sample(s.stack, [*s.values, 0, 0]) for s in gcsampler.sampler.samples()]
        samples += [Sample(s.stack, [0, 0, *s.values]) for s in heap]
        return ProfileData(
            sample_types=[*GC_TYPES, *HEAP_TYPES],
            period_type=PERIOD_TYPE,
            period=1,
            samples=samples,
            time_nanos=time.time_ns(),
            default_sample_type="inuse_space" if tracing else "gc_pause",
            comments=[
                "gc_collections, gc_pause: garbage collections by the stack that triggered "
                "them and their duration, cumulative since the first allocs request",
                "inuse_objects, inuse_space: live blocks traced by tracemalloc"
                + ("" if tracing else " (tracing is off: none)")
                + ", asgi_pprof's own left out",
            ],
        )

    async def delta(self, seconds: int, window: Window) -> ProfileData | None:
        """Return the change over ``seconds``; installs the GC sampler first if needed."""
        gcsampler.ensure_installed()
        return await super().delta(seconds, window)

    def _facts(self, snap: Snapshot) -> list[tuple[str, str]]:
        s = gcsampler.sampler
        gcs = [vals for _, vals in list(s.data.items())]
        return [
            *super()._facts(snap),
            ("gc_samples.stacks", f"{len(gcs)} (max {s.MAX_STACKS})"),
            ("gc_samples.collections", str(sum(v[0] for v in gcs))),
            ("gc_samples.pause_ns", str(sum(v[1] for v in gcs))),
            ("gc_samples.since_ns", str(s.installed_ns)),
        ]


def profiles(options: Options) -> list[NamedProfile]:
    """Return the heap and allocs profiles; start tracing if the options ask for it.

    ``options`` is the app's :class:`~asgi_pprof.options.Options` (``tracemalloc_frames``,
    ``heap_window_frames``, the window limits). Installs nothing process-wide: the GC
    sampler goes on ``gc.callbacks`` when ``allocs`` is first asked for.
    """
    if options.tracemalloc_frames:
        start_tracing(options.tracemalloc_frames)
    return [HeapProfile(options), AllocsProfile(options)]
