"""Child-process programs for the sampled allocation profiler's stress and coexistence tests.

Each runs in a fresh interpreter (the allocator hooks are process-wide, and the order
in which tracemalloc and our hooks go on matters), prints ``OK ...`` and exits 0, or
fails an assert (exit 1), or crashes (a signal), which is what the tests look for.
Run as ``python -c "from tests.memsample_scripts import stress; stress()"``.
"""

from __future__ import annotations

import gc
import os
import random
import sys
import threading
import time
import tracemalloc
import warnings
from typing import Any

from asgi_pprof import memprofile
from asgi_pprof.model import ProfileData

KiB = 1024


def _through(data: ProfileData, function: str, col: int) -> int:
    return sum(
        s.values[col]
        for s in data.samples
        if any(f.function.rsplit(".", 1)[-1] == function for f in s.stack)
    )


def _native() -> Any:
    from asgi_pprof import _memsample

    return _memsample


# --- stress ----------------------------------------------------------------------------------


def stress_worker(stop: threading.Event, seed: int) -> None:
    """Allocate, grow (realloc) and free blocks of every size until told to stop."""
    rnd = random.Random(seed)
    window: list[Any] = []
    while not stop.is_set():
        for _ in range(200):
            kind = rnd.random()
            if kind < 0.4:
                window.append(bytes(rnd.randrange(1, 2048)))
            elif kind < 0.6:
                ba = bytearray(rnd.randrange(1, 64 * KiB))
                ba.extend(b"x" * rnd.randrange(1, 8 * KiB))  # realloc of a sampled block
                window.append(ba)
            elif kind < 0.8:
                window.append({i: str(i) for i in range(rnd.randrange(1, 64))})
            else:
                window.append([None] * rnd.randrange(1, 4096))
            if len(window) > 300:
                del window[: rnd.randrange(1, 300)]
    window.clear()


def stress_tracemalloc_toggler(stop: threading.Event) -> None:
    """Start and stop tracemalloc over and over (wrapped stop: no free goes unseen)."""
    rnd = random.Random(7)
    while not stop.is_set():
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        else:
            tracemalloc.start(rnd.choice([1, 4, 16]))
        time.sleep(rnd.uniform(0.005, 0.05))
    if tracemalloc.is_tracing():
        tracemalloc.stop()


def stress_rate_changer(stop: threading.Event) -> None:
    """Change the rate while allocations run; read the profile now and then."""
    rnd = random.Random(11)
    n = 0
    while not stop.is_set():
        memprofile.set_memory_profile_rate(rnd.choice([0, 4096, 16384, 65536, 512 * KiB]))
        n += 1
        if n % 5 == 0:
            memprofile.profile_data("")
        time.sleep(rnd.uniform(0.002, 0.03))
    memprofile.set_memory_profile_rate(16384)


def fork_child_work() -> list[bytes]:
    return [bytes(1000) for _ in range(5000)]


def _fork_and_check() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            memprofile.set_memory_profile_rate(4096)
            held = fork_child_work()
            data = memprofile.profile_data("")
            assert _through(data, "fork_child_work", 3) > 2_000_000, "child sees its own heap"
            del held
            data = memprofile.profile_data("")
            assert _through(data, "fork_child_work", 3) == 0, "child sees its frees"
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"forked child failed: {status}"


def _round(seconds: float) -> None:
    stop = threading.Event()
    threads = [
        threading.Thread(target=stress_worker, args=(stop, i), name=f"stress-{i}") for i in range(6)
    ]
    threads.append(threading.Thread(target=stress_tracemalloc_toggler, args=(stop,)))
    threads.append(threading.Thread(target=stress_rate_changer, args=(stop,)))
    for t in threads:
        t.start()
    time.sleep(seconds / 2)
    _fork_and_check()
    time.sleep(seconds / 2)
    stop.set()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), f"{t.name} hung"
    gc.collect()


def _left_in_use(function: str) -> tuple[int, int]:
    """Return (blocks >= 1 KiB, smaller blocks) sampled in ``function`` and not freed."""
    big = small = 0
    for r in memprofile.records():
        if any(f.function.rsplit(".", 1)[-1] == function for f in r.stack):
            left = r.allocs - r.frees
            assert left >= 0, "more frees than allocations"
            if r.block_size >= KiB:
                big += left
            else:
                small += left
    return big, small


def stress(seconds: float = 1.5) -> None:
    """Threads allocating and freeing, tracemalloc toggled, the rate changed, a fork."""
    sys.setswitchinterval(0.0005)  # more interleaving of the threads' hook calls
    tracemalloc.start(4)  # on before our hooks: its stop() must hand them back
    memprofile.set_memory_profile_rate(16384)
    rounds = []
    for _ in range(2):
        _round(seconds)
        big, small = _left_in_use("stress_worker")
        # Every block was freed. Blocks >= 1 KiB are all seen freed. Small list, dict
        # and tuple headers may sit in CPython's free lists (never handed back to the
        # allocator): a few, at most the free lists' sizes (80 lists, 80 dicts, ...).
        assert big == 0, f"{big} sampled blocks >= 1 KiB were freed unseen"
        assert small <= 400, f"{small} small sampled blocks still in use"
        rounds.append(memprofile.stats())
    first, second = rounds
    assert second["samples"] > first["samples"] > 1000, rounds
    assert second["lost"] == 0, second
    assert second["stale"] == 0, f"frees went unseen: {second}"
    # No leak: the live table holds only blocks still allocated (after both rounds the
    # same few), and the buckets of a second round of the same traffic are mostly the
    # first round's (keyed by stack, size class, rate).
    assert second["live"] <= first["live"] + 400, rounds
    assert second["buckets"] <= 2 * first["buckets"], rounds
    assert _native().hooked() == 3, "our hooks are on both domains"
    print("OK", first, second)


# --- tracemalloc before and after ------------------------------------------------------------


def coexist_block() -> list[bytearray]:
    return [bytearray(256 * KiB) for _ in range(8)]


def _both_see(label: str) -> None:
    held = coexist_block()
    data = memprofile.profile_data("")
    got = _through(data, "coexist_block", 3)
    assert got >= 8 * 256 * KiB * 0.8, f"{label}: sampler saw {got}"
    if tracemalloc.is_tracing():
        snap = tracemalloc.take_snapshot()
        traced = sum(
            t.size
            for t in snap.traces
            if t.size > KiB and any(fr.filename == __file__ for fr in t.traceback)
        )
        assert traced >= 8 * 256 * KiB, f"{label}: tracemalloc saw {traced}"
    del held
    assert _through(memprofile.profile_data(""), "coexist_block", 3) == 0, label


def coexist(direct: bool = False) -> None:
    """tracemalloc started before and after the sampler, stopped while it runs.

    Our hooks can sit below tracemalloc's only if tracemalloc started first, once per
    process: each way of stopping it then needs a fresh interpreter (``direct``: through
    ``_tracemalloc.stop``, which our wrapper of ``tracemalloc.stop`` never sees).
    """
    native = _native()
    tracemalloc.start(8)  # before: our hooks go on top of tracemalloc's
    # 16 KiB: a 256 KiB block is missed with probability exp(-16). At 64 KiB it was exp(-4),
    # and a check that needs 7 of 8 blocks failed ~0.8 % of the time, 4 checks a run.
    memprofile.set_memory_profile_rate(16 * KiB)
    _both_see("tracemalloc started first")
    before = native.stats()["displaced"]
    if direct:
        import _tracemalloc

        _tracemalloc.stop()  # restores what it found: not ours, so ours are gone
        assert native.hooked() == 0, "tracemalloc put back the allocator it found"
        memprofile.records()  # every profile read puts missing hooks back
    else:
        tracemalloc.stop()  # the wrapper puts ours back before any other thread runs
    assert native.hooked() == 3
    assert native.stats()["displaced"] == before + 1
    _both_see("tracemalloc stopped under us")
    tracemalloc.start(8)  # after: tracemalloc on top of ours
    _both_see("tracemalloc started second")
    tracemalloc.stop()  # restores ours
    assert native.hooked() == 3
    assert native.stats()["displaced"] == before + 1
    _both_see("tracemalloc stopped again")
    print("OK", native.stats())


def coexist_direct() -> None:
    coexist(direct=True)


def shutdown() -> None:
    """Sample at every allocation while the interpreter exits, threads still running."""

    def churn() -> None:
        while True:
            bytes(100)

    memprofile.set_memory_profile_rate(1)
    for i in range(3):
        threading.Thread(target=churn, daemon=True, name=f"churn-{i}").start()
    time.sleep(0.2)
    print("OK exiting")
