"""Flame-graph pages, speedscope and folded output (asgi_pprof.views).

Pages are served from a tiny Starlette app on a real uvicorn server and loaded by
headless Chromium; its network log shows every request the page made.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from asgi_pprof import cpu, fgprof, views
from asgi_pprof.concurrency import SleepWindow
from asgi_pprof.model import Frame, ProfileData, Sample, ValueType, stack_of
from asgi_pprof.options import Options
from tests.conftest import ServerThread

pytestmark = pytest.mark.anyio

# Blink's resource loads (scripts, styles, fonts, XHR of a page) carry this network
# traffic annotation in Chromium's net log; the browser's own background requests
# (updates, accounts) carry others.
_PAGE_LOAD = 101845102


def _chromium() -> str:
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    if exe is None:
        if os.environ.get("ASGI_PPROF_REQUIRE_GO") == "1":
            pytest.fail("chromium is required (ASGI_PPROF_REQUIRE_GO=1) but not installed")
        pytest.skip("chromium not installed")
    return exe


def browse(url: str, tmp: Path, name: str) -> tuple[str, list[str]]:
    """Return the DOM Chromium renders at ``url`` and the URLs the page requested.

    A screenshot is left at ``tmp/<name>.png``.
    """
    netlog = tmp / f"{name}.netlog.json"
    proc = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--no-first-run",
            f"--user-data-dir={tmp / ('chromium-' + name)}",
            "--window-size=1400,900",
            "--virtual-time-budget=5000",
            f"--log-net-log={netlog}",
            f"--screenshot={tmp / (name + '.png')}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = netlog.read_text()
    requested = [
        m.group(2)
        for m in re.finditer(r'"traffic_annotation":(\d+),"url":"([^"]*)"', log)
        if int(m.group(1)) == _PAGE_LOAD
    ]
    return proc.stdout, requested


def serve_pages(pages: dict[str, bytes]) -> Starlette:
    async def page(request: Request) -> HTMLResponse:
        body = pages.get(request.path_params["name"])
        return HTMLResponse(body or b"", status_code=200 if body else 404)

    return Starlette(routes=[Route("/{name}", page)])


# --- workloads with names to find ---------------------------------------------------


def views_test_cpu_burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        sum(i * i for i in range(500))


def views_test_parked_thread(ev: threading.Event) -> None:
    ev.wait()


def views_test_allocates() -> ProfileData:
    # A heap profile shaped as the heap collector's (inuse_objects/count, inuse_space/bytes)
    # whose stack is this function's real one.
    blob = bytearray(3 << 20)
    here = stack_of(sys._getframe())
    return ProfileData(
        sample_types=[ValueType("inuse_objects", "count"), ValueType("inuse_space", "bytes")],
        period_type=ValueType("space", "bytes"),
        period=1,
        samples=[Sample(here, [1, len(blob)])],
    )


async def _cpu_profile() -> ProfileData:
    done = threading.Event()
    t = threading.Thread(target=lambda: (views_test_cpu_burn(0.6), done.set()), name="burner")
    t.start()
    try:
        got = await cpu.profile(0.8, SleepWindow(), Options(sample_hz=100))
    finally:
        t.join()
    assert got is not None
    return got


async def _fgprof_profile() -> ProfileData:
    ev = threading.Event()
    t = threading.Thread(target=views_test_parked_thread, args=(ev,), name="parked")
    t.start()
    try:
        got = await fgprof.profile(0.4, SleepWindow())
    finally:
        ev.set()
        t.join()
    assert got is not None
    return got


async def test_pages_in_chromium_name_the_workload_and_stay_offline(tmp_path: Path) -> None:
    pages = {
        "cpu": views.render_html(await _cpu_profile(), "CPU profile"),
        "fgprof": views.render_html(await _fgprof_profile(), "fgprof"),
        "heap": views.render_html(views_test_allocates(), "heap"),
    }
    # A control: pyinstrument's own page, whose web-font link we remove, must be caught.
    control = pages["fgprof"].replace(b"data:text/css,", views._FONT_URL.encode(), 1)
    pages["control"] = control
    wanted = {
        "cpu": "views_test_cpu_burn",
        "fgprof": "views_test_parked_thread",
        "heap": "views_test_allocates",
    }
    with ServerThread(serve_pages(pages)) as server:
        for name, function in wanted.items():
            dom, requested = browse(f"{server.url}/{name}", tmp_path, name)
            assert (tmp_path / f"{name}.png").stat().st_size > 5000  # something was drawn
            # The page's own script rendered it: the function is in the DOM's markup.
            body = dom.split("<script", 1)[0] + dom.rsplit("</script>", 1)[-1]
            assert function in body, (name, body[:3000])
            assert requested == [], (name, requested)
        _, requested = browse(f"{server.url}/control", tmp_path, "control")
        assert any("fonts.googleapis.com" in u for u in requested), requested
    # Bytes are shown as bytes, never on a time axis.
    heap = pages["heap"].decode()
    assert "3 MiB" in heap
    assert not re.search(r"\d ?(ms|µs|seconds)\b", heap.split("<body>", 1)[1])


def _stack(*names: str) -> tuple[Frame, ...]:
    return tuple(Frame(n, f"/src/{n}.py", 1, 2) for n in names)


def _many_records(n: int) -> ProfileData:
    # n samples over 300 distinct stacks, time ordered (as a sampler emits them).
    samples = [
        Sample(_stack(f"leaf{i % 300}", f"mid{i % 300 % 17}", "main"), [1, 10_000_000])
        for i in range(n)
    ]
    return ProfileData(
        sample_types=[ValueType("samples", "count"), ValueType("cpu", "nanoseconds")],
        period_type=ValueType("cpu", "nanoseconds"),
        period=10_000_000,
        samples=samples,
        duration_nanos=30_000_000_000,
    )


def test_html_aggregates_identical_stacks() -> None:
    # 50 000 raw records made a 69 MB page unaggregated; aggregated it must stay small
    # and not grow with the record count (same stacks, 10x the records; only the times'
    # digits grow: measured 3 %).
    small = views.render_html(_many_records(5_000), "cpu")
    big = views.render_html(_many_records(50_000), "cpu")
    assert len(big) < 1_000_000, len(big)
    assert abs(len(big) - len(small)) < 0.10 * len(small)
    data = json.loads(big.decode().split("const sessionData = ", 1)[1].split(";\n", 1)[0])
    assert data["frame_tree"]["time"] == pytest.approx(500.0)  # 50 000 x 10 ms, in seconds


def test_speedscope_units_and_weights() -> None:
    heap = views_test_allocates()
    doc = json.loads(views.render_speedscope(heap))
    units = [p["unit"] for p in doc["profiles"]]
    assert units == ["none", "bytes"]
    assert doc["activeProfileIndex"] == 1  # pprof's default: the last type
    assert doc["profiles"][1]["weights"] == [3 << 20]
    names = [doc["shared"]["frames"][i]["name"] for i in doc["profiles"][1]["samples"][0]]
    assert names[-1] == "tests.test_views.views_test_allocates"  # root first, leaf last
    cpu_doc = json.loads(views.render_speedscope(_many_records(600)))
    assert [p["unit"] for p in cpu_doc["profiles"]] == ["none", "nanoseconds"]
    assert cpu_doc["profiles"][1]["endValue"] == 600 * 10_000_000


def test_speedscope_loads_in_speedscope(tmp_path: Path) -> None:
    from tests.test_trace import speedscope_dom

    dom = speedscope_dom(views.render_speedscope(views_test_allocates()), tmp_path, "sandwich")
    assert "Something went wrong" not in dom
    assert "views_test_allocates" in dom


def test_folded_is_fgprofs_format() -> None:
    data = ProfileData(
        sample_types=[ValueType("samples", "count"), ValueType("time", "nanoseconds")],
        period_type=ValueType("wallclock", "nanoseconds"),
        period=10_101_010,
        samples=[
            Sample(_stack("leaf", "main"), [3, 30]),
            Sample(_stack("leaf", "main"), [2, 20], (("kind", "task"),)),
            Sample(_stack("odd;name", "main"), [1, 10]),
            Sample(_stack("never", "main"), [0, 0]),
        ],
    )
    assert views.render_folded(data) == b"main;leaf 5\nmain;odd:name 1\n"
    assert views.render_folded(data, 1) == b"main;leaf 50\nmain;odd:name 10\n"


def test_bad_sample_index() -> None:
    with pytest.raises(ValueError, match="sample_index"):
        views.render_html(views_test_allocates(), "heap", sample_index=5)


def test_render_dispatches_formats() -> None:
    heap = views_test_allocates()
    body, ctype = views.render(heap, "html", "heap")
    assert ctype.startswith("text/html")
    assert body == views.render_html(heap, "heap")
    body, ctype = views.render(heap, "speedscope", "heap")
    assert ctype == "application/json"
    assert json.loads(body)["name"] == "heap"
    body, ctype = views.render(heap, "folded", "heap", 1)
    assert body == views.render_folded(heap, 1)
    with pytest.raises(ValueError, match="unknown format"):
        views.render(heap, "svg", "heap")
