"""The collector: deferral bounded across overlapping holders, the trailer's real gc.enabled,
and the GC-trigger sampler installed only when allocs is first asked for."""

from __future__ import annotations

import gc
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from asgi_pprof import concurrency
from tests.conftest import MOUNT, mounted

pytestmark = pytest.mark.anyio

BOUND = 0.2


class OffWatch:
    """Polls gc.isenabled() from a thread and records every stretch it was off."""

    def __init__(self) -> None:
        self.stretches: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-gc-watch", daemon=True)

    def _run(self) -> None:
        off_since: float | None = None
        while not self._stop.is_set():
            now = time.monotonic()
            if not gc.isenabled():
                off_since = now if off_since is None else off_since
            elif off_since is not None:
                self.stretches.append(now - off_since)
                off_since = None
            time.sleep(0.002)
        if off_since is not None:
            self.stretches.append(time.monotonic() - off_since)

    def __enter__(self) -> OffWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def short_bound(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(concurrency, "GC_MAX_OFF_SECONDS", BOUND)
    assert gc.isenabled()
    yield
    assert gc.isenabled(), "automatic collection left off"


def hold(seconds: float, checkpoints: bool) -> None:
    """Hold a deferral for ``seconds``, in 20 ms steps, like a long snapshot loop."""
    with concurrency.gc_deferred():
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.02)
            if checkpoints:
                concurrency.gc_checkpoint()


def test_gc_off_never_longer_than_the_bound_across_overlapping_holders(short_bound: None) -> None:
    # Eight holders of 0.3 s, each starting 0.15 s after the previous: before the bound,
    # collection stayed off for the whole 1.35 s chain (the 40 s, shortened).
    with OffWatch() as watch:
        threads = []
        for _ in range(8):
            t = threading.Thread(target=hold, args=(0.3, False))
            t.start()
            threads.append(t)
            time.sleep(0.15)
        for t in threads:
            t.join()
    # One stretch, ended at the first holder exit past the bound (0.3 s: the holders here
    # never call gc_checkpoint). Margin 0.25 s for thread wake-ups on a loaded 2-core CI.
    assert watch.stretches, "gc was never deferred"
    assert max(watch.stretches) <= 0.3 + 0.25, watch.stretches
    # And not turned off again while the chain of overlapping holders went on.
    assert len(watch.stretches) == 1, watch.stretches


def test_gc_single_long_holder_is_cut_at_a_checkpoint(short_bound: None) -> None:
    with OffWatch() as watch:
        hold(1.0, True)
    # Bound plus one 20 ms step; margin 0.2 s for a loaded machine's sleeps.
    assert watch.stretches
    assert max(watch.stretches) <= BOUND + 0.02 + 0.2, watch.stretches
    assert len(watch.stretches) == 1, watch.stretches


def test_gc_deferral_after_a_gap_defers_again(short_bound: None) -> None:
    with OffWatch() as watch:
        hold(0.1, True)
        time.sleep(0.05)
        hold(0.1, True)
    assert len(watch.stretches) == 2, watch.stretches


def test_gc_deferred_keeps_a_disabled_collector_disabled() -> None:
    gc.disable()
    try:
        with concurrency.gc_deferred():
            assert concurrency.gc_enabled() is False
        assert not gc.isenabled()
    finally:
        gc.enable()


def _trailer_gc(body: str) -> str:
    m = re.search(r"^# gc\.enabled = (\w+)$", body, re.M)
    assert m, body[-2000:]
    return m.group(1)


async def test_trailer_reports_the_real_gc_setting() -> None:
    transport = httpx.ASGITransport(app=mounted())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        # Another request's deferral is in progress: the process's setting is still "on".
        started, release = threading.Event(), threading.Event()

        def holder() -> None:
            with concurrency.gc_deferred():
                started.set()
                release.wait(10)

        t = threading.Thread(target=holder)
        t.start()
        try:
            started.wait(5)
            assert not gc.isenabled()
            for url in ("allocs?debug=1",):
                r = await c.get(f"{MOUNT}/{url}")
                assert r.status_code == 200
                assert _trailer_gc(r.text) == "true"
        finally:
            release.set()
            t.join()
        gc.disable()
        try:
            r = await c.get(f"{MOUNT}/allocs?debug=1")
            assert _trailer_gc(r.text) == "false"
        finally:
            gc.enable()


def test_import_and_create_app_install_no_gc_callback() -> None:
    code = textwrap.dedent(
        """
        import asyncio, gc, httpx
        import asgi_pprof
        from asgi_pprof import create_app, gcsampler
        app = create_app()
        print("after_create", gcsampler.sampler._callback in gc.callbacks)
        async def main():
            t = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=t, base_url="http://t") as c:
                assert (await c.get("/heap")).status_code == 403
                print("after_heap", gcsampler.sampler._callback in gc.callbacks)
                assert (await c.get("/allocs")).status_code == 200
                print("after_allocs", gcsampler.sampler._callback in gc.callbacks)
        asyncio.run(main())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    assert out == ["after_create", "False", "after_heap", "False", "after_allocs", "True"], out
