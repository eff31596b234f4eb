"""The built-in named profiles, in one list: the place each collector plugs in."""

from __future__ import annotations

from . import block, goroutine, heap, loopstall, sampled_heap
from .memory import MemoryProfile
from .options import Options
from .profiles import NamedProfile

__all__ = ["builtin_profiles"]


def builtin_profiles(options: Options) -> list[NamedProfile]:
    """Return the built-in named profiles for an app with ``options``."""
    profiles: list[NamedProfile] = []
    # Each collector module adds its profiles here, one line each.
    profiles += goroutine.profiles(options)
    # heap and allocs: the sampled profiler or tracemalloc, chosen per request (memory.py).
    exact = heap.profiles(options)
    sampled = sampled_heap.profiles(options)
    profiles += [MemoryProfile(s, e) for s, e in zip(sampled, exact, strict=True)]
    profiles += block.profiles(options)
    profiles += loopstall.profiles(options)
    return profiles
