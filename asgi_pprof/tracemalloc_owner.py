"""Who owns tracemalloc: the user (``PYTHONTRACEMALLOC``, ``tracemalloc.start``), us for
good (:func:`start_tracing`), or us for ``heap?seconds=N`` windows only.

Tracing someone else started is used and never stopped; tracing we started for windows
is refcounted, so concurrent windows share one session and the last one out stops it.
"""

from __future__ import annotations

import threading
import tracemalloc

__all__ = ["DEFAULT_FRAMES", "start_tracing", "stop_tracing", "tracing_state"]

DEFAULT_FRAMES = 16
"""Frames :func:`start_tracing` keeps per allocation unless told otherwise."""


class _Tracing:
    """Refcounted ownership of tracemalloc: ours (for good or per window) or someone else's.

    ``owned`` is True only while tracing runs because we started it; we stop only that,
    when neither :func:`start_tracing` nor any window still wants it.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owned = False
        self.persistent = False
        self.windows = 0

    def acquire_window(self, frames: int) -> bool:
        """Make sure tracing is on for a window; return True if this window started it."""
        with self.lock:
            if tracemalloc.is_tracing():
                if self.owned:
                    self.windows += 1
                return False
            self.forget_if_stopped()
            tracemalloc.start(frames)
            self.owned = True
            self.windows += 1
            return True

    def forget_if_stopped(self) -> None:
        """Drop our claim on tracing someone stopped under us (call with the lock held)."""
        if self.owned and not tracemalloc.is_tracing():
            # Windows still open keep their count: each releases once, as always.
            self.owned = self.persistent = False

    def release_window(self) -> None:
        """End one window; stop tracing if it was ours and nobody else wants it."""
        with self.lock:
            if not self.owned:
                return
            self.windows = max(0, self.windows - 1)
            self._stop_if_unwanted()

    def _stop_if_unwanted(self) -> bool:
        if self.owned and not self.persistent and self.windows == 0:
            # The user may have stopped it under us; stop() is harmless then.
            tracemalloc.stop()
            self.owned = False
            return True
        return False

    def only_windows(self) -> bool:
        """Return True when tracing is on only because a window asked for it."""
        return tracemalloc.is_tracing() and self.owned and not self.persistent


_tracing = _Tracing()


def start_tracing(frames: int = DEFAULT_FRAMES) -> bool:
    """Start tracemalloc with ``frames`` frames per allocation and keep it on.

    Returns True if this call started it, False if it was already tracing (then the
    frame limit already in effect stays: tracemalloc cannot change it without stopping).
    """
    if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= 1000:
        raise ValueError(f"frames must be an int between 1 and 1000, got {frames!r}")
    with _tracing.lock:
        if tracemalloc.is_tracing():
            if _tracing.owned:
                _tracing.persistent = True
            return False
        _tracing.forget_if_stopped()
        tracemalloc.start(frames)
        _tracing.owned = _tracing.persistent = True
        return True


def stop_tracing() -> bool:
    """Stop tracemalloc if :func:`start_tracing` started it; return True if it stopped now.

    Tracing started by anyone else is never stopped. While a ``heap?seconds=N`` window
    still uses it, it stops when that window ends.
    """
    with _tracing.lock:
        _tracing.persistent = False
        return _tracing._stop_if_unwanted()


def tracing_state() -> str:
    """Return ``"off"``, ``"user"`` (someone else's), ``"on"`` (ours) or ``"window"``."""
    with _tracing.lock:
        if not tracemalloc.is_tracing():
            return "off"
        if not _tracing.owned:
            return "user"
        return "on" if _tracing.persistent else "window"
