"""run_in_thread (asgi_pprof.concurrency): our worker threads and what callers may rely on."""

from __future__ import annotations

import asyncio
import contextvars
import os
import sys
import threading
import time
from types import FrameType

import anyio
import pytest

from asgi_pprof import concurrency
from asgi_pprof.concurrency import POOL_NAME, POOL_SIZE, WORK_NAME, run_in_thread

pytestmark = pytest.mark.anyio

_var: contextvars.ContextVar[str] = contextvars.ContextVar("test_concurrency_var", default="-")


def _frames_below(frame: FrameType | None) -> list[str]:
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return names


def _where() -> tuple[str, list[str], str]:
    return threading.current_thread().name, _frames_below(sys._getframe(1)), _var.get()


async def test_work_runs_in_our_named_thread_near_the_bottom_of_its_stack() -> None:
    # Under tracemalloc every allocation walks up to 16 frames and looks up each one's
    # line from the start of its code: the work's frames must be near the thread's bottom
    # (anyio's worker put 5 long frames there: _bootstrap, _bootstrap_inner, run, ...).
    _var.set("caller's")
    name, below, seen = await run_in_thread(_where)
    assert name == WORK_NAME
    assert below == ["_pool_main"], below
    assert seen == "caller's"  # the caller's context, as anyio's threads give it
    assert threading.get_ident() != (await run_in_thread(threading.get_ident))


def _boom() -> None:
    raise KeyError("from the worker")


async def test_exceptions_reach_the_caller_and_the_thread_stays_usable() -> None:
    with pytest.raises(KeyError, match="from the worker") as info:
        await run_in_thread(_boom)
    assert any(tb.name == "_boom" for tb in info.traceback)
    assert await run_in_thread(sum, [1, 2, 3]) == 6


async def test_a_cancelled_caller_waits_for_the_call_to_end() -> None:
    # As anyio's to_thread.run_sync: under a cancel scope the work is not abandoned, so
    # nothing it holds (a deferred collection, tracemalloc) outlives the request.
    ended = threading.Event()

    def slow() -> None:
        time.sleep(0.3)
        ended.set()

    t0 = time.monotonic()
    with anyio.move_on_after(0.05) as scope:  # how Starlette and anyio cancel a request
        await run_in_thread(slow)
    assert scope.cancel_called
    assert ended.is_set()
    assert time.monotonic() - t0 >= 0.25


async def test_at_most_pool_size_at_once_on_at_most_pool_size_threads() -> None:
    lock = threading.Lock()
    running = peak = 0

    def work() -> str:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return threading.current_thread().name

    names = await asyncio.gather(*(run_in_thread(work) for _ in range(3 * POOL_SIZE)))
    assert set(names) == {WORK_NAME}
    assert peak == POOL_SIZE
    assert concurrency._pool.threads() <= POOL_SIZE
    # Idle pool threads go back to their idle name, which the samplers leave out too.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ours = [t.name for t in threading.enumerate() if t.name in (WORK_NAME, POOL_NAME)]
        if WORK_NAME not in ours:
            break
        await asyncio.sleep(0.01)
    assert WORK_NAME not in ours
    assert 1 <= ours.count(POOL_NAME) <= POOL_SIZE
    assert concurrency.is_own_thread(POOL_NAME)


async def test_an_idle_thread_holds_nothing_of_its_last_call() -> None:
    import gc
    import weakref

    class Big:
        pass

    big = Big()
    ref = weakref.ref(big)
    assert await run_in_thread(lambda b: b is not None, big) is True
    del big
    gc.collect()
    deadline = time.monotonic() + 2
    while ref() is not None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        gc.collect()
    assert ref() is None


_CHILD = """
import asyncio, os, sys
from asgi_pprof.concurrency import run_in_thread

async def main():
    assert await run_in_thread(sum, [1, 2]) == 3  # the parent's pool is started
    pid = os.fork()
    if pid == 0:
        try:
            got = asyncio.run(asyncio.wait_for(run_in_thread(sum, [3, 4]), 5))
            os._exit(0 if got == 7 else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    print("child", os.waitstatus_to_exitcode(status))

asyncio.run(main())
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_gets_a_pool_of_its_own() -> None:
    import subprocess

    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "child 0" in out.stdout, (out.stdout, out.stderr)


_TRACED = """
import asyncio, sys, threading
from asgi_pprof.concurrency import run_in_thread

seen = []

def tracer(frame, event, arg):
    if event == "call":
        seen.append(frame.f_code.co_name)
    return None

def profiler(frame, event, arg):
    if event == "call":
        seen.append("profiled " + frame.f_code.co_name)

def work_for_the_pool():
    return 1

threading.settrace(tracer)
threading.setprofile(profiler)
assert asyncio.run(run_in_thread(work_for_the_pool)) == 1
print("work_for_the_pool" in seen, "profiled work_for_the_pool" in seen)
"""


def test_threading_trace_and_profile_hooks_reach_pool_threads() -> None:
    # As threading.Thread's threads get them: debuggers, profilers and coverage see our work.
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", _TRACED], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"], (out.stdout, out.stderr)
