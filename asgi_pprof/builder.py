"""ProfileData -> profile.proto, gzipped. Pure: no I/O, no clocks, no Starlette.

This is the only module that imports the generated protobuf code.
"""

from __future__ import annotations

import gzip
import itertools
import os
import sys
import types
import zlib
from collections.abc import Callable

from . import native, symbols
from .concurrency import yield_gil
from .model import Frame, ProfileData, Sample, Stack, ValueType
from .proto import profile_pb2 as pb

__all__ = ["decode", "encode", "profile_bytes", "to_proto"]

_MAPPING_LIMIT = 1 << 48

_MAPPING_FILE = f"[{os.path.basename(sys.executable or 'python')}]"
"""The mapping's file: the interpreter's name, bracketed like ``[vdso]`` so that it names
no file on disk. pprof names saved profiles after it, and it does not try to disassemble
our synthetic addresses in it (with the real binary's path, ``-weblist`` and the -http
Source view dropped every line)."""


class _Strings:
    """profile.proto's string table: index 0 is "", strings in first-use order."""

    def __init__(self) -> None:
        self.table: list[str] = [""]
        self._index: dict[str, int] = {"": 0}

    def __call__(self, s: str) -> int:
        i = self._index.get(s)
        if i is None:
            i = self._index[s] = len(self.table)
            self.table.append(s)
        return i


_wire = native.wire
"""The C sample encoder (see :mod:`.native`), or None for the pure-Python path."""


def _header(data: ProfileData, strings: _Strings) -> pb.Profile:
    """Return the profile's message without its samples, locations, functions and strings."""
    out = pb.Profile()
    for vt in data.sample_types:
        out.sample_type.add(type=strings(vt.type), unit=strings(vt.unit))
    out.period_type.type = strings(data.period_type.type)
    out.period_type.unit = strings(data.period_type.unit)
    out.period = data.period
    out.time_nanos = data.time_nanos
    out.duration_nanos = data.duration_nanos
    if data.default_sample_type:
        out.default_sample_type = strings(data.default_sample_type)
    for c in data.comments:
        out.comment.append(strings(c))
    out.mapping.add(
        id=1,
        memory_start=0,
        memory_limit=_MAPPING_LIMIT,
        filename=strings(_MAPPING_FILE),
        has_functions=True,
        has_filenames=True,
        has_line_numbers=True,
    )
    return out


def _label(strings: _Strings, lab: tuple[str, str] | tuple[str, int, str]) -> pb.Label:
    if len(lab) == 2:
        return pb.Label(key=strings(lab[0]), str=strings(lab[1]))
    msg = pb.Label(key=strings(lab[0]), num=lab[1])
    if lab[2]:
        msg.num_unit = strings(lab[2])
    return msg


def to_proto(data: ProfileData) -> pb.Profile:
    """Return the profile.proto message for ``data``: protobuf's messages, ids from 1.

    Every location carries its function, file and line, and the one mapping says
    ``has_functions``, so ``go tool pprof`` never tries to symbolize.
    """
    strings = _Strings()
    out = _header(data, strings)
    function_ids: dict[tuple[str, str, int], int] = {}
    location_ids: dict[Frame, int] = {}

    def location(frame: Frame) -> int:
        lid = location_ids.get(frame)
        if lid is not None:
            return lid
        fkey = (frame.function, frame.filename, frame.start_line)
        fid = function_ids.get(fkey)
        if fid is None:
            fid = function_ids[fkey] = len(function_ids) + 1
            name = strings(frame.function)
            out.function.add(
                id=fid,
                name=name,
                system_name=name,
                filename=strings(frame.filename),
                start_line=frame.start_line,
            )
        lid = location_ids[frame] = len(location_ids) + 1
        loc = out.location.add(id=lid, mapping_id=1, address=symbols.address_of(frame))
        loc.line.add(function_id=fid, line=frame.line)
        return lid

    for s in data.samples:
        ps = out.sample.add()
        ps.location_id.extend(location(f) for f in s.stack)
        ps.value.extend(s.values)
        ps.label.extend([_label(strings, lab) for lab in s.labels])
        ps.label.extend([_label(strings, lab) for lab in s.num_labels])
    out.string_table.extend(strings.table)
    return out


# --- the native path: samples by the C encoder, locations cached for the process ----------

_LOCATION_CACHE_MAX = 200_000
"""Frames whose encoded Location is kept; past it the cache starts over (ids never repeat)."""

_locations: dict[Frame, tuple[bytes, bytes, int]] = {}
"""Frame -> (its location id as a varint, its whole ``Profile.location`` field, function id).

Ids are process-wide, not 1..n per profile (protobuf ids need only be unique and
non-zero; pprof reads sparse ids): a location holds no string index, so its bytes are
the same in every profile, and a heap request on a big app meets ~20 000 of them.
Under tracemalloc each one encoded anew was ~15 traced allocations (3 CPU-s a request)."""

_next_location = itertools.count(1)  # next() is atomic: worker threads may encode at once


_SLICE = 250
"""Samples per C call: under 1 ms of GIL-holding C (1.5-3 us a sample, callbacks included)."""


def _location(wire: types.ModuleType, frame: Frame) -> tuple[bytes, bytes, int]:
    hit = _locations.get(frame)
    if hit is not None:
        return hit
    if len(_locations) >= _LOCATION_CACHE_MAX:
        _locations.clear()
    lid = next(_next_location)
    fid = symbols.function_id(frame)  # once: each lookup builds and hashes a key tuple
    field = wire.location(lid, symbols.address_in(fid, frame.line), fid + 1, frame.line)
    hit = _locations[frame] = native.untracked((wire.varint(lid), field, fid + 1))
    return hit


SampleFields = Callable[[dict[Frame, bytes], Callable[[Frame], bytes]], list[bytes]]
"""Writes samples of its own as profile.proto ``Profile.sample`` fields, given the
profile's ``locations`` (Frame -> location id varint) and ``location(frame)``, which
adds a missing one (the heap's rows, :func:`.heap_groups.encoded`)."""


def _native_bytes(
    data: ProfileData, wire: types.ModuleType, sample_fields: SampleFields | None = None
) -> bytes:
    """Return the serialized profile: header, functions and locations, then the samples."""
    strings = _Strings()
    out = _header(data, strings)
    parts: list[bytes] = []
    functions: set[int] = set()

    def location(frame: Frame) -> bytes:
        varint, field, fid = _location(wire, frame)
        parts.append(field)
        if fid not in functions:
            functions.add(fid)
            name = strings(frame.function)
            parts.append(wire.function(fid, name, strings(frame.filename), frame.start_line))
        return varint

    def label_field(lab: tuple[str, str]) -> bytes:
        raw = _label(strings, lab).SerializeToString()
        size: bytes = wire.varint(len(raw))
        return b"\x1a" + size + raw

    # In slices: one C call holds the GIL throughout (~1 us a sample), and the event
    # loop must get it back within a switch interval or so, not after 40 000 samples.
    locations: dict[Frame, bytes] = {}
    labels: dict[tuple[str, str], bytes] = {}
    chunks = []
    for i in range(0, len(data.samples), _SLICE):
        if i:
            yield_gil()
        chunks.append(
            wire.samples(
                data.samples[i : i + _SLICE], locations, location, labels, label_field, strings
            )
        )
    if sample_fields is not None:
        chunks += sample_fields(locations, location)
    samples = b"".join(chunks)
    out.string_table.extend(strings.table)
    # Concatenated messages merge: repeated fields simply continue in the next part.
    return out.SerializeToString() + b"".join(parts) + samples


def profile_bytes(data: ProfileData, sample_fields: SampleFields | None = None) -> bytes:
    """Return ``data`` as serialized profile.proto (uncompressed).

    With the C encoder (``_wire``) location and function ids are process-wide; without
    it they count from 1 (:func:`to_proto`). Either decodes to the same profile.
    ``sample_fields`` adds samples already encoded (C encoder only: ``native.wire``).
    """
    if _wire is not None:
        return _native_bytes(data, _wire, sample_fields)
    if sample_fields is not None:
        raise ValueError("sample_fields needs the C encoder")
    return to_proto(data).SerializeToString()


def encode(
    data: ProfileData, compresslevel: int = 1, sample_fields: SampleFields | None = None
) -> bytes:
    """Return ``data`` as gzipped profile.proto bytes, as runtime/pprof writes them
    (with ``sample_fields``' samples after ``data.samples``).

    Runs in a worker thread: serializing and compressing a large profile takes time.
    """
    return gzip_bytes(profile_bytes(data, sample_fields), compresslevel)


_GZIP_PIECE = 1 << 18
"""Bytes compressed per call: zlib drops the GIL while it deflates, but a one-shot
``gzip.compress`` of tens of MB held it ~100 ms at the end (measured); in pieces the
loop waits at most one piece's bookkeeping."""


def gzip_bytes(raw: bytes, compresslevel: int = 1) -> bytes:
    """Return ``raw`` gzipped (mtime 0, as ``gzip.compress(..., mtime=0)`` writes it)."""
    z = zlib.compressobj(compresslevel, zlib.DEFLATED, 31)
    view = memoryview(raw)
    out = [z.compress(view[i : i + _GZIP_PIECE]) for i in range(0, len(raw), _GZIP_PIECE)]
    out.append(z.flush())
    return b"".join(out)


def decode(body: bytes) -> ProfileData:
    """Return the ProfileData in a (gzipped or plain) profile.proto body.

    The inverse of :func:`encode`, used for delta profiles of stored bodies and by tests.
    """
    if body[:2] == b"\x1f\x8b":
        body = gzip.decompress(body)
    msg = pb.Profile.FromString(body)
    st = list(msg.string_table)
    funcs = {f.id: f for f in msg.function}
    frames: dict[int, tuple[Frame, ...]] = {}
    for loc in msg.location:
        fs = []
        for ln in loc.line:
            fn = funcs[ln.function_id]
            fs.append(Frame(st[fn.name], st[fn.filename], fn.start_line, ln.line))
        frames[loc.id] = tuple(fs)
    samples = []
    for s in msg.sample:
        stack: Stack = tuple(f for lid in s.location_id for f in frames[lid])
        labels = tuple(sorted((st[lab.key], st[lab.str]) for lab in s.label if lab.str))
        nums = tuple((st[lab.key], lab.num, st[lab.num_unit]) for lab in s.label if not lab.str)
        samples.append(Sample(stack, list(s.value), labels, nums))
    return ProfileData(
        sample_types=[ValueType(st[v.type], st[v.unit]) for v in msg.sample_type],
        period_type=ValueType(st[msg.period_type.type], st[msg.period_type.unit]),
        period=msg.period,
        samples=samples,
        time_nanos=msg.time_nanos,
        duration_nanos=msg.duration_nanos,
        default_sample_type=st[msg.default_sample_type] if msg.default_sample_type else "",
        comments=[st[c] for c in msg.comment],
    )
