"""Go's memory profile for Python: the sampled allocation profiler and its public switch.

The one module that loads the native extension (``asgi_pprof._memsample``), decides on
the fallback, and turns the native table into :class:`~asgi_pprof.model.ProfileData`.

Sampling is Go's ``runtime.MemProfileRate``: about one allocation per ``rate`` bytes
allocated is sampled (a Poisson process over bytes, so big and small allocations are
sampled without bias), with the Python stack that made it. Frees of sampled blocks are
seen, so in-use figures are right for the sampled set. Values are unsampled with Go's
formula: each (count, bytes) pair is scaled by ``1 / (1 - exp(-avg_size / rate))``.
Only allocations made after sampling starts are seen.

Switches, in the order they apply:

* ``ASGI_PPROF_NO_NATIVE=1`` (environment, read at import): never load the extension;
  ``heap`` and ``allocs`` come from tracemalloc.
* ``ASGI_PPROF_MEMORY_PROFILE_RATE=N`` (environment, read at import): start sampling at
  ``N`` bytes (0 leaves it off), so an unmodified program can turn it on.
* :func:`set_memory_profile_rate` (``create_app(memory_profile_rate=N)`` calls it).
* :data:`ON_BY_DEFAULT`: whether importing asgi_pprof starts sampling at
  :data:`DEFAULT_RATE` when nothing above said otherwise.

The extension is missing when it could not be built (no compiler at install time),
on another interpreter or on a free-threaded build: that is logged once, never an
error. The RAW allocator domain is not sampled (see ``_memsample.c``).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

from . import native
from .concurrency import yield_gil
from .model import Frame, ProfileData, Sample, Stack, ValueType, function_name
from .native import untracked

__all__ = [
    "DEFAULT_RATE",
    "ENV_NO_NATIVE",
    "ENV_RATE",
    "ON_BY_DEFAULT",
    "SAMPLE_TYPES",
    "Record",
    "available",
    "iter_records",
    "memory_profile_rate",
    "profile_data",
    "records",
    "scale_heap_sample",
    "set_memory_profile_rate",
    "stats",
    "unavailable_reason",
]

log = logging.getLogger("asgi_pprof")

DEFAULT_RATE = 512 * 1024
"""Go's default ``runtime.MemProfileRate``: one sample per 512 KiB allocated, on average."""

ON_BY_DEFAULT = False
"""Whether importing asgi_pprof starts sampling at :data:`DEFAULT_RATE` (Go: always on).

Off: the benchmark (bench/bench_memsample.py) puts the cost over Go's "minimal
overhead" (x0.98 throughput) on the reference app's JSON route: x0.95-0.96, +4-5 % CPU
per request, nearly all of it the allocator hook's extra call (hooks on at rate 0 cost
the same), which no rate lowers. Flip this one constant to turn it on."""

ENV_NO_NATIVE = native.ENV_NO_NATIVE
ENV_RATE = "ASGI_PPROF_MEMORY_PROFILE_RATE"
MAX_RATE = 1 << 62

SAMPLE_TYPES = [
    ValueType("alloc_objects", "count"),
    ValueType("alloc_space", "bytes"),
    ValueType("inuse_objects", "count"),
    ValueType("inuse_space", "bytes"),
]
PERIOD_TYPE = ValueType("space", "bytes")

_CHUNK = 256
"""Buckets read per native call; the GIL is offered to other threads between calls."""


# --- loading ------------------------------------------------------------------------------


_native, _reason = native.load_or_why("_memsample")
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # A thread of the parent may have held the lock at fork(); it does not exist here.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
_warned = False
_requested = 0
_started_ns = 0


def available() -> bool:
    """Return True when the native sampler is loaded (else heap/allocs use tracemalloc)."""
    return _native is not None


def unavailable_reason() -> str:
    """Return why the native sampler is not loaded ("" when it is)."""
    return _reason


def _note_fallback() -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning(
            "asgi_pprof: sampled memory profiling is unavailable (%s); heap and allocs "
            "come from tracemalloc",
            _reason,
        )


def _check_rate(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"memory profile rate must be an int, not {type(n).__name__}")
    if not 0 <= n <= MAX_RATE:
        raise ValueError(f"memory profile rate must be between 0 and 2**62 bytes, got {n}")
    return n


def set_memory_profile_rate(n: int) -> int:
    """Set Go's ``runtime.MemProfileRate``: sample about one allocation per ``n`` bytes.

    0 turns sampling off (the profile keeps what it has, and frees of sampled blocks are
    still seen), 1 samples every allocation (slow: a stack per allocation). Returns
    the previous rate. Only allocations made after sampling starts are seen. Without
    the native extension this logs once and returns 0 (heap/allocs use tracemalloc).
    """
    global _requested, _started_ns
    n = _check_rate(n)
    with _lock:
        _requested = n
        if _native is None:
            if n:
                _note_fallback()
            return 0
        prev = int(_native.set_rate(n))
        if n and not _started_ns:
            _started_ns = time.time_ns()
        _wrap_tracemalloc_stop()
        return prev


def memory_profile_rate() -> int:
    """Return the sampling rate in bytes (0: off, or the native sampler is unavailable)."""
    return int(_native.get_rate()) if _native is not None else 0


def stats() -> dict[str, int]:
    """Return the native sampler's counters (samples, live, buckets, table_bytes, ...)."""
    return dict(_native.stats()) if _native is not None else {}


def _rehook() -> None:
    """Put our hooks back where someone removed them (tracemalloc.stop restores its own)."""
    if _native is not None and _native.rehook():
        log.info("asgi_pprof: memory sampler hooks were displaced; put back")


# tracemalloc.stop() restores the allocator tracemalloc found when it started. If that
# was before our hooks went on, stop() drops ours: the native rehook_after puts them
# back before any other thread runs, so no allocation or free goes unseen. (A stop
# through _tracemalloc directly is caught at the next profile read, with a gap.)
# tracemalloc started after us stacks on top, and its stop() puts ours back itself.
_original_stop: Callable[[], None] | None = None


def _wrap_tracemalloc_stop() -> None:
    global _original_stop
    if _original_stop is not None or _native is None:
        return
    original = tracemalloc.stop
    _original_stop = original
    native = _native

    @functools.wraps(original)
    def stop() -> None:
        native.rehook_after(original)

    tracemalloc.stop = stop


# --- reading the table --------------------------------------------------------------------


class Record:
    """One native bucket: a stack, a size class, the rate it was sampled at, raw counts.

    Counts are the sampled allocations (and frees of them); bytes are their exact sizes.
    """

    __slots__ = ("alloc_bytes", "allocs", "free_bytes", "frees", "rate", "size", "stack")

    def __init__(
        self,
        stack: Stack,
        size: int,
        rate: int,
        allocs: int,
        alloc_bytes: int,
        frees: int,
        free_bytes: int,
    ) -> None:
        self.stack = stack
        self.size = size
        self.rate = rate
        self.allocs = allocs
        self.alloc_bytes = alloc_bytes
        self.frees = frees
        self.free_bytes = free_bytes

    @property
    def block_size(self) -> int:
        """Return the average size of the sampled allocations (Go's ``bytes`` label)."""
        return self.alloc_bytes // self.allocs if self.allocs else 0


_OVERFLOW = (Frame("asgi_pprof.<memory profile stack table full>", "", 0, 0),)
_stacks: dict[int, Stack] = {}
_frames: dict[tuple[int, object, int], Frame] = {}
"""One Frame per (code object, module name, line) of the table: stacks share their frames,
so naming a new stack makes about one new object per new line, not one per frame (each
object made is one more for every later collection to scan). Keyed by the code object's
id: the native table holds every code object of a generation alive."""
_stacks_generation = -1


def _stack(native: Any, sid: int, generation: int) -> Stack:
    global _stacks_generation
    if generation != _stacks_generation:
        _stacks.clear()
        _frames.clear()
        _stacks_generation = generation
    st = _stacks.get(sid)
    if st is None:
        raw = native.stack(sid)
        if raw is None:
            st = _OVERFLOW
        else:
            frames = []
            for code, mod, line in raw:
                key = (id(code), mod, line)
                f = _frames.get(key)
                if f is None:
                    # Named exactly as the CPU profile names a live frame (model.frame_of).
                    name = function_name(code, mod)
                    f = Frame(name, code.co_filename, code.co_firstlineno, line)
                    _frames[untracked(key)] = f = untracked(f)
                frames.append(f)
            st = untracked(tuple(frames))
        _stacks[sid] = st
    return st


def iter_records() -> Iterator[Record]:
    """Yield every bucket of the table (raw counts), read in short native calls.

    The GIL is offered to other threads between calls; nothing holds the whole table
    (freeing 100 000 records at once held the GIL ~8 ms).
    """
    if _native is None:
        return
    _rehook()
    native = _native
    generation = native.stats()["generation"]
    start = 0
    while True:
        chunk = native.buckets(start, _CHUNK)
        for sid, size, rate, allocs, alloc_bytes, frees, free_bytes in chunk:
            st = _stack(native, sid, generation)
            yield Record(st, size, rate, allocs, alloc_bytes, frees, free_bytes)
            # Offered per record (it gives the GIL up only when due): naming new stacks
            # and the caller's work on 256 records held it up to 3.3 ms between offers.
            yield_gil()
        if len(chunk) < _CHUNK:
            return
        start += _CHUNK


def records() -> list[Record]:
    """Return every bucket of the table (raw counts)."""
    return list(iter_records())


def scale_heap_sample(count: int, size: int, rate: int) -> tuple[int, int]:
    """Return Go's unsampled estimate of a (count, bytes) pair sampled at ``rate``.

    As ``runtime/pprof.scaleHeapSample``: no scaling when either is 0 or ``rate <= 1``.
    """
    if count == 0 or size == 0:
        return 0, 0
    if rate <= 1:
        return count, size
    avg = size / count
    scale = 1 / (1 - math.exp(-avg / rate))
    return int(count * scale), int(size * scale)


def source_comment(rate: int) -> str:
    """Return the comment that says which source answered (proto comment, text trailer)."""
    return (
        f"source: sampled allocations (asgi_pprof._memsample), rate {rate} bytes "
        "(Go's MemProfileRate); RAW-domain allocations are not seen"
    )


def profile_data(default_sample_type: str) -> ProfileData:
    """Return the heap profile now: Go's four sample types, period = the current rate.

    Cumulative since sampling started (``alloc_*`` only grow), so scrapers' diffs work.
    One sample per (stack, size class) with Go's ``bytes`` label (the average size);
    buckets sampled at an earlier rate are scaled with their own rate.
    """
    rate = memory_profile_rate()
    samples = []
    for r in iter_records():
        ao, ab = scale_heap_sample(r.allocs, r.alloc_bytes, r.rate)
        io, ib = scale_heap_sample(r.allocs - r.frees, r.alloc_bytes - r.free_bytes, r.rate)
        size = r.block_size
        labels = (("bytes", size, ""),) if size else ()
        samples.append(Sample(r.stack, [ao, ab, io, ib], num_labels=labels))
    return ProfileData(
        sample_types=list(SAMPLE_TYPES),
        period_type=PERIOD_TYPE,
        period=rate,
        samples=samples,
        time_nanos=time.time_ns(),
        default_sample_type=default_sample_type,
        comments=[source_comment(rate)],
    )


def _from_env() -> None:
    word = os.environ.get(ENV_RATE, "").strip()
    if word:
        try:
            n = _check_rate(int(word))
        except (TypeError, ValueError):
            log.warning("asgi_pprof: ignoring %s=%r: not a rate in bytes >= 0", ENV_RATE, word)
            return
        set_memory_profile_rate(n)
    elif ON_BY_DEFAULT and _native is not None:
        set_memory_profile_rate(DEFAULT_RATE)


_from_env()
