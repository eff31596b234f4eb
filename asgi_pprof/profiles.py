"""Named profiles: what ``/debug/pprof/<name>`` serves, and the one interface they share.

A named profile collects a :class:`ProfileData` (``debug=0``, delta profiles), renders
Go's text for ``debug>=1``, and reports a cheap count for the index page. Endpoints do
the HTTP; a profile only collects and renders.
"""

from __future__ import annotations

import abc
import time

from .concurrency import Window, run_in_thread
from .model import ProfileData, subtract
from .text import count_profile_text

__all__ = ["DELTA_PROFILES", "NamedProfile", "ProfileError"]

DELTA_PROFILES = frozenset({"allocs", "block", "goroutine", "heap", "mutex", "threadcreate"})
"""Go's set of profiles that accept ``seconds=N`` (delta profiles)."""


def _encode(data: ProfileData) -> bytes:
    # Imported here, in the worker thread: protobuf's import is ~30 ms, and this module
    # is imported on the event loop (limits, options) by captures that never encode.
    from . import builder

    return builder.encode(data)


class ProfileError(Exception):
    """A request the profile cannot serve; endpoints answer it with Go's error shape."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class NamedProfile(abc.ABC):
    """One entry of the index and one ``/debug/pprof/<name>`` route."""

    name: str = ""
    description: str = ""

    @property
    def supports_delta(self) -> bool:
        """Return True when ``seconds=N`` makes a delta profile (Go's fixed set)."""
        return self.name in DELTA_PROFILES

    @abc.abstractmethod
    def count(self) -> int:
        """Return the number shown on the index page. Runs on the loop: keep it cheap."""

    @abc.abstractmethod
    async def collect(self, *, gc: bool = False) -> ProfileData:
        """Return the profile now. Heavy parts must run off the loop (``run_in_thread``).

        Raise :class:`ProfileError` for a request it cannot serve.
        """

    async def encoded(self, *, gc: bool = False) -> bytes:
        """Return the profile now as Go's gzipped profile.proto (``debug=0``'s body)."""
        data = await self.collect(gc=gc)
        return await run_in_thread(_encode, data)

    async def text(self, debug: int, *, gc: bool = False) -> str | list[bytes]:
        """Return the ``debug>=1`` text; by default Go's count-profile text.

        A big text may come as its UTF-8 bytes in pieces, sent one after the other.
        """
        data = await self.collect(gc=gc)
        return await run_in_thread(count_profile_text, self.name, data)

    async def delta(self, seconds: int, window: Window) -> ProfileData | None:
        """Return the change over ``seconds`` (Go's ``<name>-delta``), None if the client left."""
        p0 = await self.collect()
        p0.time_nanos = time.time_ns()
        if not await window.wait(seconds):
            return None
        p1 = await self.collect()
        p1.time_nanos = time.time_ns()
        return await run_in_thread(subtract, p0, p1)
