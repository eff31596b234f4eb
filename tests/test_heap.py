"""heap and allocs: known memory at the top, deltas that find growth, tracing ownership, pprof."""

from __future__ import annotations

import asyncio
import gc
import re
import sys
import tracemalloc
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import asgi_pprof
from asgi_pprof import builder, gcsampler, heap, heap_names, heap_text, model, text
from asgi_pprof.model import ProfileData
from tests.conftest import MOUNT, ServerThread, mounted

pytestmark = pytest.mark.anyio

HEAP = f"{MOUNT}/heap"
ALLOCS = f"{MOUNT}/allocs"
MB = 1_000_000


# --- workloads with distinctive names ----------------------------------------------------


class _Cycle:
    """Holds blocks in a reference cycle, so only the cyclic collector frees them."""

    blocks: list[bytearray]
    me: _Cycle


def hold_heap_blocks(n: int, size: int) -> _Cycle:
    holder = _Cycle()
    holder.me = holder
    holder.blocks = [bytearray(size) for _ in range(n)]
    return holder


def keep_heap_stable() -> list[bytearray]:
    return [bytearray(100_000) for _ in range(20)]


def make_shrinking_blocks() -> list[bytearray]:
    return [bytearray(100_000) for _ in range(20)]


async def grow_heap_during_window(sink: list[bytearray], stop: asyncio.Event) -> None:
    while not stop.is_set():
        sink.append(bytearray(64_000))
        await asyncio.sleep(0.02)


async def shrink_heap_during_window(blocks: list[bytearray]) -> None:
    await asyncio.sleep(0.3)
    blocks.clear()


def pile_up_containers(n: int) -> list[list[int]]:
    return [[i] for i in range(n)]


def churn_containers(n: int) -> None:
    for i in range(n):
        x = [i]
        del x


async def pile_up_during_window(sink: list[list[int]], stop: asyncio.Event) -> None:
    while not stop.is_set():
        sink.extend([i] for i in range(1_000))
        await asyncio.sleep(0.02)


# --- helpers -------------------------------------------------------------------------------


def through(data: ProfileData, function: str, column: int) -> int:
    """Return the sum of ``column`` over samples whose stack passes through ``function``."""
    return sum(
        s.values[column]
        for s in data.samples
        if any(f.function.rsplit(".", 1)[-1] == function for f in s.stack)
    )


def column(data: ProfileData, name: str) -> int:
    return [t.type for t in data.sample_types].index(name)


async def fetch(client: httpx.AsyncClient, url: str) -> ProfileData:
    r = await client.get(url)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    return builder.decode(r.content)


@pytest.fixture
def tracing() -> Iterator[None]:
    """tracemalloc on (as a user would start it) for one test, off afterwards."""
    tracemalloc.start(16)
    try:
        yield
    finally:
        tracemalloc.stop()


# --- heap: known memory -------------------------------------------------------------------


async def test_heap_held_memory_at_the_top_then_gone_after_gc(
    client: httpx.AsyncClient, tracing: None
) -> None:
    held = hold_heap_blocks(40, 100_000)
    data = await fetch(client, HEAP)
    assert [(t.type, t.unit) for t in data.sample_types] == [
        ("inuse_objects", "count"),
        ("inuse_space", "bytes"),
    ]
    space = column(data, "inuse_space")
    top = max(data.samples, key=lambda s: s.values[space])
    assert any(f.function.rsplit(".", 1)[-1] == "hold_heap_blocks" for f in top.stack), top
    # 40 buffers of 100 001 bytes, 40 bytearray headers, the list: tracemalloc's accounting.
    got = through(data, "hold_heap_blocks", space)
    assert 4_000_000 <= got <= 4_010_000, got
    assert heap.last_snapshot.thread.startswith("asgi_pprof-"), "snapshot ran on the loop"

    del held
    gc.disable()  # the cycle must survive until gc=1 collects it
    try:
        still = await fetch(client, HEAP)
        assert through(still, "hold_heap_blocks", space) >= 4_000_000
        after = await fetch(client, HEAP + "?gc=1")
    finally:
        gc.enable()
    # Gone: under coverage its tracer keeps a few hundred bytes allocated in that frame.
    assert through(after, "hold_heap_blocks", space) < 10_000


async def test_heap_text_is_go_heap_format_with_python_trailer(
    client: httpx.AsyncClient, tracing: None
) -> None:
    held = hold_heap_blocks(30, 100_000)
    r = await client.get(HEAP + "?debug=1")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    lines = r.text.split("\n")
    m = re.fullmatch(r"heap profile: (\d+): (\d+) \[(\d+): (\d+)\] @ heap/2", lines[0])
    assert m, lines[0]
    objs, size, aobjs, asize = map(int, m.groups())
    assert (aobjs, asize) == (objs, size + 1)
    record = re.compile(r"(\d+): (\d+) \[(\d+): (\d+)\] @( 0x[0-9a-f]+)*")
    records = [ln for ln in lines if record.fullmatch(ln)]
    assert sum(int(ln.split(":")[0]) for ln in records) == objs
    first = lines.index(records[0])
    block = lines[first + 1 : lines.index("", first)]
    assert any("hold_heap_blocks" in ln for ln in block), block
    assert int(records[0].split(":")[1].split("[")[0]) >= 3_000_000
    for key in ("tracemalloc.current", "tracemalloc.peak", "gc.threshold", "gc.collections"):
        assert re.search(rf"^# {re.escape(key)} = \S+", r.text, re.M), key
    assert re.search(r"^# RSS = [1-9]\d*$", r.text, re.M)
    del held


# --- heap: deltas ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["window", "tracing"])
async def test_heap_delta_shows_growth_not_stable(client: httpx.AsyncClient, mode: str) -> None:
    if mode == "tracing":
        tracemalloc.start(16)
    try:
        stable = keep_heap_stable()
        shrinking = make_shrinking_blocks()
        sink: list[bytearray] = []
        stop = asyncio.Event()
        grower = asyncio.create_task(grow_heap_during_window(sink, stop))
        shrinker = asyncio.create_task(shrink_heap_during_window(shrinking))
        r = await client.get(HEAP + "?seconds=1")
        stop.set()
        await grower
        await shrinker
        assert r.status_code == 200, r.text
        assert r.headers["content-disposition"] == 'attachment; filename="heap-delta"'
        data = builder.decode(r.content)
        space = column(data, "inuse_space")
        assert 0.9e9 <= data.duration_nanos <= 3e9
        assert through(data, "grow_heap_during_window", space) >= 1.5 * MB
        assert through(data, "keep_heap_stable", space) == 0
        assert not any("keep_heap_stable" in f.function for s in data.samples for f in s.stack)
        if mode == "tracing":
            assert through(data, "make_shrinking_blocks", space) <= -1.9 * MB
            assert tracemalloc.is_tracing()
        else:
            # Allocated before the window: never traced, so neither growth nor shrinkage.
            assert through(data, "make_shrinking_blocks", space) == 0
            assert not tracemalloc.is_tracing()
        del stable
    finally:
        if mode == "tracing":
            tracemalloc.stop()


# --- turning tracing on and off -----------------------------------------------------------


async def test_heap_off_is_a_clear_403(client: httpx.AsyncClient) -> None:
    for url in (HEAP, HEAP + "?debug=1", HEAP + "?gc=1"):
        r = await client.get(url)
        assert r.status_code == 403
        assert r.headers["x-go-pprof"] == "1"
        assert r.headers["content-type"] == "text/plain; charset=utf-8"
        assert "tracemalloc is not tracing" in r.text
        for how in ("PYTHONTRACEMALLOC=", "tracemalloc_frames=", "start_tracing(", "seconds=N"):
            assert how in r.text
        # The function it names is the package's export (the README names the same one).
        assert "asgi_pprof.start_tracing(16)" in r.text
        assert asgi_pprof.start_tracing is heap.start_tracing
    assert not tracemalloc.is_tracing()


async def test_heap_window_mode_restores_off(client: httpx.AsyncClient) -> None:
    assert heap.tracing_state() == "off"
    during: dict[str, Any] = {}

    async def look() -> None:
        await asyncio.sleep(0.4)
        during["state"] = heap.tracing_state()
        during["limit"] = tracemalloc.get_traceback_limit()
        during["plain"] = (await client.get(HEAP)).status_code

    _, r = await asyncio.gather(look(), client.get(HEAP + "?seconds=1"))
    assert r.status_code == 200
    # Tracing that only a window holds is no heap profile: a plain request still gets 403.
    assert during == {"state": "window", "limit": 16, "plain": 403}
    assert heap.tracing_state() == "off"
    assert not tracemalloc.is_tracing()


async def test_heap_user_tracing_is_never_stopped(client: httpx.AsyncClient) -> None:
    tracemalloc.start(3)
    try:
        assert heap.tracing_state() == "user"
        assert (await client.get(HEAP + "?seconds=1")).status_code == 200
        assert (await client.get(HEAP)).status_code == 200
        assert heap.stop_tracing() is False
        assert heap.start_tracing(8) is False
        mounted(tracemalloc_frames=8)
        assert heap.stop_tracing() is False
        assert tracemalloc.is_tracing()
        assert tracemalloc.get_traceback_limit() == 3
    finally:
        tracemalloc.stop()


def test_heap_create_app_option_starts_and_stop_tracing_stops() -> None:
    mounted(tracemalloc_frames=5)
    try:
        assert tracemalloc.is_tracing()
        assert tracemalloc.get_traceback_limit() == 5
        assert heap.tracing_state() == "on"
    finally:
        assert heap.stop_tracing() is True
    assert not tracemalloc.is_tracing()
    assert heap.stop_tracing() is False
    for bad in (0, 1001, True, 2.0):
        with pytest.raises(ValueError, match="frames"):
            heap.start_tracing(bad)  # type: ignore[arg-type]


async def test_heap_start_tracing_during_a_window_outlives_it(client: httpx.AsyncClient) -> None:
    async def start_later() -> bool:
        await asyncio.sleep(0.3)
        return heap.start_tracing(8)

    started, r = await asyncio.gather(start_later(), client.get(HEAP + "?seconds=1"))
    try:
        assert started is False  # already tracing, for the window
        assert r.status_code == 200
        assert heap.tracing_state() == "on"
        assert (await client.get(HEAP)).status_code == 200
    finally:
        assert heap.stop_tracing() is True
    assert not tracemalloc.is_tracing()


async def test_heap_concurrent_windows_share_one_session(client: httpx.AsyncClient) -> None:
    async def later(url: str, delay: float) -> httpx.Response:
        await asyncio.sleep(delay)
        return await client.get(url)

    async def state_at(delay: float) -> str:
        await asyncio.sleep(delay)
        return heap.tracing_state()

    results = await asyncio.gather(
        later(HEAP + "?seconds=1", 0),
        later(ALLOCS + "?seconds=1", 0.2),
        later(HEAP + "?seconds=1", 0.5),
        state_at(1.2),  # the first window is over, the others are not
    )
    assert [r.status_code for r in results[:3]] == [200, 200, 200]
    assert results[3] == "window"
    assert heap.tracing_state() == "off"
    assert not tracemalloc.is_tracing()


async def _call(app: Any, path: str, query: str, disconnect_after: float) -> list[dict[str, Any]]:
    """Run one GET on ``app`` whose client disconnects after ``disconnect_after`` seconds."""
    sent: list[dict[str, Any]] = []
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(disconnect_after)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    await app(scope, receive, send)
    return sent


async def test_heap_disconnect_and_cancel_mid_window_restore_tracing(
    client: httpx.AsyncClient,
) -> None:
    app = mounted()

    async def disconnecting() -> list[dict[str, Any]]:
        await asyncio.sleep(0.2)
        sent = await _call(app, HEAP, "seconds=5", 0.3)
        assert heap.tracing_state() == "window", "the other window still needs tracing"
        return sent

    long_window = asyncio.create_task(client.get(HEAP + "?seconds=2"))
    sent = await disconnecting()
    assert sent[0]["status"] == 499  # the client left: Go's text, nginx's status
    assert sent[1]["body"] == b"context canceled\n"
    r = await long_window
    assert r.status_code == 200
    assert not tracemalloc.is_tracing()

    # A request task cancelled mid-window (server shutdown) releases it too.
    task = asyncio.create_task(client.get(HEAP + "?seconds=5"))
    await asyncio.sleep(0.3)
    assert heap.tracing_state() == "window"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert heap.tracing_state() == "off"
    assert not tracemalloc.is_tracing()


# --- allocs ---------------------------------------------------------------------------------


async def test_allocs_samples_where_gc_tracked_objects_pile_up(client: httpx.AsyncClient) -> None:
    assert (await client.get(ALLOCS)).status_code == 200  # installs the GC sampler
    assert gcsampler.sampler.installed
    kept = pile_up_containers(300_000)
    gc.collect()  # so churn starts from an empty generation 0
    churn_containers(300_000)
    data = await fetch(client, ALLOCS)
    names = [(t.type, t.unit) for t in data.sample_types]
    assert names == [
        ("gc_collections", "count"),
        ("gc_pause", "nanoseconds"),
        ("inuse_objects", "count"),
        ("inuse_space", "bytes"),
    ]
    # Not cumulative allocation counts: Go's alloc_* names would mislead scrapers.
    assert not any(t.startswith("alloc_") for t, _ in names)
    assert data.default_sample_type == "gc_pause"  # tracing is off: no live columns
    # One gen-0 collection per threshold0 net container allocations (700, or 2000 on 3.13+).
    assert through(data, "pile_up_containers", 0) >= 300_000 // 2000 // 2
    assert through(data, "pile_up_containers", 1) > 0
    assert through(data, "churn_containers", 0) == 0
    assert data.totals()[3] == 0
    del kept

    r = await client.get(ALLOCS + "?debug=1")
    assert r.status_code == 200
    assert r.text.startswith("heap profile: 0: 0 [0: 1] @ heap/2\n")
    m = re.search(r"^# gc_samples.collections = (\d+)$", r.text, re.M)
    assert m
    assert int(m.group(1)) >= through(data, "pile_up_containers", 0)


async def test_allocs_delta_counts_the_window_without_tracing(client: httpx.AsyncClient) -> None:
    sink: list[list[int]] = []
    stop = asyncio.Event()
    piler = asyncio.create_task(pile_up_during_window(sink, stop))
    states = []

    async def look() -> None:
        await asyncio.sleep(0.5)
        states.append(heap.tracing_state())

    _, r = await asyncio.gather(look(), client.get(ALLOCS + "?seconds=1"))
    stop.set()
    await piler
    assert r.status_code == 200, r.text
    assert r.headers["content-disposition"] == 'attachment; filename="allocs-delta"'
    data = builder.decode(r.content)
    assert through(data, "pile_up_during_window", 0) > 0
    # Scrapers poll allocs: it never turns tracing on, so there is no live column here.
    assert states == ["off"]
    assert data.totals()[2:] == [0, 0]
    assert (await client.get(ALLOCS + "?seconds=1&debug=1")).status_code == 400


async def test_allocs_delta_with_tracing_shows_live_growth(
    client: httpx.AsyncClient, tracing: None
) -> None:
    sink: list[list[int]] = []
    stop = asyncio.Event()
    piler = asyncio.create_task(pile_up_during_window(sink, stop))
    r = await client.get(ALLOCS + "?seconds=1")
    stop.set()
    await piler
    data = builder.decode(r.content)
    assert through(data, "pile_up_during_window", 0) > 0
    assert through(data, "pile_up_during_window", 3) > 1 * MB


async def test_allocs_with_tracing_defaults_to_live_space(
    client: httpx.AsyncClient, tracing: None
) -> None:
    held = hold_heap_blocks(20, 100_000)
    data = await fetch(client, ALLOCS)
    assert data.default_sample_type == "inuse_space"
    assert through(data, "hold_heap_blocks", 3) >= 2_000_000
    del held


# --- names ---------------------------------------------------------------------------------


class _Named:
    def method(self) -> Any:
        return sys._getframe()

    @staticmethod
    def decorated() -> Any:
        return sys._getframe()


def test_heap_names_frames_like_the_cpu_profile() -> None:
    def nested() -> Any:
        return sys._getframe()

    frames = [sys._getframe(), nested(), _Named().method(), _Named.decorated()]
    frames.append((lambda: sys._getframe())())
    for f in frames:
        want = model.frame_of(f)
        assert heap_names.names.frame((want.filename, want.line)) == want
    # The lambda's line is also this function's: one level out is this function.
    lam = model.frame_of(frames[-1])
    me = heap_names.names.frame((lam.filename, lam.line), 1)
    assert me.function == f"{__name__}.test_heap_names_frames_like_the_cpu_profile"


def test_heap_text_records_match_the_generic_go_text(tracing: None) -> None:
    held = [hold_heap_blocks(2, 10), keep_heap_stable()]
    # A 300-character function cell next to short ones: many tabs in that column.
    fake = ("/nowhere/long.py", 7)
    names = heap_names.names
    names.frames[fake] = model.Frame("m" * 300, fake[0], 1, fake[1])
    try:
        rows = heap.take_snapshot().rows
        rows.sort(key=lambda r: -r[1])
        tbs = [tb for _, _, tb in rows[:300]] + [(fake, *rows[0][2]), ()]
        for tb in tbs:
            stack = names.stack(tb)
            cells = names.cells_of(tb)
            out: list[str] = []
            heap_text.write_record(out.append, cells)
            generic = text.tabwrite("".join(ln + "\n" for ln in text.frame_lines(stack)))
            assert "".join(out) == generic
            assert "@" + "".join(c[0] for c in cells) == text.stack_header(stack)
    finally:
        names.frames.pop(fake)
        names.cells.pop(fake, None)
    del held


# --- the real go tool pprof -----------------------------------------------------------------


@pytest.mark.go
def test_heap_and_allocs_read_by_go_tool_pprof(go_tool: Any) -> None:
    tracemalloc.start(16)
    try:
        held = hold_heap_blocks(40, 100_000)
        with ServerThread(mounted()) as server:
            for path in ("heap", "allocs", "heap?debug=1", "allocs?debug=1"):
                url = f"{server.url}{MOUNT}/{path}"
                top = go_tool("-top", url)
                assert "Type: inuse_space" in top, top
                lines = top.splitlines()
                first = lines[next(i for i, ln in enumerate(lines) if "flat%" in ln) + 1]
                assert "hold_heap_blocks" in first, top
                indexed = go_tool("-sample_index=inuse_space", "-top", url)
                assert "hold_heap_blocks" in indexed
                traces = go_tool("-traces", url)
                assert re.search(r"3\.8\dMB\s+\S*hold_heap_blocks", traces), traces
        del held
    finally:
        tracemalloc.stop()


@pytest.mark.go
def test_heap_window_fetched_by_go_tool_pprof_seconds(go_tool: Any) -> None:
    with ServerThread(mounted()) as server:
        out = go_tool("-top", "-seconds", "1", f"{server.url}{MOUNT}/heap")
        assert "Type: inuse_space" in out
    assert not tracemalloc.is_tracing()


# --- our own allocations and caches -------------------------------------------------------


async def test_heap_leaves_our_own_allocations_out_and_counts_them(
    client: httpx.AsyncClient, tracing: None
) -> None:
    held = hold_heap_blocks(20, 100_000)
    for url in (HEAP, HEAP + "?debug=1", HEAP):  # fills our name caches while traced
        assert (await client.get(url)).status_code == 200
    data = await fetch(client, HEAP)
    ours = heap_names.PACKAGE_DIR
    # The independent truth: tracemalloc itself sees blocks allocated by our frames...
    truth = sum(
        st.size
        for st in tracemalloc.take_snapshot().statistics("traceback")
        if any(f.filename.startswith(ours) for f in st.traceback)
    )
    assert truth > 0
    # ...and the profile has none of them, while the app's memory is all there.
    assert not [f for s in data.samples for f in s.stack if f.filename.startswith(ours)]
    assert through(data, "hold_heap_blocks", 1) >= 2_000_000
    r = await client.get(HEAP + "?debug=1")
    m = re.search(r"^# asgi_pprof\.own_bytes = (\d+)$", r.text, re.M)
    assert m
    assert int(m.group(1)) > 0
    assert heap.last_snapshot.own_bytes > 0
    del held


async def test_heap_name_caches_are_bounded(
    client: httpx.AsyncClient, tracing: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = heap_names.names
    monkeypatch.setattr(heap_names, "MAX_FRAMES", 40)
    before = names.restarts
    held = hold_heap_blocks(20, 100_000)
    try:
        data = await fetch(client, HEAP)
        r = await client.get(HEAP + "?debug=1")
        assert len(names.frames) <= 40
        assert names.restarts > before
        assert re.search(r"^# asgi_pprof\.names\.frames = \d+ \(max 40\)$", r.text, re.M)
        # Names stay right across restarts.
        assert through(data, "hold_heap_blocks", 1) >= 2_000_000
    finally:
        names._restart()
    del held


def test_the_snapshot_copy_is_freed_in_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Freeing tracemalloc's copy (700 000 tuples on a real app) in one call held the GIL
    0.1-0.4 s; in slices the loop is offered it between them."""
    offers: list[int] = []
    traces: list[Any] = [(0, 1, (), 0)] * (3 * heap.FREE_SLICE + 5)
    monkeypatch.setattr(heap, "yield_gil", lambda: offers.append(len(traces)))
    heap._free(traces)
    assert traces == []
    n = heap.FREE_SLICE
    assert offers == [2 * n + 5, n + 5, 5, 0]  # freed from the end, a slice per offer
