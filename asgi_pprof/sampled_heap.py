"""``heap`` and ``allocs`` from the sampled allocation profiler (Go's always-on kind).

Both serve the same cumulative data (:func:`asgi_pprof.memprofile.profile_data`):
``heap`` defaults to ``inuse_space``, ``allocs`` to ``alloc_space``, as Go. ``debug=1``
is Go's heap text, which ``go tool pprof`` reads (it unsamples the raw counts with the
header's rate); ``gc=1`` collects first (heap only, as Go); ``seconds=N`` is Go's delta.
"""

from __future__ import annotations

import gc as _gc
import heapq
import math
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from . import builder, memprofile
from .concurrency import gc_deferred, run_in_thread, yield_gil
from .model import ProfileData, Stack
from .profiles import NamedProfile, ProfileError
from .text import frame_lines, stack_header, tabwrite

if TYPE_CHECKING:
    from .options import Options

__all__ = [
    "SampledAllocsProfile",
    "SampledHeapProfile",
    "heap_text",
    "heap_text_pieces",
    "profiles",
]

_HEAP_DESCRIPTION = (
    "A sampling of memory allocations of live objects. You can specify the gc GET "
    "parameter to run GC before taking the heap sample."
)
_ALLOCS_DESCRIPTION = "A sampling of all past memory allocations"


_FREE_SLICE = 500
"""Items freed at a time: a sample's objects take ~3 us to deallocate, with the GIL."""


def _free_in_slices(*columns: list[Any]) -> None:
    """Empty each list a slice at a time, offering the GIL between slices."""
    for col in columns:
        while col:
            del col[-_FREE_SLICE:]
            yield_gil()


def _raw_at(count: int, size: int, rate: int, header_rate: int) -> tuple[int, int]:
    """Return the counts to print so pprof, scaling by ``header_rate``, gets Go's estimate.

    Records sampled at the header's rate print their raw counts (Go's text); others
    (sampled before a rate change) are scaled with their own rate and converted back.
    """
    if rate == header_rate or count == 0 or size == 0:
        return count, size
    n, b = memprofile.scale_heap_sample(count, size, rate)
    if header_rate <= 1 or n == 0:
        return n, b
    keep = 1 - math.exp(-(b / n) / header_rate)
    return max(1, round(n * keep)), max(1, round(b * keep))


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


_TEXT_PIECE = 1 << 18
"""Bytes of text per piece: rendered between GIL offers, sent as one body message."""


_RUN = 4096
"""Keys sorted per C call (~1 ms); the sorted runs are then merged in Python."""


def _descending(keys: list[int]) -> Iterator[int]:
    """Yield the indices of ``keys``, largest key first, ties in index order (stable).

    Sorted in runs with the GIL offered between them, then merged: one sort of 100 000
    keys is one C call that holds the GIL ~15 ms.
    """
    runs = []
    for start in range(0, len(keys), _RUN):
        run = list(range(start, min(start + _RUN, len(keys))))
        run.sort(key=keys.__getitem__, reverse=True)
        runs.append(run)
        yield_gil()
    if len(runs) == 1:
        return iter(runs[0])
    return heapq.merge(*runs, key=keys.__getitem__, reverse=True)


def heap_text_pieces(
    records: Iterable[memprofile.Record], rate: int, facts: list[tuple[str, str]]
) -> list[bytes]:
    """Return Go's heap ``debug=1`` text (``heap profile: ... @ heap/<2*rate>``), UTF-8,
    in pieces of about 256 KiB, never joined: a 100 000-bucket table's text is 140 MB,
    and one join or encode of it holds the GIL for tens of ms.

    One record per bucket, in-use bytes descending (Go 1.19's order), raw sampled counts
    as Go prints them; the header's alloc bytes get +1 when equal to the in-use bytes
    (Go 1.23), or pprof's parser would read two sample types, not four. Then a
    ``# Python memory`` trailer that says which source answered.
    """
    # Columns of ints, not a tuple per record: ints are not tracked by the collector, so
    # however big the table, a collection meeting this render has nothing to scan.
    ios: list[int] = []
    ibs: list[int] = []
    aos: list[int] = []
    abs_: list[int] = []
    keys: list[int] = []
    stacks: list[Stack] = []
    for r in records:
        io, ib = _raw_at(r.allocs - r.frees, r.alloc_bytes - r.free_bytes, r.rate, rate)
        ao, ab = _raw_at(r.allocs, r.alloc_bytes, r.rate, rate)
        ios.append(io)
        ibs.append(ib)
        aos.append(ao)
        abs_.append(ab)
        keys.append((ib << 64) | io)  # in-use bytes, then in-use objects (io < 2**64)
        stacks.append(r.stack)
    order = _descending(keys)
    tio, tib, tao, tab = sum(ios), sum(ibs), sum(aos), sum(abs_)
    if tab == tib:
        tab += 1
    pieces: list[bytes] = []
    out = [f"heap profile: {tio}: {tib} [{tao}: {tab}] @ heap/{2 * rate}\n"]
    size = 0
    # A stack's lines are the same in each of its buckets (one per size class): made once.
    # Keyed by identity: the records of one table share one tuple per stack.
    tails: dict[int, str] = {}
    for i in order:
        st = stacks[i]
        tail = tails.get(id(st))
        if tail is None:
            lines = tabwrite("".join(ln + "\n" for ln in frame_lines(st)))
            tail = tails[id(st)] = f" {stack_header(st)}\n{lines}\n"
        line = f"{ios[i]}: {ibs[i]} [{aos[i]}: {abs_[i]}]{tail}"
        out.append(line)
        size += len(line)
        if size >= _TEXT_PIECE:
            pieces.append("".join(out).encode())
            out.clear()
            size = 0
        yield_gil()  # a new stack's lines (Go's tabwriter) take up to ~0.2 ms each
    _free_in_slices(ios, ibs, aos, abs_, keys, stacks)
    out.append("\n# Python memory\n")
    out.extend(f"# {k} = {v}\n" for k, v in facts)
    pieces.append("".join(out).encode())
    return pieces


def heap_text(records: Iterable[memprofile.Record], rate: int, facts: list[tuple[str, str]]) -> str:
    """Return :func:`heap_text_pieces` as one string."""
    return b"".join(heap_text_pieces(records, rate, facts)).decode()


def _facts(rate: int) -> list[tuple[str, str]]:
    st = memprofile.stats()
    facts = [
        ("source", "sampled allocations (asgi_pprof._memsample)"),
        ("memory_profile_rate", str(rate)),
    ]
    facts += [(f"sampler.{k}", str(st[k])) for k in sorted(st) if k not in ("rate", "generation")]
    facts += [
        ("gc.count", "[" + " ".join(map(str, _gc.get_count())) + "]"),
        ("gc.enabled", str(_gc.isenabled()).lower()),
        ("sys.allocated_blocks", str(sys.getallocatedblocks())),
        ("RSS", str(_rss())),
    ]
    return facts


class _SampledProfile(NamedProfile):
    """What the sampled heap and allocs share: the data, the text, the source note."""

    default_sample_type = ""
    collects_garbage = False
    source = "sampled"
    """Which source answers (the index page and the lead's dispatch read it)."""

    def __init__(self) -> None:
        self.records = 0

    def count(self) -> int:
        """Return the number of heap profile records (buckets), as Go's index shows."""
        if not memprofile.available():
            return 0
        return memprofile.stats().get("buckets", 0)

    def _check(self) -> None:
        if not memprofile.available():
            raise ProfileError(
                403,
                "sampled heap profile unavailable: " + memprofile.unavailable_reason(),
            )

    def _build(self, gc_first: bool) -> ProfileData:
        if gc_first:
            _gc.collect()
        # Reading a big table makes an object per bucket: enough to trigger full
        # collections, which would hold the GIL (and stall the loop) for 100s of ms.
        with gc_deferred():
            data = memprofile.profile_data(self.default_sample_type)
        self.records = len(data.samples)
        return data

    async def collect(self, *, gc: bool = False) -> ProfileData:
        """Return the profile now (cumulative since sampling started)."""
        self._check()
        return await run_in_thread(self._build, gc and self.collects_garbage)

    def _encode(self, gc_first: bool) -> bytes:
        if gc_first:
            _gc.collect()
        # Built, encoded and freed inside one deferral: the objects of a big table are
        # never seen by a collection (each one over 100 000 buckets' samples held the
        # GIL 30-100 ms), and are freed in slices (one list's dealloc took ~30 ms).
        with gc_deferred():
            data = memprofile.profile_data(self.default_sample_type)
            self.records = len(data.samples)
            raw = builder.profile_bytes(data)
            samples = data.samples
            del data
            _free_in_slices(samples)
        return builder.gzip_bytes(raw)

    async def encoded(self, *, gc: bool = False) -> bytes:
        """Return the gzipped profile.proto now: built, encoded and freed in one thread."""
        self._check()
        return await run_in_thread(self._encode, gc and self.collects_garbage)

    async def text(self, debug: int, *, gc: bool = False) -> list[bytes]:
        """Return Go's heap text with a trailer naming the source, in UTF-8 pieces."""
        self._check()
        gc_first = gc and self.collects_garbage

        def render() -> list[bytes]:
            if gc_first:
                _gc.collect()
            rate = memprofile.memory_profile_rate()
            facts = _facts(rate)  # read before the records, as Go reads MemStats first
            with gc_deferred():
                return heap_text_pieces(memprofile.iter_records(), rate, facts)

        return await run_in_thread(render)


class SampledHeapProfile(_SampledProfile):
    """``/debug/pprof/heap`` from sampled allocations: defaults to ``inuse_space``."""

    name = "heap"
    description = _HEAP_DESCRIPTION
    default_sample_type = ""  # Go writes none: pprof then shows the last type, inuse_space
    collects_garbage = True


class SampledAllocsProfile(_SampledProfile):
    """``/debug/pprof/allocs`` from sampled allocations: defaults to ``alloc_space``."""

    name = "allocs"
    description = _ALLOCS_DESCRIPTION
    default_sample_type = "alloc_space"


def profiles(options: Options) -> list[NamedProfile]:
    """Return the sampled heap and allocs; apply ``options.memory_profile_rate`` if set."""
    rate = getattr(options, "memory_profile_rate", None)
    if rate is not None:
        memprofile.set_memory_profile_rate(rate)
    return [SampledHeapProfile(), SampledAllocsProfile()]
