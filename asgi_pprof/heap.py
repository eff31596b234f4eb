"""The ``heap`` and ``allocs`` profiles: tracemalloc snapshots and a GC-trigger sampler.

``heap`` is memory held by live allocations, grouped by the stack that allocated it, as
tracemalloc sees it (``inuse_objects``/``inuse_space``, Go's names and units). tracemalloc
is expensive, so it is never started behind the user's back:

* tracing someone else started (``PYTHONTRACEMALLOC=N``, ``tracemalloc.start``) is used
  and never stopped;
* :func:`start_tracing` (or ``create_app(tracemalloc_frames=N)``) starts it for good;
* ``heap?seconds=N`` with tracing off traces for just that window (refcounted, so
  concurrent windows share one tracing session and the last one out stops it).

``allocs`` is Go's "sampling of all past allocations" as far as pure Python can honestly
go: tracemalloc keeps only live blocks, so there is no cumulative allocation count to
report. It carries two cumulative columns from a sampler on ``gc.callbacks``: every
collection is a sample at the stack that triggered it (gen-0 collections are triggered
by the net growth of GC-tracked objects, one per ``gc.get_threshold()[0]`` of them), with
the time the collection took; plus the live tracemalloc columns when tracing is on. None
of them is named ``alloc_*``: they are not allocation counts, and scrapers that compute
deltas on those names must not treat them as such.
"""

from __future__ import annotations

import abc
import gc
import inspect
import os
import sys
import threading
import time
import tracemalloc
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import symbols
from .concurrency import Window, gc_deferred, is_own_thread, run_in_thread
from .model import Frame, ProfileData, Sample, Stack, ValueType, function_name, subtract
from .profiles import NamedProfile, ProfileError

if TYPE_CHECKING:
    from .options import Options

__all__ = [
    "DEFAULT_FRAMES",
    "AllocsProfile",
    "HeapProfile",
    "profiles",
    "start_tracing",
    "stop_tracing",
    "tracing_state",
]

DEFAULT_FRAMES = 16
"""Frames :func:`start_tracing` keeps per allocation unless told otherwise."""

NOT_TRACING = (
    "heap profile unavailable: tracemalloc is not tracing. Turn it on with "
    "PYTHONTRACEMALLOC=16, create_app(tracemalloc_frames=16) or "
    "asgi_pprof.heap.start_tracing(16), or ask for heap?seconds=N to trace for N seconds only"
)
"""The 403 text for a plain ``heap`` request while tracing is off."""

HEAP_TYPES = [ValueType("inuse_objects", "count"), ValueType("inuse_space", "bytes")]
GC_TYPES = [ValueType("gc_collections", "count"), ValueType("gc_pause", "nanoseconds")]
PERIOD_TYPE = ValueType("space", "bytes")


# --- who owns tracemalloc ------------------------------------------------------------------


class _Tracing:
    """Refcounted ownership of tracemalloc: ours (for good or per window) or someone else's.

    ``owned`` is True only while tracing runs because we started it; we stop only that,
    when neither :func:`start_tracing` nor any window still wants it.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owned = False
        self.persistent = False
        self.windows = 0

    def acquire_window(self, frames: int) -> bool:
        """Make sure tracing is on for a window; return True if this window started it."""
        with self.lock:
            if tracemalloc.is_tracing():
                if self.owned:
                    self.windows += 1
                return False
            self.forget_if_stopped()
            tracemalloc.start(frames)
            self.owned = True
            self.windows += 1
            return True

    def forget_if_stopped(self) -> None:
        """Drop our claim on tracing someone stopped under us (call with the lock held)."""
        if self.owned and not tracemalloc.is_tracing():
            # Windows still open keep their count: each releases once, as always.
            self.owned = self.persistent = False

    def release_window(self) -> None:
        """End one window; stop tracing if it was ours and nobody else wants it."""
        with self.lock:
            if not self.owned:
                return
            self.windows = max(0, self.windows - 1)
            self._stop_if_unwanted()

    def _stop_if_unwanted(self) -> bool:
        if self.owned and not self.persistent and self.windows == 0:
            # The user may have stopped it under us; stop() is harmless then.
            tracemalloc.stop()
            self.owned = False
            return True
        return False

    def only_windows(self) -> bool:
        """Return True when tracing is on only because a window asked for it."""
        return tracemalloc.is_tracing() and self.owned and not self.persistent


_tracing = _Tracing()


def start_tracing(frames: int = DEFAULT_FRAMES) -> bool:
    """Start tracemalloc with ``frames`` frames per allocation and keep it on.

    Returns True if this call started it, False if it was already tracing (then the
    frame limit already in effect stays: tracemalloc cannot change it without stopping).
    """
    if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= 1000:
        raise ValueError(f"frames must be an int between 1 and 1000, got {frames!r}")
    with _tracing.lock:
        if tracemalloc.is_tracing():
            if _tracing.owned:
                _tracing.persistent = True
            return False
        _tracing.forget_if_stopped()
        tracemalloc.start(frames)
        _tracing.owned = _tracing.persistent = True
        return True


def stop_tracing() -> bool:
    """Stop tracemalloc if :func:`start_tracing` started it; return True if it stopped now.

    Tracing started by anyone else is never stopped. While a ``heap?seconds=N`` window
    still uses it, it stops when that window ends.
    """
    with _tracing.lock:
        _tracing.persistent = False
        return _tracing._stop_if_unwanted()


def tracing_state() -> str:
    """Return ``"off"``, ``"user"`` (someone else's), ``"on"`` (ours) or ``"window"``."""
    with _tracing.lock:
        if not tracemalloc.is_tracing():
            return "off"
        if not _tracing.owned:
            return "user"
        return "on" if _tracing.persistent else "window"


# --- (filename, line) -> Frame --------------------------------------------------------------


_Traceback = tuple[tuple[str, int], ...]
"""tracemalloc's frames of one traceback, leaf first: ``((filename, line), ...)``."""


class _Symbolizer:
    """Names the functions of tracemalloc frames, which carry only a file and a line.

    For each file it finds the module's live code objects (functions, methods, and the
    nested ones in their ``co_consts``) and maps every line to the codes that own it,
    so frames get the CPU profile's names: ``module.co_qualname`` and
    ``co_firstlineno``. Lines no function owns are ``module.<module>``. No source is
    read or compiled: compiling holds the GIL, and a cold server imports hundreds of files.
    """

    def __init__(self) -> None:
        self.files: dict[str, dict[int, list[tuple[str, int]]]] = {}
        self.frames: dict[tuple[str, int], Frame] = {}
        self.outer: dict[tuple[tuple[str, int], int], Frame] = {}
        self.stacks: dict[_Traceback, Stack] = {}
        self.cells: dict[tuple[str, int], tuple[str, str, str, str]] = {}
        self.modules: dict[str, str] = {}
        self.lock = threading.Lock()

    def _module_of(self, filename: str) -> str | None:
        if filename.startswith("<frozen ") and filename.endswith(">"):
            return filename[8:-1]
        name = self.modules.get(filename)
        if name is None:
            for mod_name, mod in list(sys.modules.items()):
                f = getattr(mod, "__file__", None)
                if isinstance(f, str):
                    self.modules.setdefault(f, mod_name)
            name = self.modules.setdefault(filename, "")
        return name or None

    def frame(self, fr: tuple[str, int], depth: int = 0) -> Frame:
        """Return the :class:`Frame` of tracemalloc's ``(filename, line)``.

        A line can belong to several nested codes (``[f(x) for x in y]``): ``depth`` 0
        is the innermost, 1 the one around it, and so on.
        """
        # Keyed by tracemalloc's own tuple: hashing it allocates nothing, and while
        # tracing every allocation of ours is traced (slowly) too.
        got = self.frames.get(fr) if depth == 0 else self.outer.get((fr, depth))
        if got is not None:
            return got
        filename, line = fr
        with self.lock:
            if len(self.frames) > 200_000:
                self.frames.clear()
                self.outer.clear()
                self.cells.clear()
            module = self._module_of(filename)
            lines = self.files.get(filename)
            if lines is None:
                lines = self.files[filename] = _line_owners(filename, module)
            owners = lines.get(line)
            qual, start = owners[min(depth, len(owners) - 1)] if owners else ("<module>", 1)
            prefix = module or os.path.splitext(os.path.basename(filename))[0] or filename
            got = Frame(f"{prefix}.{qual}", filename, start, line)
            if depth == 0:
                self.frames[fr] = got
            else:
                self.outer[(fr, depth)] = got
        return got

    def stack(self, frames: _Traceback) -> Stack:
        """Return a leaf-first :data:`Stack` for tracemalloc's leaf-first frame tuples."""
        st = self.stacks.get(frames)
        if st is None:
            if len(self.stacks) > 100_000:
                self.stacks.clear()
            st = self.stacks[frames] = tuple(
                self.frame(fr, depth) for fr, depth in zip(frames, _depths(frames), strict=True)
            )
        return st

    def text_cells(self, frames: _Traceback) -> list[tuple[str, str, str, str]]:
        """Return each frame's `` 0x<return pc>`` word and its three text cells (cached)."""
        out = []
        for fr, depth in zip(frames, _depths(frames), strict=True):
            c = self.cells.get(fr) if depth == 0 else None
            if c is None:
                f = self.frame(fr, depth)
                pc = symbols.address_of(f)
                c = (
                    f" {pc + 1:#x}",
                    f"{pc:#x}",
                    f"{f.function}+{pc - symbols.entry_of(f):#x}",
                    f"{f.filename}:{f.line}",
                )
                if depth == 0:
                    self.cells[fr] = c
            out.append(c)
        return out


def _depths(frames: _Traceback) -> list[int]:
    """Return, per frame, how many frames just below it (leafward) are on the same line.

    A caller on the very line of its callee is the code around it (a comprehension's
    function, a lambda's definer): that is how a line shared by nested codes is split.
    """
    out = []
    prev: tuple[str, int] | None = None
    depth = 0
    for fr in frames:
        depth = depth + 1 if fr == prev else 0
        prev = fr
        out.append(depth)
    return out


def _line_owners(filename: str, module: str | None) -> dict[int, list[tuple[str, int]]]:
    """Return ``{line: [(co_qualname, co_firstlineno), ...]}``, innermost code first.

    Only the live code of ``filename``'s module is seen: what its namespace, classes and
    their nested code objects reach. Other lines are module-level code.
    """
    mod = sys.modules.get(module) if module else None
    if mod is None:
        return {}
    owners: dict[int, list[tuple[str, int]]] = {}
    seen: set[int] = set()

    def add_code(code: types.CodeType) -> None:
        if id(code) in seen or code.co_filename != filename:
            return
        seen.add(id(code))
        owner = (getattr(code, "co_qualname", code.co_name), code.co_firstlineno)
        for line in {ln for _, _, ln in code.co_lines() if ln is not None}:
            owners.setdefault(line, []).insert(0, owner)
        for const in code.co_consts:  # nested codes after their parent: inner comes first
            if isinstance(const, types.CodeType):
                add_code(const)

    def add(obj: object, depth: int) -> None:
        # Only known types, read statically: a getattr on an arbitrary object runs its
        # __getattr__ (pytest's mark generator, lazy proxies), and a profiler must not.
        if depth > 8 or id(obj) in seen:
            return
        if isinstance(obj, type):
            attrs = obj.__dict__
            if attrs.get("__module__") != module:
                return
            seen.add(id(obj))
            inner: list[object] = list(attrs.values())
        elif isinstance(obj, types.FunctionType):
            add_code(obj.__code__)
            inner = [obj.__dict__.get("__wrapped__")]
        elif isinstance(obj, staticmethod | classmethod | types.MethodType):
            inner = [obj.__func__]
        elif isinstance(obj, property):
            inner = [obj.fget, obj.fset, obj.fdel]
        else:  # e.g. functools.lru_cache and other wrappers
            inner = [inspect.getattr_static(obj, "__wrapped__", None)]
        for v in inner:
            if v is not None:
                add(v, depth + 1)

    for v in list(vars(mod).values()):
        add(v, 0)
    return owners


_symbolizer = _Symbolizer()


# --- snapshots --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Timing:
    """How long the last snapshot held the GIL (the loop is stuck that long)."""

    snapshot_seconds: float = 0.0
    blocks: int = 0
    thread: str = ""


last_snapshot = _Timing()


def _snapshot_groups() -> dict[_Traceback, list[int]]:
    """Return the sizes of live traced blocks grouped by traceback (leaf first).

    ``_get_traces`` is one C call that holds the GIL for its whole run (under a
    microsecond per block); that is the only part that stalls the event loop. The loop
    below allocates nothing per block (no ``id()`` ints, no running sums): while tracing,
    every allocation of ours is traced too, which made a first version 13x slower.
    """
    import _tracemalloc

    t0 = time.perf_counter()
    # typeshed says Sequence; CPython returns tuples, which we need as dict keys.
    traces: Sequence[tuple[int, int, _Traceback, int | None]] = _tracemalloc._get_traces()  # type: ignore[assignment]
    last_snapshot.snapshot_seconds = time.perf_counter() - t0
    last_snapshot.blocks = len(traces)
    last_snapshot.thread = threading.current_thread().name
    groups: dict[_Traceback, list[int]] = {}
    get = groups.get
    for t in traces:
        sizes = get(t[2])
        if sizes is None:
            sizes = groups[t[2]] = []
        sizes.append(t[1])
    return groups


def _heap_samples() -> list[Sample]:
    """Return one sample per allocation stack: ``[inuse_objects, inuse_space]``."""
    # Distinct tracebacks give distinct stacks (a frame is its file and line): no merging.
    stack = _symbolizer.stack
    return [Sample(stack(tb), [len(sizes), sum(sizes)]) for tb, sizes in _snapshot_groups().items()]


def _heap_data(samples: list[Sample]) -> ProfileData:
    return ProfileData(
        sample_types=list(HEAP_TYPES),
        period_type=PERIOD_TYPE,
        period=1,  # tracemalloc traces every allocation: nothing to scale
        samples=samples,
        time_nanos=time.time_ns(),
        comments=[f"tracemalloc frames={tracemalloc.get_traceback_limit()}"],
    )


# --- the GC-trigger sampler behind allocs -----------------------------------------------------


class _GcSampler:
    """Counts garbage collections by the Python stack that triggered them, and their time.

    Installed once on ``gc.callbacks``. A collection runs in the thread whose allocation
    pushed gen-0 over its threshold, so the stack at ``start`` is a sample of where GC-tracked
    objects pile up (and who pays for collections). Cheap: two calls per collection.
    """

    MAX_STACKS = 20_000
    MAX_DEPTH = 64

    def __init__(self) -> None:
        self.data: dict[tuple[tuple[types.CodeType, int], ...], list[int]] = {}
        self.installed = False
        self._current: tuple[tuple[types.CodeType, int], ...] | None = None
        self._t0 = 0
        self.lock = threading.Lock()

    def install(self) -> None:
        """Add the callback to ``gc.callbacks`` once."""
        with self.lock:
            if not self.installed:
                gc.callbacks.append(self._callback)
                self.installed = True

    def uninstall(self) -> None:
        """Remove the callback (tests, benchmarks); collected data is kept."""
        with self.lock:
            if self.installed:
                gc.callbacks.remove(self._callback)
                self.installed = False

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        try:
            self._record(phase)
        except Exception:  # pragma: no cover - e.g. at interpreter shutdown
            # Never let a profiler's error surface in whatever code triggered a collection.
            self._current = None

    def _record(self, phase: str) -> None:
        if phase == "start":
            if is_own_thread(threading.current_thread().name):
                self._current = None
                return
            # The caller of this callback; None when C code collected with no Python frame.
            f: types.FrameType | None = sys._getframe(0).f_back
            key: list[tuple[types.CodeType, int]] = []
            while f is not None and len(key) < self.MAX_DEPTH:
                key.append((f.f_code, f.f_lineno or 0))
                f = f.f_back
            self._current = tuple(key)
            self._t0 = time.perf_counter_ns()
        elif self._current is not None:
            pause = time.perf_counter_ns() - self._t0
            stack, self._current = self._current, None
            vals = self.data.get(stack)
            if vals is None:
                if len(self.data) >= self.MAX_STACKS:
                    stack = ()  # bounded memory: the overflow is one stackless sample
                vals = self.data.setdefault(stack, [0, 0])
            vals[0] += 1
            vals[1] += pause

    def samples(self) -> list[Sample]:
        """Return ``[gc_collections, gc_pause]`` per triggering stack, cumulative."""
        out = []
        for key, vals in list(self.data.items()):  # list(): atomic copy under the GIL
            stack = tuple(self._frame(code, line) for code, line in key)
            out.append(Sample(stack, [vals[0], vals[1]]))
        return out

    def _frame(self, code: types.CodeType, line: int) -> Frame:
        # Here we have the code object itself: name it exactly as the CPU profile does.
        module = _symbolizer._module_of(code.co_filename)
        return Frame(function_name(code, module), code.co_filename, code.co_firstlineno, line)


_gc_sampler = _GcSampler()


# --- Go's heap text ---------------------------------------------------------------------------


def _max_rss() -> int:
    try:
        import resource  # not on Windows
    except ImportError:  # pragma: no cover - platform dependent
        return 0
    # Linux reports KiB (as Go's MaxRSS does, we print bytes).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def memory_facts() -> list[tuple[str, str]]:
    """Return the Python memory facts of the text trailer, in place of Go's MemStats."""
    current, peak = tracemalloc.get_traced_memory()
    stats = gc.get_stats()
    facts = [
        ("tracemalloc.tracing", str(tracemalloc.is_tracing()).lower()),
        ("tracemalloc.state", tracing_state()),
        ("tracemalloc.frames", str(tracemalloc.get_traceback_limit())),
        ("tracemalloc.current", str(current)),
        ("tracemalloc.peak", str(peak)),
        ("tracemalloc.overhead", str(tracemalloc.get_tracemalloc_memory())),
        ("gc.count", "[" + " ".join(map(str, gc.get_count())) + "]"),
        ("gc.threshold", "[" + " ".join(map(str, gc.get_threshold())) + "]"),
        ("gc.collections", "[" + " ".join(str(s["collections"]) for s in stats) + "]"),
        ("gc.collected", "[" + " ".join(str(s["collected"]) for s in stats) + "]"),
        ("gc.uncollectable", "[" + " ".join(str(s["uncollectable"]) for s in stats) + "]"),
        ("gc.enabled", str(gc.isenabled()).lower()),
        ("sys.allocated_blocks", str(sys.getallocatedblocks())),
        ("RSS", str(_rss())),
        ("MaxRSS", str(_max_rss())),
    ]
    return facts


_TABS = ["\t" * i for i in range(64)]


def _tabs(n: int) -> str:
    return _TABS[n] if n < 64 else "\t" * n


Row = tuple[int, int, _Traceback]
"""One heap text record: ``(inuse_objects, inuse_space, traceback)``."""


def _live_rows() -> list[Row]:
    """Return the live traced blocks as heap text records, largest first."""
    rows = [(len(sizes), sum(sizes), tb) for tb, sizes in _snapshot_groups().items()]
    rows.sort(key=lambda r: (-r[1], -r[0]))
    return rows


def _write_record(write: Callable[[str], None], cells: list[tuple[str, str, str, str]]) -> None:
    """Write a record's frame lines as ``tabwrite(frame_lines(stack))`` in ``text`` would.

    Built from cached cells and written piecewise, allocating nothing per line: a heap
    has tens of thousands of records, and while tracemalloc runs every object we
    allocate is traced too (the generic path took ~50 s for 17k records with 16 frames).
    """
    if not cells:
        write("#\t0x0\n")
        return
    # Go's tabwriter: a column is as wide as its widest cell plus one, rounded up to 8,
    # and a cell is followed by as many tabs as it takes to reach that width.
    w1 = -(-(max(len(c[1]) for c in cells) + 1) // 8) * 8
    w2 = -(-(max(len(c[2]) for c in cells) + 1) // 8) * 8
    for _, pc, fn, loc in cells:
        write("#\t")
        write(pc)
        write(_tabs(-(-(w1 - len(pc)) // 8)))
        write(fn)
        write(_tabs(-(-(w2 - len(fn)) // 8)))
        write(loc)
        write("\n")


def heap_text(rows: list[Row], facts: list[tuple[str, str]]) -> str:
    """Return Go's heap ``debug=1`` text for ``rows``, with a Python memory trailer.

    Python does not count freed allocations, so the ``[alloc]`` pair repeats the in-use
    pair; the header's alloc bytes get +1 when equal (as Go 1.23 does) so pprof's parser
    still reads four sample types. The rate is 1 (``heap/2``): nothing is sampled.
    Records come in the order given (largest first: Go 1.19's order).
    """
    objs = sum(r[0] for r in rows)
    size = sum(r[1] for r in rows)
    # list.append allocates nothing per call (StringIO.write does).
    out: list[str] = []
    write = out.append
    write(f"heap profile: {objs}: {size} [{objs}: {size + 1}] @ heap/2\n")
    for n, b, tb in rows:
        write(f"{n}: {b} [{n}: {b}] @")
        cells = _symbolizer.text_cells(tb)
        for c in cells:
            write(c[0])
        write("\n")
        _write_record(write, cells)
        write("\n")
    write("\n# Python memory\n")
    for k, v in facts:
        write(f"# {k} = {v}\n")
    return "".join(out)


# --- the profiles -----------------------------------------------------------------------------


class _TracemallocProfile(NamedProfile):
    """What heap and allocs share: tracing ownership, the window mode, the text."""

    opens_window = True
    """Whether ``seconds=N`` turns tracing on for its window when it is off."""

    def __init__(self, window_frames: int) -> None:
        self.window_frames = window_frames
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

    def _build_deferred(self, live: bool) -> ProfileData:
        # A snapshot makes a tuple per live block: enough to trigger full collections,
        # which over a heap that big hold the GIL (and stall the loop) for 100s of ms.
        with gc_deferred():
            return self._build(live)

    async def _collect(self, live: bool = True) -> ProfileData:
        data = await run_in_thread(self._build_deferred, live)
        self.records = len(data.samples)
        return data

    async def collect(self, *, gc: bool = False) -> ProfileData:
        """Return the profile now; 403 with how to turn tracing on when it is off."""
        self._check_tracing()
        return await self._collect()

    async def delta(self, seconds: int, window: Window) -> ProfileData | None:
        """Return growth and shrinkage by stack over ``seconds`` (Go's ``<name>-delta``).

        With tracing off, ``heap`` traces for just this window: the result is what the
        window allocated that is still live at its end. None if the client left first.
        """
        # Acquire and release on the loop, with no await between them and the try: an
        # await could be cancelled and leave tracing on. (start/stop hold the GIL anyway.)
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

    def _facts(self) -> list[tuple[str, str]]:
        return memory_facts()

    async def text(self, debug: int, *, gc: bool = False) -> str:
        """Return Go's heap text format with a Python memory trailer."""
        self._check_tracing()

        def render() -> str:
            with gc_deferred():
                rows = _live_rows() if tracemalloc.is_tracing() else []
                self.records = len(rows)
                return heap_text(rows, self._facts())

        return await run_in_thread(render)


class HeapProfile(_TracemallocProfile):
    """``/debug/pprof/heap``: live memory by allocation stack, from tracemalloc."""

    name = "heap"
    description = (
        "A sampling of memory allocations of live objects. You can specify the gc GET "
        "parameter to run GC before taking the heap sample."
    )

    def _build(self, live: bool) -> ProfileData:
        return _heap_data(_heap_samples() if live else [])


class AllocsProfile(_TracemallocProfile):
    """``/debug/pprof/allocs``: GC-trigger samples (cumulative) plus live traced memory."""

    name = "allocs"
    description = "A sampling of all past memory allocations"
    # Scrapers fetch allocs every few seconds (Alloy's memory profile): a window there
    # would keep tracemalloc, and its cost, on nearly all the time. Only heap opens one.
    opens_window = False

    def _check_tracing(self) -> None:
        # allocs always has the GC samples to show; the live columns come with tracing.
        pass

    def _build(self, live: bool) -> ProfileData:
        tracing = tracemalloc.is_tracing()
        heap = _heap_samples() if live and tracing else []
        samples = [Sample(s.stack, [*s.values, 0, 0]) for s in _gc_sampler.samples()]
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
                "them and their duration, cumulative since the sampler was installed",
                "inuse_objects, inuse_space: live blocks traced by tracemalloc"
                + ("" if tracing else " (tracing is off: none)"),
            ],
        )

    def _facts(self) -> list[tuple[str, str]]:
        gcs = [vals for _, vals in list(_gc_sampler.data.items())]
        return [
            *memory_facts(),
            ("gc_samples.stacks", str(len(gcs))),
            ("gc_samples.collections", str(sum(v[0] for v in gcs))),
            ("gc_samples.pause_ns", str(sum(v[1] for v in gcs))),
        ]


def profiles(options: Options) -> list[NamedProfile]:
    """Return the heap and allocs profiles; start tracing if the options ask for it.

    ``options`` is the app's :class:`~asgi_pprof.options.Options` (``tracemalloc_frames``,
    ``heap_window_frames``). Installs the GC-trigger sampler (once per process).
    """
    if options.tracemalloc_frames:
        start_tracing(options.tracemalloc_frames)
    _gc_sampler.install()
    return [HeapProfile(options.heap_window_frames), AllocsProfile(options.heap_window_frames)]
