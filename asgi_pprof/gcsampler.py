"""The GC-trigger sampler behind ``allocs``: garbage collections by the stack that caused them.

A collection runs in the thread whose allocation pushed generation 0 over its threshold,
so the Python stack at the collection's start is a sample of where GC-tracked objects
pile up, and who pays for collections. Installed on first use, never at import.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import types

from .concurrency import is_own_thread
from .heap_names import module_of
from .model import Frame, Sample, function_name

__all__ = ["GcSampler", "ensure_installed", "sampler"]


class GcSampler:
    """Counts garbage collections by the Python stack that triggered them, and their time.

    Installed on ``gc.callbacks`` by :func:`ensure_installed` when ``allocs`` is first
    asked for (importing asgi_pprof or making an app installs nothing). Cheap: two calls
    per collection, and at most ``MAX_STACKS`` stacks are kept.
    """

    MAX_STACKS = 20_000
    MAX_DEPTH = 64

    def __init__(self) -> None:
        self.data: dict[tuple[tuple[types.CodeType, int], ...], list[int]] = {}
        self.installed = False
        self.installed_ns = 0
        self._current: tuple[tuple[types.CodeType, int], ...] | None = None
        self._t0 = 0
        self.lock = threading.Lock()

    def install(self) -> None:
        """Add the callback to ``gc.callbacks`` once."""
        with self.lock:
            if not self.installed:
                gc.callbacks.append(self._callback)
                self.installed = True
                self.installed_ns = time.time_ns()

    def uninstall(self) -> None:
        """Remove the callback (tests, benchmarks); collected data is kept."""
        with self.lock:
            if self.installed:
                gc.callbacks.remove(self._callback)
                self.installed = False

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        try:
            self._record(phase)
        except Exception:  # pragma: no cover - e.g. at interpreter shutdown
            # Never let a profiler's error surface in whatever code triggered a collection.
            self._current = None

    def _record(self, phase: str) -> None:
        if phase == "start":
            if is_own_thread(threading.current_thread().name):
                self._current = None
                return
            # The caller of this callback; None when C code collected with no Python frame.
            f: types.FrameType | None = sys._getframe(0).f_back
            key: list[tuple[types.CodeType, int]] = []
            while f is not None and len(key) < self.MAX_DEPTH:
                key.append((f.f_code, f.f_lineno or 0))
                f = f.f_back
            self._current = tuple(key)
            self._t0 = time.perf_counter_ns()
        elif self._current is not None:
            pause = time.perf_counter_ns() - self._t0
            stack, self._current = self._current, None
            vals = self.data.get(stack)
            if vals is None:
                if len(self.data) >= self.MAX_STACKS:
                    stack = ()  # bounded memory: the overflow is one stackless sample
                vals = self.data.setdefault(stack, [0, 0])
            vals[0] += 1
            vals[1] += pause

    def samples(self) -> list[Sample]:
        """Return ``[gc_collections, gc_pause]`` per triggering stack, cumulative."""
        out = []
        for key, vals in list(self.data.items()):  # list(): atomic copy under the GIL
            stack = tuple(self._frame(code, line) for code, line in key)
            out.append(Sample(stack, [vals[0], vals[1]]))
        return out

    def _frame(self, code: types.CodeType, line: int) -> Frame:
        # Here we have the code object itself: name it exactly as the CPU profile does.
        module = module_of(code.co_filename)
        return Frame(function_name(code, module), code.co_filename, code.co_firstlineno, line)


sampler = GcSampler()
"""The process's one GC-trigger sampler."""


def ensure_installed() -> None:
    """Install the sampler on ``gc.callbacks`` if it is not there yet (cheap when it is)."""
    if not sampler.installed:
        sampler.install()
