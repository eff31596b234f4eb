"""Synthetic program counters for Python frames, and the lookup behind ``/symbol``.

pprof thinks in addresses; Python has code objects. Each distinct function (name, file,
first line) gets a 64 KiB block of a made-up address space, and a frame's address is
the block start plus its line number. So an address is stable for the life of the
process, the same in every profile and text dump, and ``/debug/pprof/symbol`` can map
any address inside a block back to its function, as Go's symbol handler does.
"""

from __future__ import annotations

import threading

from .model import Frame
from .native import untracked

__all__ = ["BASE", "address_in", "address_of", "entry_of", "function_id", "lookup"]

BASE = 0x10000000
"""Start of the synthetic address space (above 0, so no address is ever 0)."""
_BLOCK_SHIFT = 16

_lock = threading.Lock()
_ids: dict[tuple[str, str, int], int] = {}
_names: list[str] = []


def function_id(frame: Frame) -> int:
    """Return the process-wide id (0, 1, ...) of ``frame``'s function (name, file, first line)."""
    key = (frame.function, frame.filename, frame.start_line)
    fid = _ids.get(key)
    if fid is None:
        with _lock:
            fid = _ids.get(key)
            if fid is None:
                fid = len(_names)
                _names.append(frame.function)
                _ids[untracked(key)] = fid  # no cycle scan of 100 000s of keys
    return fid


def entry_of(frame: Frame) -> int:
    """Return the address where ``frame``'s function starts."""
    return BASE + (function_id(frame) << _BLOCK_SHIFT)


def address_of(frame: Frame) -> int:
    """Return the address of ``frame``'s line: its function's entry plus the line number."""
    return address_in(function_id(frame), frame.line)


def address_in(fid: int, line: int) -> int:
    """Return the address of ``line`` in the function whose :func:`function_id` is ``fid``."""
    return BASE + (fid << _BLOCK_SHIFT) + min(max(line, 0), (1 << _BLOCK_SHIFT) - 1)


def lookup(address: int) -> str | None:
    """Return the function whose block holds ``address``, or None if no function does."""
    if address < BASE:
        return None
    fid = (address - BASE) >> _BLOCK_SHIFT
    if fid < len(_names):
        return _names[fid]
    return None
