"""The CPU profile: true numbers on known workloads, the real go tool pprof, a free loop."""

from __future__ import annotations

import asyncio
import html
import http.client
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from asgi_pprof import builder
from asgi_pprof.model import ProfileData
from asgi_pprof.sampler import get_sampler
from tests import workloads
from tests.conftest import ServerThread, free_port, go_pprof, mounted, run_python

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


def cpu_ms(data: ProfileData, function: str, thread: str | None = None) -> float:
    """Return the CPU (ms) of samples whose stack passes through ``function`` (cumulative)."""
    total = 0
    for s in data.samples:
        if thread is not None and dict(s.labels).get("thread") != thread:
            continue
        if any(f.function.endswith("." + function) for f in s.stack):
            total += s.values[1]
    return total / 1e6


def leaf_ms(data: ProfileData, pattern: str, thread: str | None = None) -> float:
    """Return the CPU (ms) of samples whose leaf frame's function matches ``pattern``."""
    total = 0
    for s in data.samples:
        if thread is not None and dict(s.labels).get("thread") != thread:
            continue
        if s.stack and re.search(pattern, s.stack[0].function):
            total += s.values[1]
    return total / 1e6


def thread_ms(data: ProfileData, thread: str) -> float:
    return sum(s.values[1] for s in data.samples if dict(s.labels).get("thread") == thread) / 1e6


@pytest.fixture
async def dense() -> AsyncIterator[httpx.AsyncClient]:
    """A client whose app samples at 250 Hz: one sample per 4 ms kernel tick of CPU.

    Accuracy tests need it: CPU timers advance at kernel ticks (4 ms here), and at the
    default 100 Hz a 1 ms function gets ~65 samples in 4 s, so its share carries +-12 %
    of pure sampling noise (not bias). 250 Hz samples every tick a thread runs.
    """
    transport = httpx.ASGITransport(app=mounted(sample_hz=250))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


@pytest.fixture
def stop() -> Iterator[threading.Event]:
    ev = threading.Event()
    yield ev
    ev.set()


async def fetch_profile(client: httpx.AsyncClient, seconds: int) -> ProfileData:
    r = await client.get(f"/debug/pprof/profile?seconds={seconds}", timeout=seconds + 30)
    assert r.status_code == 200, r.text
    return builder.decode(r.content)


async def test_profile_shape(client: httpx.AsyncClient, stop: threading.Event) -> None:
    t = threading.Thread(target=workloads.short_bursts_forever, args=(stop,), name="shape")
    t.start()
    data = await fetch_profile(client, 1)
    stop.set()
    t.join()
    assert [tuple(v) for v in data.sample_types] == [("samples", "count"), ("cpu", "nanoseconds")]
    assert tuple(data.period_type) == ("cpu", "nanoseconds")
    assert data.period == 10_000_000
    assert abs(data.time_nanos - time.time_ns()) < 10e9
    assert 0.9e9 < data.duration_nanos < 2e9
    for s in data.samples:
        assert s.values[0] >= 1
        assert s.values[1] >= 0
        assert dict(s.labels)["thread"]
        assert all(f.line > 0 and f.filename and f.function for f in s.stack)
    # Never itself: no asgi_pprof thread and no sampler frame.
    threads = {dict(s.labels)["thread"] for s in data.samples}
    assert not any(name.startswith("asgi_pprof-") for name in threads)
    funcs = {f.function for s in data.samples for f in s.stack}
    assert not any(fn.startswith("asgi_pprof.sampler") for fn in funcs)


async def test_two_threads_at_a_known_ratio(
    dense: httpx.AsyncClient, stop: threading.Event
) -> None:
    truth: dict[str, float] = {}
    threads = [
        threading.Thread(target=workloads.three_parts_worker, args=(stop, truth), name="three"),
        threading.Thread(target=workloads.one_part_worker, args=(stop, truth), name="one"),
    ]
    for t in threads:
        t.start()
    data = await fetch_profile(dense, 4)
    stop.set()
    for t in threads:
        t.join()
    three, one = cpu_ms(data, "three_parts_worker"), cpu_ms(data, "one_part_worker")
    true_ratio = truth["three_parts_worker"] / truth["one_part_worker"]
    assert one > 0
    assert three / one == pytest.approx(true_ratio, rel=0.10)
    # Absolute: the profile's CPU matches the threads' own CPU clocks.
    assert three / 1e3 == pytest.approx(truth["three_parts_worker"], rel=0.15)


async def test_event_loop_short_bursts_split_3_to_1(dense: httpx.AsyncClient) -> None:
    """The loop thread (main) alternates 3 ms alpha, 1 ms beta, a 1.5-3.5 ms sleep."""
    assert threading.current_thread() is threading.main_thread()
    done = False

    async def bursts() -> None:
        rng = random.Random(7)
        while not done:
            workloads.alpha_burst()
            workloads.beta_burst()
            # Not a fixed 2 ms: CPU timers fire on 4 ms kernel ticks, and a cycle of a
            # whole number of ms (epoll waits in ms) can lock to them in phase, so each
            # tick lands at the same point of the cycle for seconds on end (2.44 once
            # in a full suite). Real loops drift; a jittered sleep drifts too.
            await asyncio.sleep(rng.uniform(0.0015, 0.0035))

    task = asyncio.create_task(bursts())
    main = threading.main_thread().name
    misses: list[str] = []
    try:
        # 30 s: each sample is alpha or beta, so the split carries binomial noise; with
        # ~4 000 samples its spread is ~4 %, and 10 % is two and a half of those, which one
        # run in a hundred misses by chance alone (2.70 read once in CI, 3.05 here next to
        # it). So a run that misses is taken again, up to three: a sampler that reads in the
        # wrong place (a late handler moves alpha's ticks to beta) misses in every run.
        for _ in range(3):
            data = await fetch_profile(dense, 30)
            alpha, beta = cpu_ms(data, "alpha_burst", main), cpu_ms(data, "beta_burst", main)
            print(f"\nevent loop alpha/beta = {alpha / beta:.2f} (true 3.0)")
            # Idle is not CPU, in every run: the loop's select/sleep lines carry little.
            idle = leaf_ms(data, r"select|_run_once|sleep", main)
            assert idle < 0.10 * thread_ms(data, main)
            if alpha / beta == pytest.approx(3.0, rel=0.10):
                return
            misses.append(f"{alpha / beta:.2f}")
    finally:
        done = True
        await task
    pytest.fail(f"alpha/beta 3:1 within 10 % in none of 3 runs: {misses}")


_OTHER_THREAD = """
import json, threading, time
from asgi_pprof import cpu
from asgi_pprof.sampler import get_sampler
from tests import workloads

stop = threading.Event()
t = threading.Thread(target=workloads.short_bursts_forever, args=(stop,), name="bursty")
t.start()
clock = time.pthread_getcpuclockid(t.ident)
s = get_sampler(250, 0.0001)
cpu0 = time.clock_gettime_ns(clock)
cap = s.subscribe()
time.sleep(20)
s.unsubscribe(cap)
real = time.clock_gettime_ns(clock) - cpu0
stop.set()
t.join()
data = cpu.to_profile(cap)

def on(fn):
    return sum(
        x.values[1]
        for x in data.samples
        if dict(x.labels).get("thread") == "bursty"
        and any(f.function.endswith(fn) for f in x.stack)
    )

got = {k: on(k) for k in ("alpha_burst", "beta_burst", "short_bursts_forever")}
print(json.dumps({**got, "real": real}))
"""


def test_short_bursts_on_another_thread() -> None:
    """The hardest case: bursts shorter than a jiffy on a thread the sampler must reach.

    In a fresh interpreter: the suite's earlier tests leave threads and hooks that would
    share the GIL with the workload (and the switch interval rule reads them as
    contention). After a tick the sampler must wake and take the GIL before it reads the
    thread, so part of each burst moves to the next line. The issue asks to test it, report
    the split, and say what limits it ("we want 3:1 within 20 %").

    What every run must show, on any host:
    - the thread's CPU in the profile is its own CPU clock's (the independent truth: its
      2 ms sleeps are not CPU);
    - the split is the one the reads' lateness explains. A tick read L ms of the thread's
      CPU late moves L of each 2.7 ms alpha to beta and L of each 0.9 ms beta to the loop's
      own line, so alpha/beta = 3 - L / 0.9 and the own line holds L / 3.6 beyond its few
      per cent of real CPU: alpha/beta >= 3 - 4 * own line (0.2 of slack), never above
      3.6, and the own line under 60 % (a sampler that waits for the thread to let the GIL
      go, the GIL sampling bias, puts nearly all of it there).

    How late the sampler reads is the host's: waking a thread on an idle vCPU takes
    0.2-0.8 ms on these VMs with a tail past 1 ms. Measured with the same code on one idle
    VM, 3:1 read 1.5-3.3 and the own line 6-48 % run to run (and CI read 1.68, 2.49 and
    2.28 in three runs). So the target is checked in up to three runs, and a host on which
    none meets it is reported as an expected failure with the splits it read.
    """
    misses: list[str] = []
    for _ in range(3):
        proc = run_python(_OTHER_THREAD)
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        alpha, beta, total = got["alpha_burst"], got["beta_burst"], got["short_bursts_forever"]
        assert total == pytest.approx(got["real"], rel=0.10)
        ratio, own_line = alpha / beta, (total - alpha - beta) / total
        print(f"\nnon-main thread alpha/beta = {ratio:.2f} (true 3.0), own line {own_line:.1%}")
        assert own_line < 0.60
        assert 3.0 - 4 * own_line - 0.2 <= ratio <= 3.6
        if ratio == pytest.approx(3.0, rel=0.20) and own_line < 0.15:
            return
        misses.append(f"alpha/beta {ratio:.2f}, own line {own_line:.1%}")
    pytest.xfail(f"reads too late on this host for 3:1 within 20 % in 3 runs: {misses}")


_UNDER_LOAD = """
import asyncio, json, sys, time
from asgi_pprof import cpu, cputicks
from asgi_pprof.sampler import get_sampler
from tests import workloads

s = get_sampler(250, 0.0001)
cap = s.subscribe()
end = time.monotonic() + 15

async def bursts():
    while time.monotonic() < end:
        workloads.alpha_burst()
        workloads.beta_burst()
        await asyncio.sleep(0.002)

asyncio.run(bursts())
s.unsubscribe(cap)
data = cpu.to_profile(cap)

def on(fn):
    return sum(x.values[1] for x in data.samples if any(f.function.endswith(fn) for f in x.stack))

got = {"source": cputicks.source(), "alpha": on("alpha_burst"), "beta": on("beta_burst")}
print(json.dumps(got))
"""


def test_short_bursts_on_an_oversubscribed_machine() -> None:
    """The event loop's 3:1 split while other processes keep every core busy.

    Kernel CPU timers (Go's source, and ours where perf is missing) are checked at the
    scheduler tick, and on a full machine the scheduler switches threads at those same
    ticks: measured here, they saw this loop's 3:1 as 15:1 to 33:1. perf's task-clock
    ticks at exact points of the thread's own CPU time. (With ``ASGI_PPROF_CPU_TICKS=timer``
    in the environment this test fails: 16.5:1 measured.)
    """
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(os.cpu_count() or 2)
    ]
    try:
        proc = run_python(_UNDER_LOAD)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = got["alpha"] / max(1, got["beta"])
    print(f"\n{got['source']} ticks under load: alpha/beta = {ratio:.2f} (true 3.0)")
    if got["source"] != "perf" and "ASGI_PPROF_CPU_TICKS" not in os.environ:
        pytest.skip("perf_event_open is refused here (perf_event_paranoid, seccomp)")
    assert ratio == pytest.approx(3.0, rel=0.15)


async def test_thread_blocked_on_io_shows_no_cpu(
    client: httpx.AsyncClient, stop: threading.Event
) -> None:
    a, b = socket.socketpair()
    t = threading.Thread(target=workloads.blocked_reader_thread, args=(a, stop), name="reader")
    t.start()
    try:
        data = await fetch_profile(client, 1)
    finally:
        b.send(b"x")
        t.join()
        a.close()
        b.close()
    assert thread_ms(data, "reader") <= 10  # at most one stray tick


def _load(url: str, seconds: float, counter: list[int]) -> None:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        conn.request("GET", "/work")
        conn.getresponse().read()
        counter[0] += 1
    conn.close()


@pytest.fixture(params=["asyncio", "uvloop"])
def service(request: pytest.FixtureRequest) -> Iterator[str]:
    """The workloads app under a real uvicorn in its own process (the loop on its main thread)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.workloads:app",
            "--port",
            str(port),
            "--loop",
            request.param,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(url + "/debug/pprof/cmdline", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_async_route_cpu_lands_on_the_route_not_on_select(service: str) -> None:
    counter = [0]
    load = [threading.Thread(target=_load, args=(service, 4, counter)) for _ in range(2)]
    for t in load:
        t.start()
    time.sleep(0.3)
    r = httpx.get(service + "/debug/pprof/profile?seconds=3", timeout=30)
    for t in load:
        t.join()
    data = builder.decode(r.content)
    route = cpu_ms(data, "cpu_heavy_route_handler", "MainThread")
    main = thread_ms(data, "MainThread")
    idle = leaf_ms(data, r"select|_run_once", "MainThread")
    assert counter[0] > 100
    assert route > 0.5 * main, (route, main)
    assert idle < 0.10 * main, (idle, main)


@pytest.mark.go
def test_go_tool_pprof_reads_profile_over_http(stop: threading.Event, tmp_path: Path) -> None:
    t = threading.Thread(target=workloads.short_bursts_forever, args=(stop,), name="gotool")
    t.start()
    with ServerThread(mounted()) as srv:
        url = f"{srv.url}/debug/pprof/profile"
        raw = go_pprof("-raw", "-seconds", "2", url)
        top = go_pprof("-top", "-lines", f"{url}?seconds=2")
        traces = go_pprof("-traces", "-tagfocus", "thread=gotool", f"{url}?seconds=2")
        # Source lines in -weblist (the -http Source view renders the same): pprof must not
        # look for our synthetic addresses in the interpreter binary (issue 8, item 10).
        weblist = tmp_path / "weblist.html"
        go_pprof("-weblist", "spin_cpu", "-output", str(weblist), f"{url}?seconds=2")
    stop.set()
    t.join()
    assert "PeriodType: cpu nanoseconds" in raw
    assert "samples/count cpu/nanoseconds" in raw
    src = "tests/workloads.py"
    line = next(
        i
        for i, ln in enumerate((ROOT / src).read_text().splitlines(), 1)
        if "while time.thread_time() < end" in ln
    )
    assert re.search(rf"tests\.workloads\.spin_cpu .*{src}:{line}", top), top
    assert "tests.workloads.alpha_burst" in traces
    assert "thread:  gotool" in traces
    other = [ln for ln in traces.splitlines() if ln.strip().startswith("thread:")]
    assert other
    assert all("gotool" in ln for ln in other)
    page = html.unescape(weblist.read_text())
    assert "while time.thread_time() < end:" in page, "no source line in -weblist"


async def test_loop_stays_free_while_capturing_and_encoding(
    client: httpx.AsyncClient, stop: threading.Event
) -> None:
    # Threads burning short bursts at many stack depths make many distinct samples to
    # encode, without hogging the GIL themselves (that would stall the loop with or
    # without a profiler: measured here, 100-400 ms lags with no capture at all).
    def deep(n: int, rng: random.Random) -> None:
        if n:
            deep(n - 1, rng)
            return
        workloads.spin_cpu(0.001)  # 0.5 ms gave 18-30 distinct samples: once too few

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            deep(rng.randrange(20, 120), rng)
            time.sleep(0.005)

    threads = [threading.Thread(target=worker, args=(i,), name=f"deep{i}") for i in range(4)]
    for t in threads:
        t.start()
    worst = 0.0
    running = True

    async def ticker() -> None:
        nonlocal worst
        while running:
            t0 = time.perf_counter()
            await asyncio.sleep(0.005)
            worst = max(worst, time.perf_counter() - t0 - 0.005)

    tick = asyncio.create_task(ticker())
    data = await fetch_profile(client, 2)
    running = False
    await tick
    stop.set()
    for t in threads:
        t.join()
    assert len(data.samples) > 20
    assert worst < 0.1, f"event loop stalled {worst * 1e3:.1f} ms"


async def test_overlapping_captures_each_get_their_window(
    client: httpx.AsyncClient, stop: threading.Event
) -> None:
    t = threading.Thread(target=workloads.short_bursts_forever, args=(stop,), name="shared")
    t.start()

    async def later() -> ProfileData:
        await asyncio.sleep(0.5)
        return await fetch_profile(client, 1)

    long, short = await asyncio.gather(fetch_profile(client, 2), later())
    stop.set()
    t.join()
    assert 1.9e9 < long.duration_nanos < 3e9
    assert 0.9e9 < short.duration_nanos < 1.8e9
    for data in (long, short):
        assert cpu_ms(data, "alpha_burst", "shared") > 0
    assert thread_ms(short, "shared") < thread_ms(long, "shared")
    assert not get_sampler(100, 0.0001).running


def test_disconnected_client_stops_its_capture() -> None:
    with ServerThread(mounted()) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"GET /debug/pprof/profile?seconds=20 HTTP/1.1\r\nHost: x\r\n\r\n")
        sampler = get_sampler(100, 0.0001)
        deadline = time.monotonic() + 5
        while not sampler.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sampler.running
        sock.close()
        deadline = time.monotonic() + 5
        while sampler.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not sampler.running, "capture still running after the client left"


def test_cpu_profile_of_a_process_with_no_loop_in_main(stop: threading.Event) -> None:
    """start_server's case: pprof's loop in a thread; the main thread still profiled."""
    code = (
        "import time, urllib.request, sys\n"
        "from asgi_pprof import start_server, builder\n"
        "from tests.workloads import spin_cpu\n"
        "def main_thread_crunch():\n"
        "    end = time.monotonic() + 3\n"
        "    while time.monotonic() < end: spin_cpu(0.01)\n"
        "srv = start_server(port=0)\n"
        "import threading\n"
        "def fetch():\n"
        "    body = urllib.request.urlopen(srv.url + 'profile?seconds=2').read()\n"
        "    d = builder.decode(body)\n"
        "    ms = sum(s.values[1] for s in d.samples if any("
        "f.function.endswith('main_thread_crunch') for f in s.stack)) / 1e6\n"
        "    print('MS', ms)\n"
        "t = threading.Thread(target=fetch); t.start()\n"
        "main_thread_crunch(); t.join(); srv.stop()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    ms = float(out.stdout.split("MS")[1])
    assert ms > 1500, out.stdout


def test_start_server_serves_and_stops_cleanly() -> None:
    from asgi_pprof import start_server

    before = {t.ident for t in threading.enumerate()}
    srv = start_server(port=0)
    try:
        assert srv.running
        assert srv.url.startswith("http://127.0.0.1:")
        r = httpx.get(srv.url, timeout=5)
        assert r.status_code == 200
        assert "Types of profiles available" in r.text
        root = httpx.get(srv.url.replace("/debug/pprof/", "/"), timeout=5, follow_redirects=True)
        assert root.status_code == 200
        assert root.url == srv.url
    finally:
        srv.stop()
    assert not srv.running
    assert {t.ident for t in threading.enumerate()} <= before


def test_start_server_reports_a_busy_port() -> None:
    from asgi_pprof import start_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(OSError, match="could not serve"):
            start_server(port=s.getsockname()[1], if_port_taken="raise")


def test_python_dash_m_serves(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "asgi_pprof", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env={**os.environ},
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/debug/pprof/cmdline", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert b"asgi_pprof" in r.content
    finally:
        proc.terminate()
        proc.wait(10)


def test_overlapping_samplers_restore_the_switch_interval(stop: threading.Event) -> None:
    before = sys.getswitchinterval()
    # A thread that bursts: each sampler wants its low interval all along (with only the
    # main thread running, either would go back to the interpreter's at its next rescan).
    bursts = threading.Thread(target=workloads.short_bursts_forever, args=(stop,))
    bursts.start()
    a, b = get_sampler(100, 0.0002), get_sampler(50, 0.0001)
    cap_a = a.subscribe()
    assert sys.getswitchinterval() == pytest.approx(0.0002)
    cap_b = b.subscribe()
    assert sys.getswitchinterval() == pytest.approx(0.0001)  # the lower one wins
    a.unsubscribe(cap_a)
    assert sys.getswitchinterval() == pytest.approx(0.0001)  # b still runs
    b.unsubscribe(cap_b)
    a.release_signal()
    b.release_signal()
    assert sys.getswitchinterval() == before
    stop.set()
    bursts.join()


def test_posix_timers_in_process(monkeypatch: pytest.MonkeyPatch, stop: threading.Event) -> None:
    """The fallback where perf is refused (``perf_event_paranoid`` 3, seccomp)."""
    from asgi_pprof import cputicks
    from asgi_pprof import sampler as sampler_mod
    from asgi_pprof.cpu import to_profile

    monkeypatch.setenv("ASGI_PPROF_CPU_TICKS", "timer")
    assert cputicks.source() == "timer"
    s = sampler_mod.Sampler(100, 0.0001)
    t = threading.Thread(target=workloads.short_bursts_forever, args=(stop,), name="timed")
    t.start()
    cap = s.subscribe()
    end = time.thread_time() + 0.3
    while time.thread_time() < end:  # the main thread's own timer and handler
        pass
    time.sleep(0.5)
    s.unsubscribe(cap)
    s.release_signal()
    s.close()
    stop.set()
    t.join()
    data = to_profile(cap)
    assert thread_ms(data, "timed") > 150
    main = threading.main_thread().name
    assert cpu_ms(data, "test_posix_timers_in_process", main) > 0.8 * thread_ms(data, main) > 150


def test_polling_fallback_still_profiles(
    monkeypatch: pytest.MonkeyPatch, stop: threading.Event
) -> None:
    from asgi_pprof import cputicks
    from asgi_pprof import sampler as sampler_mod
    from asgi_pprof.cpu import to_profile

    monkeypatch.setattr(cputicks, "get_libc", lambda: None)
    s = sampler_mod.Sampler(100, 0.0001)
    assert s.mode == "polling"
    t = threading.Thread(target=workloads.short_bursts_forever, args=(stop,), name="polled")
    t.start()
    cap = s.subscribe()
    time.sleep(1)
    s.unsubscribe(cap)
    s.close()
    stop.set()
    t.join()
    data = to_profile(cap)
    assert thread_ms(data, "polled") > 200
    assert cpu_ms(data, "short_bursts_forever", "polled") > 0
