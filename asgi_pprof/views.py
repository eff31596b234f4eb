"""Profiles for people without Go: flame-graph pages, speedscope JSON, folded stacks.

Pure functions of :class:`~asgi_pprof.model.ProfileData` returning bytes; they run in
worker threads. The one module that imports pyinstrument: its ``Session`` constructor is
semi-private (``:meta private:``), so it is called in :func:`_session` only and the
dependency is pinned to one major version (``pyinstrument>=5,<6``).

- :func:`render_html`: one self-contained page (no request leaves the browser). Values
  that are time (CPU, wall clock, delays) use pyinstrument's page; anything else (bytes,
  object or task counts) a small flame graph of our own that shows the value's unit, as
  pyinstrument's page would label bytes as seconds.
- :func:`render_speedscope`: speedscope's file format, one profile per sample type.
- :func:`render_folded`: Brendan Gregg's folded stacks, as fgprof's ``format=folded``.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterable

from pyinstrument.renderers.html import HTMLRenderer
from pyinstrument.session import Session

from .model import Frame, ProfileData, Stack, ValueType

__all__ = [
    "FORMATS",
    "TIME_UNITS",
    "is_time",
    "render",
    "render_folded",
    "render_html",
    "render_speedscope",
    "value_index",
]

TIME_UNITS = {"nanoseconds": 1e-9, "microseconds": 1e-6, "milliseconds": 1e-3, "seconds": 1.0}
"""Units pprof writes for time, and their length in seconds."""

_SPEEDSCOPE_UNITS = {"nanoseconds", "microseconds", "milliseconds", "seconds", "bytes"}

# pyinstrument's page asks Google for a web font (the only request it makes); a data:
# URL in its place keeps the page offline, its own fallback fonts are used.
_FONT_URL = (
    "https://fonts.googleapis.com/css?family=Source+Code+Pro:400,600|"
    "Source+Sans+Pro:400,600&display=swap"
)


def value_index(data: ProfileData, sample_index: int | None = None) -> int:
    """Return the sample-type column to show: ``sample_index``, else pprof's default.

    pprof's default is ``default_sample_type`` when set, else the last column.
    """
    n = len(data.sample_types)
    if n == 0:
        raise ValueError("a profile without sample types has nothing to show")
    if sample_index is not None:
        if not 0 <= sample_index < n:
            raise ValueError(f"sample_index must be in 0..{n - 1}, not {sample_index}")
        return sample_index
    for i, vt in enumerate(data.sample_types):
        if vt.type == data.default_sample_type:
            return i
    return n - 1


def is_time(vt: ValueType) -> bool:
    """Return True when values of ``vt`` are durations."""
    return vt.unit in TIME_UNITS


def _stacks(data: ProfileData, index: int) -> list[tuple[Stack, int]]:
    """Return (stack, value) per distinct stack, labels summed away, zero values left out."""
    acc: dict[Stack, int] = {}
    for s in data.samples:
        v = s.values[index]
        if v:
            acc[s.stack] = acc.get(s.stack, 0) + v
    return list(acc.items())


def _root_first(stack: Stack) -> list[str]:
    return [f.function for f in reversed(stack)]


# --- pyinstrument's page for time ------------------------------------------------------


def _frame_id(f: Frame) -> str:
    # pyinstrument's frame identifier: name, file, first line; the line as an attribute
    # (its page shows time per function and line).
    return f"{f.function}\x00{f.filename}\x00{f.start_line}\x01l{f.line}"


def _session(
    records: list[tuple[list[str], float]],
    *,
    start_time: float,
    duration: float,
    interval: float,
    sample_count: int,
    title: str,
) -> Session:
    """Return a pyinstrument Session of ``records`` (root-first frame ids, seconds).

    The one call of the semi-private constructor (pyinstrument 5.x).
    """
    return Session(
        frame_records=records,
        start_time=start_time,
        duration=duration,
        min_interval=interval,
        max_interval=interval,
        sample_count=sample_count,
        start_call_stack=["[root]"],  # an empty one crashes the stem trimming
        target_description=title,
        cpu_time=0.0,  # shown as "CPU utilization"; we do not know it for every profile
        sys_path=[],
        sys_prefixes=[],
    )


def _sample_count(data: ProfileData) -> int:
    """Return the samples a profile counts (its ``samples``/``count`` column), 0 if none."""
    for i, vt in enumerate(data.sample_types):
        if vt == ValueType("samples", "count"):
            return sum(s.values[i] for s in data.samples)
    return 0


def _pyinstrument_page(data: ProfileData, index: int, title: str) -> str:
    scale = TIME_UNITS[data.sample_types[index].unit]
    stacks = _stacks(data, index)
    # Aggregated, and sorted root first so that stacks sharing callers are neighbours:
    # pyinstrument shares tree nodes between consecutive records only (unsorted, 50 000
    # records made a 69 MB page; aggregated and sorted, under 1 MB).
    records = sorted(([_frame_id(f) for f in reversed(st)], v * scale) for st, v in stacks)
    total = sum(t for _, t in records)
    duration = data.duration_nanos / 1e9 if data.duration_nanos else total
    period_s = data.period * TIME_UNITS.get(data.period_type.unit, 0.0)
    session = _session(
        records,
        start_time=data.time_nanos / 1e9 if data.time_nanos else time.time(),
        duration=duration,
        interval=period_s or 0.01,
        sample_count=_sample_count(data) or len(records),
        title=title,
    )
    page: str = HTMLRenderer(resample_interval=0).render(session)
    head = f"<title>{html.escape(title)}</title>"
    return page.replace(_FONT_URL, "data:text/css,", 1).replace(
        '<meta charset="utf-8">', '<meta charset="utf-8">' + head, 1
    )


# --- our own page for anything else ----------------------------------------------------

_MIN_SHARE = 0.0005
"""Nodes below this share of the total are folded into their parent (bounded page size)."""


def format_value(value: float, unit: str) -> str:
    """Return ``value`` in ``unit`` for people: ``1.5 MiB``, ``12 objects``, ``3.2 ms``."""
    v = float(value)
    if unit == "bytes":
        for step, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if abs(v) >= step:
                return f"{v / step:.3g} {name}"
        return f"{v:.0f} B"
    if unit in TIME_UNITS:
        s = v * TIME_UNITS[unit]
        for secs, name in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
            if abs(s) >= secs:
                return f"{s / secs:.3g} {name}"
        return f"{s * 1e9:.0f} ns"
    return f"{v:.0f}" + ("" if unit in ("", "count") else f" {unit}")


class _Node:
    __slots__ = ("children", "frame", "total")

    def __init__(self, frame: Frame | None) -> None:
        self.frame = frame
        self.total = 0
        self.children: dict[tuple[str, str], _Node] = {}


def _tree(stacks: Iterable[tuple[Stack, int]]) -> _Node:
    root = _Node(None)
    for stack, v in stacks:
        root.total += v
        node = root
        for f in reversed(stack):
            key = (f.function, f.filename)  # one box per function under the same caller
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = _Node(f)
            child.total += v
            node = child
    return root


_CSS = """
body{font:13px system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:18px;margin:0 0 4px} p{margin:4px 0 12px;color:#555}
.r{display:flex;flex-direction:column}
.n{overflow:hidden;box-sizing:border-box}
.b{white-space:nowrap;overflow:hidden;text-overflow:ellipsis;padding:2px 4px;
 border:1px solid #fff;border-radius:3px;background:hsl(var(--h),70%,72%);cursor:default}
.c{display:flex}
"""


def _own_page(data: ProfileData, index: int, title: str) -> str:
    vt = data.sample_types[index]
    root = _tree(_stacks(data, index))
    total = root.total
    out: list[str] = []

    def emit(node: _Node, share_of_parent: float) -> None:
        f = node.frame
        assert f is not None
        label = f"{f.function} ({format_value(node.total, vt.unit)}, {node.total / total:.1%})"
        tip = f"{label}\n{f.filename}:{f.start_line}"
        hue = hash(f.filename) % 60 + 10
        out.append(
            f'<div class="n" style="width:{share_of_parent:.4%}">'
            f'<div class="b" style="--h:{hue}" title="{html.escape(tip)}">{html.escape(label)}'
            "</div>"
        )
        kids = [c for c in node.children.values() if c.total >= total * _MIN_SHARE]
        if kids:
            out.append('<div class="c">')
            for c in sorted(kids, key=lambda c: -c.total):
                emit(c, c.total / node.total)
            out.append("</div>")
        out.append("</div>")

    summary = f"{vt.type}: {format_value(total, vt.unit)} in total"
    if data.duration_nanos:
        summary += f", over {data.duration_nanos / 1e9:.3g} s"
    out.append(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(summary)}; callers above callees, width is the share of "
        f"{html.escape(vt.type)} ({html.escape(vt.unit)}).</p><div class='r'>"
    )
    if total > 0:
        for c in sorted(root.children.values(), key=lambda c: -c.total):
            if c.total >= total * _MIN_SHARE:
                emit(c, c.total / total)
    else:
        out.append("<p>No samples.</p>")
    out.append("</div></body></html>")
    return "".join(out)


def render_html(data: ProfileData, title: str, sample_index: int | None = None) -> bytes:
    """Return one self-contained HTML page (UTF-8) showing ``data`` as a flame graph.

    ``sample_index`` picks the value column (default: pprof's default). Time values get
    pyinstrument's page; other units our own, labelled in that unit.
    """
    index = value_index(data, sample_index)
    if is_time(data.sample_types[index]):
        page = _pyinstrument_page(data, index, title)
    else:
        page = _own_page(data, index, title)
    return page.encode()


# --- speedscope and folded -------------------------------------------------------------


def render_speedscope(data: ProfileData, name: str = "asgi_pprof") -> bytes:
    """Return speedscope's JSON file format (UTF-8): one sampled profile per sample type.

    Units speedscope knows (time units, bytes) are kept; counts are ``none``. The
    profile it opens first is pprof's default sample type.
    """
    frame_ix: dict[tuple[str, str, int], int] = {}
    frames: list[dict[str, object]] = []
    stacks = data.merged().samples
    paths: list[list[int]] = []
    for s in stacks:
        path = []
        for f in reversed(s.stack):
            key = (f.function, f.filename, f.start_line)
            i = frame_ix.get(key)
            if i is None:
                i = frame_ix[key] = len(frames)
                frames.append({"name": f.function, "file": f.filename, "line": f.start_line})
            path.append(i)
        paths.append(path)
    profiles = []
    for col, vt in enumerate(data.sample_types):
        keep = [k for k, s in enumerate(stacks) if s.values[col]]
        weights = [stacks[k].values[col] for k in keep]
        profiles.append(
            {
                "type": "sampled",
                "name": f"{name} {vt.type}",
                "unit": vt.unit if vt.unit in _SPEEDSCOPE_UNITS else "none",
                "startValue": 0,
                "endValue": sum(weights),
                "samples": [paths[k] for k in keep],
                "weights": weights,
            }
        )
    doc = {
        "$schema": "https://www.speedscope.app/file-format-schema.json",
        "shared": {"frames": frames},
        "profiles": profiles,
        "name": name,
        "activeProfileIndex": value_index(data),
        "exporter": "asgi_pprof",
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def render_folded(data: ProfileData, sample_index: int = 0) -> bytes:
    """Return folded stacks, ``root;caller;leaf value`` a line, as fgprof's format=folded.

    The value is column ``sample_index`` (default the first: sample counts, as fgprof).
    Semicolons in names become colons, the separator being ``;``.
    """
    index = value_index(data, sample_index)
    lines = sorted(
        ";".join(n.replace(";", ":") for n in _root_first(st)) + f" {v}\n"
        for st, v in _stacks(data, index)
    )
    return "".join(lines).encode()


FORMATS = {
    "html": "text/html; charset=utf-8",
    "speedscope": "application/json",
    "folded": "text/plain; charset=utf-8",
}
"""The ``format=`` values these renderers answer, and each one's Content-Type."""


def render(
    data: ProfileData, fmt: str, title: str, sample_index: int | None = None
) -> tuple[bytes, str]:
    """Return (body, Content-Type) of ``data`` in ``fmt`` (a key of :data:`FORMATS`).

    Raises ValueError for another format or a bad ``sample_index``. Runs in a worker
    thread (``concurrency.run_in_thread``): a page of a big profile takes tens of ms.
    """
    if fmt == "html":
        body = render_html(data, title, sample_index)
    elif fmt == "speedscope":
        body = render_speedscope(data, title)
    elif fmt == "folded":
        body = render_folded(data, 0 if sample_index is None else sample_index)
    else:
        raise ValueError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    return body, FORMATS[fmt]
