"""tracemalloc's raw traces grouped by traceback and named: in C, or in Python without it.

A heap of a real app is ~700 000 live blocks over ~40 000 tracebacks. Grouped in Python
that is an interpreted step per block, and while tracemalloc runs every object made
meanwhile is traced too (2-5 µs each at 16 frames). The C path (``asgi_pprof._traces``,
loaded by :mod:`.native`) groups by a pointer lookup per block and names each traceback
from the frame cache without a Python step. Both paths return the same rows in the same
order and the same samples.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence

from . import native as _native
from .concurrency import gc_checkpoint
from .heap_names import PACKAGE_DIR, Traceback, names
from .heap_text import Row
from .model import Frame, Sample

__all__ = ["encoded", "group", "native", "samples"]

TRACES_SLICE = 65_536
"""Traces per C call: ~2-4 ms holding the GIL (a pointer lookup each)."""

ROWS_SLICE = 512
"""Rows per C call when splitting off ours or naming: ~5 ms holding the GIL (naming a row
makes four objects, ~10 µs under tracing at 16 frames, measured on tests/realapp.py)."""

Trace = tuple[int, int, Traceback, int | None]
"""One of ``_tracemalloc._get_traces()``: ``(domain, size, traceback, total_nframe)``."""


native = _native.traces
"""The C extension in use (see :mod:`.native`), or None for the pure-Python path."""


def group(traces: Sequence[Trace]) -> tuple[list[Row], int, int]:
    """Return ``(rows, own_objects, own_bytes)`` of tracemalloc's raw ``traces``.

    One row ``(inuse_objects, inuse_space, traceback)`` per distinct traceback, in the
    order tracebacks first appear; a traceback with a frame of asgi_pprof's own is not a
    row but counted in ``own_objects`` and ``own_bytes``.
    """
    if native is not None and isinstance(traces, list):
        return _group_native(traces, native)
    return _group_python(traces)


def _group_native(traces: list[Trace], ext: types.ModuleType) -> tuple[list[Row], int, int]:
    groups = ext.Groups()
    for start in range(0, len(traces), TRACES_SLICE):
        gc_checkpoint()
        groups.add(traces, start, start + TRACES_SLICE)
    rows: list[Row] = []
    own_objects = own_bytes = 0
    for start in range(0, len(groups), ROWS_SLICE):
        part, objects, size = groups.rows(PACKAGE_DIR, start, start + ROWS_SLICE)
        rows += part
        own_objects += objects
        own_bytes += size
    return rows, own_objects, own_bytes


def _group_python(traces: Sequence[Trace]) -> tuple[list[Row], int, int]:
    # One list per traceback and nothing per block (append reuses the list).
    groups: dict[Traceback, list[int]] = {}
    get = groups.get
    for _, size, tb, _ in traces:
        sizes = get(tb)
        if sizes is None:
            groups[tb] = [size]
        else:
            sizes.append(size)
    rows: list[Row] = []
    own_objects = own_bytes = 0
    is_ours = names.is_ours
    for tb, sizes in groups.items():
        if is_ours(tb):
            own_objects += len(sizes)
            own_bytes += sum(sizes)
        else:
            rows.append((len(sizes), sum(sizes), tb))
    return rows, own_objects, own_bytes


def samples(rows: list[Row]) -> list[Sample]:
    """Return one sample per row: ``[inuse_objects, inuse_space]`` at its named stack."""
    # Distinct tracebacks give distinct stacks (a frame is its file and line): no merging.
    out: list[Sample] = []
    ext = native
    for start in range(0, len(rows), ROWS_SLICE):
        gc_checkpoint()
        if ext is not None:
            nm = names
            stop = start + ROWS_SLICE
            out += ext.samples(rows, start, stop, nm.frames, nm.multi, nm.deeper, nm.frame, Sample)
            continue
        append = out.append
        stack = names.stack
        for n, b, tb in rows[start : start + ROWS_SLICE]:
            append(Sample(stack(tb), [n, b]))
    return out


def encoded(
    rows: list[Row], locations: dict[Frame, bytes], location: Callable[[Frame], bytes]
) -> list[bytes]:
    """Return the rows as profile.proto sample fields, in pieces, as :func:`samples`'s
    samples would encode (for :func:`.builder.encode`'s ``sample_fields``; C only).

    No Sample is made: on a later heap of a real app each row's names and locations are
    cached, so a row makes no Python object at all (40 000 samples, their lists and
    stacks were ~1 s of a 2 s request under tracing, making, encoding and freeing them).
    """
    if native is None:
        raise RuntimeError("heap_groups.encoded needs the C extension")
    nm = names
    out: list[bytes] = []
    for start in range(0, len(rows), ROWS_SLICE):
        gc_checkpoint()
        out.append(
            native.encode(
                rows,
                start,
                start + ROWS_SLICE,
                nm.frames,
                nm.multi,
                nm.deeper,
                nm.frame,
                locations,
                location,
            )
        )
    return out
