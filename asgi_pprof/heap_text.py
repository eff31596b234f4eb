"""Go's heap text (``heap?debug=1``, ``allocs?debug=1``) with a Python memory trailer.

Written record by record from cached per-frame cells, allocating almost nothing per
line: a heap has tens of thousands of records of up to ``tracemalloc frames`` lines, and
while tracemalloc runs every object we allocate is traced (slowly) too.
"""

from __future__ import annotations

import gc
import os
import sys
import tracemalloc
from collections.abc import Callable, Iterable

from .concurrency import gc_checkpoint, gc_enabled
from .heap_names import Cells, Traceback, names
from .tracemalloc_owner import tracing_state

__all__ = ["Row", "heap_text", "memory_facts", "write_record"]

Row = tuple[int, int, Traceback]
"""One heap text record: ``(inuse_objects, inuse_space, traceback)``."""

_TABS = ["\t" * i for i in range(64)]
_CHECK_EVERY = 2048


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
    """Return the Python memory facts of the text trailer, in place of Go's MemStats.

    ``gc.enabled`` is the process's own setting, not a deferral of ours in progress.
    """
    current, peak = tracemalloc.get_traced_memory()
    stats = gc.get_stats()
    return [
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
        ("gc.enabled", str(gc_enabled()).lower()),
        ("sys.allocated_blocks", str(sys.getallocatedblocks())),
        ("RSS", str(_rss())),
        ("MaxRSS", str(_max_rss())),
    ]


def write_record(write: Callable[[str], None], cells: Iterable[Cells]) -> None:
    """Write a record's frame lines as ``tabwrite(frame_lines(stack))`` in ``text`` would.

    Go's tabwriter: a column is as wide as its widest cell plus one, rounded up to 8,
    and a cell is followed by as many tabs as it takes to reach that width.
    """
    cs = cells if isinstance(cells, list) else list(cells)
    if not cs:
        write("#\t0x0\n")
        return
    w1 = w2 = 0
    for c in cs:
        if len(c[1]) > w1:
            w1 = len(c[1])
        if len(c[2]) > w2:
            w2 = len(c[2])
    w1 = (w1 + 8) & ~7  # (width + padding 1) rounded up to a multiple of 8
    w2 = (w2 + 8) & ~7
    tabs = _TABS
    for _, pc, fn, loc in cs:
        write("#\t")
        write(pc)
        n = (w1 - len(pc) + 7) >> 3
        write(tabs[n] if n < 64 else "\t" * n)
        write(fn)
        n = (w2 - len(fn) + 7) >> 3
        write(tabs[n] if n < 64 else "\t" * n)
        write(loc)


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
    cells_of = names.cells_of
    for start in range(0, len(rows), _CHECK_EVERY):
        gc_checkpoint()
        for n, b, tb in rows[start : start + _CHECK_EVERY]:
            cells = cells_of(tb)
            ns = str(n)
            bs = str(b)
            write(ns)
            write(": ")
            write(bs)
            write(" [")
            write(ns)
            write(": ")
            write(bs)
            write("] @")
            for c in cells:
                write(c[0])
            write("\n")
            write_record(write, cells)
            write("\n")
    write("\n# Python memory\n")
    for k, v in facts:
        write(f"# {k} = {v}\n")
    return "".join(out)
