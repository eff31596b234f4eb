"""Go's legacy text formats (``debug=1``), byte for byte where Go's layout applies.

Pure functions of ProfileData; they run in worker threads.
"""

from __future__ import annotations

import json

from . import symbols
from .model import Labels, ProfileData, Stack

__all__ = ["count_profile_text", "frame_lines", "go_quote", "stack_header", "tabwrite"]

_TABWIDTH = 8
_PADDING = 1
_MINWIDTH = 1


def tabwrite(text: str) -> str:
    """Return ``text`` aligned as Go's ``tabwriter.NewWriter(w, 1, 8, 1, '\\t', 0)`` would.

    A cell is a column cell only when a tab ends it; a column block is a run of lines
    that all have a terminated cell in that column; its width is the widest cell plus
    padding, rounded up to a tab stop, and cells are padded with tabs to it.
    """
    lines = text.split("\n")
    trailing = lines.pop() if lines else ""
    cells = [ln.split("\t") for ln in lines]
    out: list[str] = []
    _format(cells, [], out, 0, len(cells))
    return "".join(out) + trailing


# Plain functions with their state passed in, not closures: a recursive closure is a
# reference cycle, and each call left ~15 objects for the collector (450 000 young
# objects, a 200-300 ms collection, after the text of a 100 000-record heap).


def _write_lines(
    cells: list[list[str]], widths: list[int], out: list[str], start: int, end: int
) -> None:
    for row in cells[start:end]:
        parts: list[str] = []
        for j, c in enumerate(row):
            if j < len(widths) and j < len(row) - 1:
                cellw = -(-widths[j] // _TABWIDTH) * _TABWIDTH
                parts.append(c + "\t" * -(-(cellw - len(c)) // _TABWIDTH))
            else:
                parts.append(c)
        out.append("".join(parts) + "\n")


def _format(
    cells: list[list[str]], widths: list[int], out: list[str], line0: int, line1: int
) -> None:
    column = len(widths)
    this = line0
    while this < line1:
        if column >= len(cells[this]) - 1:
            this += 1
            continue
        _write_lines(cells, widths, out, line0, this)
        line0 = this
        width = _MINWIDTH
        while this < line1 and column < len(cells[this]) - 1:
            width = max(width, len(cells[this][column]) + _PADDING)
            this += 1
        widths.append(width)
        _format(cells, widths, out, line0, this)
        widths.pop()
        line0 = this
    _write_lines(cells, widths, out, line0, line1)


def go_quote(s: str) -> str:
    """Return ``s`` quoted like Go's ``%q`` (close enough for label keys and values)."""
    return json.dumps(s, ensure_ascii=False)


def frame_lines(stack: Stack) -> list[str]:
    """Return Go's ``#\\t<pc>\\t<func>+<off>\\t<file>:<line>`` lines (before tab alignment)."""
    if not stack:
        return ["#\t0x0"]
    out = []
    for f in stack:
        pc = symbols.address_of(f)
        off = pc - symbols.entry_of(f)
        out.append(f"#\t{pc:#x}\t{f.function}+{off:#x}\t{f.filename}:{f.line}")
    return out


def stack_header(stack: Stack) -> str:
    """Return the ``@ 0x… 0x…`` list of a record: return PCs (call PC + 1), as Go prints."""
    return "@" + "".join(f" {symbols.address_of(f) + 1:#x}" for f in stack)


def _labels_text(labels: Labels) -> str:
    return "{" + ", ".join(f"{go_quote(k)}:{go_quote(v)}" for k, v in sorted(labels)) + "}"


def count_profile_text(name: str, data: ProfileData, labels: bool = True) -> str:
    """Return Go's count-profile text (goroutine debug=1, threadcreate, custom profiles).

    ``<name> profile: total N``, then one block per distinct stack (and label set), the
    largest count first, ties by the key's text, each block ending in an empty line.
    """
    groups: dict[str, tuple[int, Stack, Labels]] = {}
    total = 0
    for s in data.samples:
        n = s.values[0]
        total += n
        key = stack_header(s.stack)
        if labels and s.labels:
            key += "\n# labels: " + _labels_text(s.labels)
        prev = groups.get(key)
        groups[key] = (n + (prev[0] if prev else 0), s.stack, s.labels)
    rows = sorted(groups.items(), key=lambda kv: (-kv[1][0], kv[0]))
    buf = [f"{name} profile: total {total}\n"]
    for key, (n, stack, _) in rows:
        buf.append(f"{n} {key}\n")
        buf.append(tabwrite("".join(ln + "\n" for ln in frame_lines(stack))))
        buf.append("\n")
    return "".join(buf)
