"""format= on every profile endpoint, the fgprof route, the index's flame graphs (issue 11)."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from asgi_pprof import builder, start_server

from . import workloads

pytestmark = pytest.mark.anyio

P = "/debug/pprof"


async def test_cpu_profile_as_a_flame_graph_page(client: httpx.AsyncClient) -> None:
    stop = threading.Event()
    t = threading.Thread(target=workloads.short_bursts_forever, args=(stop,), name="fmt")
    t.start()
    try:
        r = await client.get(f"{P}/profile?seconds=1&format=html")
    finally:
        stop.set()
        t.join()
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "content-disposition" not in r.headers
    assert "short_bursts_forever" in r.text or "alpha_burst" in r.text


@pytest.mark.parametrize(
    ("path", "media"),
    [
        ("goroutine?format=html", "text/html"),
        ("goroutine?format=speedscope", "application/json"),
        ("goroutine?format=folded", "text/plain"),
        ("threadcreate?format=speedscope", "application/json"),
        ("goroutine?seconds=1&format=folded", "text/plain"),
        ("fgprof?seconds=1&format=speedscope", "application/json"),
    ],
)
async def test_named_delta_and_fgprof_render_in_every_format(
    client: httpx.AsyncClient, path: str, media: str
) -> None:
    r = await client.get(f"{P}/{path}")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(media)
    if media == "application/json":
        doc = json.loads(r.content)
        assert doc["profiles"], doc


async def test_fgprof_is_a_wall_clock_profile(client: httpx.AsyncClient) -> None:
    r = await client.get(f"{P}/fgprof?seconds=1")
    assert r.status_code == 200
    assert r.headers["content-disposition"] == 'attachment; filename="fgprof"'
    data = builder.decode(r.content)
    assert [(v.type, v.unit) for v in data.sample_types] == [
        ("samples", "count"),
        ("time", "nanoseconds"),
    ]
    assert (data.period_type.type, data.period_type.unit) == ("wallclock", "nanoseconds")


async def test_an_unknown_format_is_a_400_before_any_window(client: httpx.AsyncClient) -> None:
    for path in ("profile?seconds=30&format=pdf", "goroutine?format=svg", "fgprof?format=x"):
        r = await client.get(f"{P}/{path}")
        assert r.status_code == 400, path
        assert r.headers["x-go-pprof"] == "1"
        assert "unknown format" in r.text


async def test_format_proto_is_go_s_profile(client: httpx.AsyncClient) -> None:
    r = await client.get(f"{P}/goroutine?format=proto")
    assert r.headers["content-disposition"] == 'attachment; filename="goroutine"'
    assert builder.decode(r.content).samples


async def test_index_links_a_flame_graph_of_every_profile(client: httpx.AsyncClient) -> None:
    page = (await client.get(f"{P}/")).text
    for name in ("goroutine", "heap", "allocs", "threadcreate", "block", "mutex"):
        assert f"<a href='{name}?format=html'>{name}</a>" in page, name
    for name in ("profile", "fgprof"):
        assert f"<form action='{name}'" in page
    assert page.index("Profile Descriptions") < page.index("Flame graphs")  # after Go's part


def test_standalone_server_answers_alloys_fgprof_path() -> None:
    with start_server(port=0) as srv:
        base = srv.url.rsplit("/debug/pprof", 1)[0]
        r = httpx.get(f"{base}/debug/fgprof?seconds=1", timeout=30)
    assert r.status_code == 200
    assert builder.decode(r.content).period_type.type == "wallclock"
