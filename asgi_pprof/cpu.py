"""The CPU profile: subscribe to the sampler for a window, then build the profile."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .concurrency import Window, is_own_thread, run_in_thread
from .model import Frame, Labels, ProfileData, Sample, Stack, ValueType, labels_of
from .sampler import Capture, get_sampler

if TYPE_CHECKING:
    from .options import Options

__all__ = ["profile", "to_profile"]


OWN_LABEL = ("profiler", "asgi_pprof")
"""Label of samples taken in asgi_pprof's own threads: ``-tagignore=profiler=asgi_pprof``."""

_C_LOOP = Frame("[uvloop]", "<C code of the event loop>", 0, 0)
_RUN_ENTRIES = frozenset({"asyncio.runners.Runner.run", "asyncio.runners.run", "uvloop.run"})


def _honest_leaf(stack: Stack) -> Stack:
    """Return ``stack`` with a ``[uvloop]`` leaf where a C event loop was running.

    uvloop's loop is C: a tick inside it (its poll, its callbacks' C parts) has the
    Python frame that called ``run_until_complete`` as its innermost frame, which would
    show as flat time on ``Runner.run``. asyncio's own loop is Python, so a leaf on those
    entry points can only be a C loop.
    """
    if stack and stack[0].function in _RUN_ENTRIES:
        return (_C_LOOP, *stack)
    return stack


def to_profile(cap: Capture) -> ProfileData:
    """Return Go's CPU profile of a finished capture: ``samples/count`` and ``cpu/nanoseconds``.

    ``cpu/nanoseconds`` is CPU time read from each thread's CPU clock (see ``Capture``);
    each sample carries a ``thread`` label with the thread's name, and samples of our own
    threads also carry :data:`OWN_LABEL`.
    """
    end = cap.end_mono or time.monotonic()
    totals = cap.totals()
    # Each thread's CPU comes from its CPU clock (exact); it is spread over that thread's
    # samples by their ticks, which splits it between functions with less noise than the
    # per-sample clock deltas would (those vary with how much CPU went unsampled).
    ticks: dict[str, int] = {}
    cpu: dict[str, int] = {}
    for (_, thread, _), (n, ns) in totals.items():
        ticks[thread] = ticks.get(thread, 0) + n
        cpu[thread] = cpu.get(thread, 0) + ns
    samples = [
        Sample(
            stack=_honest_leaf(stack),
            values=[n, n * cpu[thread] // ticks[thread]],
            labels=_labels(thread, code_labels),
        )
        for (stack, thread, code_labels), (n, _) in totals.items()
    ]
    return ProfileData(
        sample_types=[ValueType("samples", "count"), ValueType("cpu", "nanoseconds")],
        period_type=ValueType("cpu", "nanoseconds"),
        period=cap.period_ns,
        samples=samples,
        time_nanos=cap.start_ns,
        duration_nanos=int((end - cap.start_mono) * 1e9),
    )


def _labels(thread: str, code_labels: Labels) -> Labels:
    """Return the thread's label, ours if it is one of our threads, and the code's labels."""
    pairs = [("thread", thread), *code_labels]
    if is_own_thread(thread):
        pairs.append(OWN_LABEL)
    return labels_of(pairs)


async def profile(seconds: float, window: Window, options: Options) -> ProfileData | None:
    """Return the CPU profile of the next ``seconds``, or None if the client left first.

    Waiting happens on the loop without blocking it. Unsubscribing is synchronous and
    cheap, so the window ends on time however busy the worker threads are; building the
    profile happens in a worker thread, and not at all for a client that left.
    """
    sampler = get_sampler(options.sample_hz, options.switch_interval)
    cap = sampler.subscribe()
    try:
        completed = await window.wait(seconds)
    finally:
        sampler.unsubscribe(cap)
        sampler.release_signal()
    if not completed:
        return None
    return await run_in_thread(to_profile, cap)
