"""``heap`` and ``allocs`` from the sampled allocation profiler (Go's always-on kind).

Both serve the same cumulative data (:func:`asgi_pprof.memprofile.profile_data`):
``heap`` defaults to ``inuse_space``, ``allocs`` to ``alloc_space``, as Go. ``debug=1``
is Go's heap text, which ``go tool pprof`` reads (it unsamples the raw counts with the
header's rate); ``gc=1`` collects first (heap only, as Go); ``seconds=N`` is Go's delta.
"""

from __future__ import annotations

import gc as _gc
import math
import os
import sys
from typing import TYPE_CHECKING

from . import builder, memprofile
from .concurrency import gc_deferred, run_in_thread, yield_gil
from .model import ProfileData
from .profiles import NamedProfile, ProfileError
from .text import frame_lines, stack_header, tabwrite

if TYPE_CHECKING:
    from .options import Options

__all__ = ["SampledAllocsProfile", "SampledHeapProfile", "heap_text", "profiles"]

_HEAP_DESCRIPTION = (
    "A sampling of memory allocations of live objects. You can specify the gc GET "
    "parameter to run GC before taking the heap sample."
)
_ALLOCS_DESCRIPTION = "A sampling of all past memory allocations"


_FREE_SLICE = 2000
"""Samples freed at a time (their objects' deallocation holds the GIL ~0.3 us each)."""


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


def heap_text(records: list[memprofile.Record], rate: int, facts: list[tuple[str, str]]) -> str:
    """Return Go's heap ``debug=1`` text (``heap profile: ... @ heap/<2*rate>``).

    One record per bucket, in-use bytes descending (Go 1.19's order), raw sampled counts
    as Go prints them; the header's alloc bytes get +1 when equal to the in-use bytes
    (Go 1.23), or pprof's parser would read two sample types, not four. Then a
    ``# Python memory`` trailer that says which source answered.
    """
    rows = []
    for i, r in enumerate(records):
        if i % 1024 == 1023:
            yield_gil()
        io, ib = _raw_at(r.allocs - r.frees, r.alloc_bytes - r.free_bytes, r.rate, rate)
        ao, ab = _raw_at(r.allocs, r.alloc_bytes, r.rate, rate)
        rows.append((io, ib, ao, ab, r.stack))
    rows.sort(key=lambda row: (-row[1], -row[0]))
    tio = sum(r[0] for r in rows)
    tib = sum(r[1] for r in rows)
    tao = sum(r[2] for r in rows)
    tab = sum(r[3] for r in rows)
    if tab == tib:
        tab += 1
    out = [f"heap profile: {tio}: {tib} [{tao}: {tab}] @ heap/{2 * rate}\n"]
    for i, (io, ib, ao, ab, st) in enumerate(rows):
        if i % 256 == 255:
            yield_gil()
        out.append(f"{io}: {ib} [{ao}: {ab}] {stack_header(st)}\n")
        out.append(tabwrite("".join(ln + "\n" for ln in frame_lines(st))))
        out.append("\n")
    out.append("\n# Python memory\n")
    out.extend(f"# {k} = {v}\n" for k, v in facts)
    return "".join(out)


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
            while samples:
                del samples[-_FREE_SLICE:]
                yield_gil()
        return builder.gzip_bytes(raw)

    async def encoded(self, *, gc: bool = False) -> bytes:
        """Return the gzipped profile.proto now: built, encoded and freed in one thread."""
        self._check()
        return await run_in_thread(self._encode, gc and self.collects_garbage)

    async def text(self, debug: int, *, gc: bool = False) -> str:
        """Return Go's heap text with a trailer naming the source."""
        self._check()
        gc_first = gc and self.collects_garbage

        def render() -> str:
            if gc_first:
                _gc.collect()
            rate = memprofile.memory_profile_rate()
            facts = _facts(rate)  # read before the records, as Go reads MemStats first
            with gc_deferred():
                return heap_text(memprofile.records(), rate, facts)

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
