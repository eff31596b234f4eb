"""Which source answers ``heap`` and ``allocs``: the sampled profiler or tracemalloc.

* tracemalloc tracing that somebody chose (``PYTHONTRACEMALLOC``, ``tracemalloc.start``,
  :func:`asgi_pprof.start_tracing`, ``create_app(tracemalloc_frames=N)``) is the exact
  mode: every live block. When it is on, it answers.
* Otherwise the sampled profiler (the native extension, Go's four sample types) answers
  while its rate is above 0.
* Otherwise tracemalloc's profiles answer as they always did: ``heap`` says how to turn
  tracing on (403) or traces one window (``heap?seconds=N``), ``allocs`` samples GCs.

The choice is made per request, so turning either on or off at run time takes effect at
once. The index page's description and the ``debug=1`` trailer name the source.
"""

from __future__ import annotations

from . import memprofile
from .concurrency import Window
from .model import ProfileData
from .profiles import NamedProfile
from .tracemalloc_owner import tracing_state

__all__ = ["MemoryProfile", "source"]


def source() -> str:
    """Return which source answers now: ``"tracemalloc"`` or ``"sampled"``."""
    if tracing_state() in ("user", "on"):
        return "tracemalloc"
    if memprofile.available() and memprofile.memory_profile_rate() > 0:
        return "sampled"
    return "tracemalloc"


class MemoryProfile(NamedProfile):
    """``heap`` or ``allocs``, answered by whichever source :func:`source` names."""

    def __init__(self, sampled: NamedProfile, exact: NamedProfile) -> None:
        if sampled.name != exact.name:
            raise ValueError("sampled and exact profiles must have the same name")
        self.name = exact.name
        self._sampled = sampled
        self._exact = exact

    def _now(self) -> NamedProfile:
        return self._sampled if source() == "sampled" else self._exact

    @property
    def description(self) -> str:  # type: ignore[override]
        """Return Go's description and, after it, the source that answers now."""
        if source() == "sampled":
            how = f"sampled allocations, 1 per {memprofile.memory_profile_rate()} bytes"
        else:
            how = f"tracemalloc ({tracing_state()})"
        return f"{self._exact.description} [source: {how}]"

    def count(self) -> int:
        """Return the index page's count from the source that answers now."""
        return self._now().count()

    async def collect(self, *, gc: bool = False) -> ProfileData:
        """Return the profile from the source that answers now."""
        return await self._now().collect(gc=gc)

    async def encoded(self, *, gc: bool = False) -> bytes:
        """Return the gzipped profile.proto from the source that answers now."""
        return await self._now().encoded(gc=gc)

    async def text(self, debug: int, *, gc: bool = False) -> str | list[bytes]:
        """Return the ``debug>=1`` text (its trailer names the source)."""
        return await self._now().text(debug, gc=gc)

    async def delta(self, seconds: int, window: Window) -> ProfileData | None:
        """Return the change over ``seconds`` from the source that answers when it starts."""
        return await self._now().delta(seconds, window)
