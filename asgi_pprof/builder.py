"""ProfileData -> profile.proto, gzipped. Pure: no I/O, no clocks, no Starlette.

This is the only module that imports the generated protobuf code.
"""

from __future__ import annotations

import gzip
import os
import sys

from . import symbols
from .model import Frame, ProfileData, Sample, Stack, ValueType
from .proto import profile_pb2 as pb

__all__ = ["decode", "encode", "to_proto"]

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


def to_proto(data: ProfileData) -> pb.Profile:
    """Return the profile.proto message for ``data``.

    Every location carries its function, file and line, and the one mapping says
    ``has_functions``, so ``go tool pprof`` never tries to symbolize.
    """
    strings = _Strings()
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
        for k, v in s.labels:
            ps.label.add(key=strings(k), str=strings(v))
        for k, n, unit in s.num_labels:
            lab = ps.label.add(key=strings(k), num=n)
            if unit:
                lab.num_unit = strings(unit)
    out.string_table.extend(strings.table)
    return out


def encode(data: ProfileData, compresslevel: int = 1) -> bytes:
    """Return ``data`` as gzipped profile.proto bytes, as runtime/pprof writes them.

    Runs in a worker thread: serializing and compressing a large profile takes time.
    """
    raw = to_proto(data).SerializeToString()
    return gzip.compress(raw, compresslevel=compresslevel, mtime=0)


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
