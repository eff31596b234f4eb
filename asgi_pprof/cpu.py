"""The CPU profile: subscribe to the sampler for a window, then build the profile."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .concurrency import Window, run_in_thread
from .model import ProfileData, Sample, ValueType
from .sampler import Capture, get_sampler

if TYPE_CHECKING:
    from .options import Options

__all__ = ["profile", "to_profile"]


def to_profile(cap: Capture) -> ProfileData:
    """Return Go's CPU profile of a finished capture: ``samples/count`` and ``cpu/nanoseconds``.

    ``cpu/nanoseconds`` is CPU time read from each thread's CPU clock (see ``Capture``);
    each sample carries a ``thread`` label with the thread's name.
    """
    end = cap.end_mono or time.monotonic()
    totals = cap.totals()
    # Each thread's CPU comes from its CPU clock (exact); it is spread over that thread's
    # samples by their ticks, which splits it between functions with less noise than the
    # per-sample clock deltas would (those vary with how much CPU went unsampled).
    ticks: dict[str, int] = {}
    cpu: dict[str, int] = {}
    for (_, thread), (n, ns) in totals.items():
        ticks[thread] = ticks.get(thread, 0) + n
        cpu[thread] = cpu.get(thread, 0) + ns
    samples = [
        Sample(
            stack=stack,
            values=[n, n * cpu[thread] // ticks[thread]],
            labels=(("thread", thread),),
        )
        for (stack, thread), (n, _) in totals.items()
    ]
    return ProfileData(
        sample_types=[ValueType("samples", "count"), ValueType("cpu", "nanoseconds")],
        period_type=ValueType("cpu", "nanoseconds"),
        period=cap.period_ns,
        samples=samples,
        time_nanos=cap.start_ns,
        duration_nanos=int((end - cap.start_mono) * 1e9),
    )


async def profile(seconds: float, window: Window, options: Options) -> ProfileData:
    """Return the CPU profile of the next ``seconds`` (shorter if the client leaves).

    Waiting happens on the loop without blocking it; joining the sampler thread and
    building the profile happen in a worker thread.
    """
    sampler = get_sampler(options.sample_hz, options.switch_interval)
    cap = sampler.subscribe()
    try:
        await window.wait(seconds)
    finally:
        await run_in_thread(sampler.unsubscribe, cap)
        sampler.release_signal()
    return await run_in_thread(to_profile, cap)
