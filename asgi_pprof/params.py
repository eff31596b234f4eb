"""Query parameters read exactly as Go's net/http/pprof reads them.

Go reads each parameter with ``r.FormValue``: the first value, ``""`` when missing;
``debug`` and ``gc`` with ``strconv.Atoi`` (errors become 0), ``seconds`` with
``strconv.ParseInt(s, 10, 64)`` (errors reported), the trace's ``seconds`` with
``strconv.ParseFloat``. Any length of input is answered in linear time, never with an
exception (Python's ``int()`` refuses more than 4 300 digits: we never ask it to).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

__all__ = ["atoi", "first", "parse_float", "parse_int10"]

_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_DEC_FLOAT = re.compile(
    r"[+-]?(?:[0-9](?:_?[0-9])*(?:\.(?:[0-9](?:_?[0-9])*)?)?|\.[0-9](?:_?[0-9])*)"
    r"(?:[eE][+-]?[0-9](?:_?[0-9])*)?",
    re.ASCII,
)
_HEX_FLOAT = re.compile(
    r"([+-]?)0[xX]_?((?:[0-9a-fA-F](?:_?[0-9a-fA-F])*)?(?:\.(?:[0-9a-fA-F](?:_?[0-9a-fA-F])*)?)?)"
    r"[pP]([+-]?[0-9](?:_?[0-9])*)",
    re.ASCII,
)
_SPECIAL = {"inf": math.inf, "infinity": math.inf, "nan": math.nan}


def first(query: Mapping[str, str], name: str) -> str:
    """Return the first value of ``name`` (Starlette's QueryParams.get gives the last)."""
    getlist = getattr(query, "getlist", None)
    if getlist is not None:
        values = getlist(name)
        return str(values[0]) if values else ""
    return query.get(name, "")


def parse_int10(s: str) -> int | None:
    """Return ``strconv.ParseInt(s, 10, 64)``, or None where Go reports an error."""
    if not _INT.fullmatch(s):
        return None
    # int() refuses more than 4300 digits (a ValueError, not a number): past 19
    # significant digits the value is out of int64's range anyway (Go's ErrRange).
    digits = s.lstrip("+-").lstrip("0")
    if len(digits) > 19:
        return None
    n = int(s[0] + digits) if s[0] in "+-" and digits else int(digits or "0")
    return n if _INT64_MIN <= n <= _INT64_MAX else None


def atoi(s: str) -> int:
    """Return ``strconv.Atoi(s)`` with the error ignored, as pprof does: bad syntax is 0,
    an out-of-range value is int64's bound of its sign (what Go returns beside ErrRange)."""
    n = parse_int10(s)
    if n is not None:
        return n
    if not _INT.fullmatch(s):
        return 0
    return _INT64_MIN if s[0] == "-" else _INT64_MAX


def parse_float(s: str) -> float | None:
    """Return ``strconv.ParseFloat(s, 64)``, or None where Go reports an error."""
    body = s[1:] if s[:1] in "+-" else s
    special = _SPECIAL.get(body.lower())
    if special is not None:
        return -special if s.startswith("-") else special
    if _DEC_FLOAT.fullmatch(s) and any(c.isdigit() for c in s):
        f = float(s.replace("_", ""))
        return None if math.isinf(f) else f  # finite digits that overflow: Go's ErrRange
    m = _HEX_FLOAT.fullmatch(s)
    if m and any(c not in "._" for c in m.group(2)):
        mant = m.group(2).replace("_", "")
        if mant.startswith("."):
            mant = "0" + mant
        try:
            return float.fromhex(f"{m.group(1)}0x{mant}p{m.group(3).replace('_', '')}")
        except OverflowError:
            return None  # Go's ErrRange
    return None
