"""Go's registration API (``handler(name)``) and the README's three set-up examples.

The examples are files in tests/deploy_examples/, the README's text: each test copies one
to a temporary directory with its port 6060 replaced by a free one and runs it for real
(uvicorn in a subprocess, the real ``go tool pprof``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount, Route

import asgi_pprof
from asgi_pprof.handlers import handler
from tests.conftest import free_port
from tests.deploy_helpers import running, traffic

EXAMPLES = Path(__file__).resolve().parent / "deploy_examples"


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


# --- handler(name) in-process -------------------------------------------------------------


@pytest.mark.anyio
async def test_named_handler_serves_go_contract_at_any_path() -> None:
    app = Starlette(
        routes=[
            Route("/x/y/heap-here", handler("goroutine")),
            Route("/cpu", handler("profile")),
            Route("/args", handler("cmdline")),
            Route("/sym", handler("symbol")),
        ]
    )
    async with client(app) as c:
        r = await c.get("/x/y/heap-here")
        assert r.status_code == 200
        assert r.headers["content-disposition"] == 'attachment; filename="goroutine"'
        text = await c.get("/x/y/heap-here?debug=1")
        assert text.text.startswith("goroutine profile: total ")
        bad = await c.get("/x/y/heap-here?seconds=x")
        assert bad.status_code == 400
        assert bad.headers["x-go-pprof"] == "1"
        put = await c.put("/cpu")
        assert put.status_code == 405
        assert put.headers["allow"] == "GET, HEAD"
        assert (await c.get("/args")).text == "\x00".join(getattr(sys, "orig_argv", sys.argv))
        assert (await c.post("/sym", content=b"0x0")).text == "num_symbols: 1\n"


@pytest.mark.anyio
async def test_index_handler_is_a_subtree_with_relative_links() -> None:
    app = Starlette(routes=[Mount("/ops/prof", handler(""))])
    async with client(app) as c:
        r = await c.get("/ops/prof/")
        assert r.status_code == 200
        assert "<a href='goroutine?debug=1'>goroutine</a>" in r.text
        # Go's Index serves named profiles below it (and 404s the rest).
        assert (await c.get("/ops/prof/goroutine?debug=1")).text.startswith("goroutine profile")
        missing = await c.get("/ops/prof/nosuch")
        assert missing.status_code == 404
        assert missing.text == "Unknown profile\n"


@pytest.mark.anyio
async def test_handlers_take_options_and_are_guarded() -> None:
    refusing = Starlette(routes=[Route("/g", handler("goroutine", allow=["10.0.0.0/8"]))])
    async with client(refusing) as c:  # the test client is 127.0.0.1
        assert (await c.get("/g")).status_code == 403
    default = Starlette(routes=[Route("/g", handler("goroutine"))])
    other = httpx.ASGITransport(app=default, client=("192.0.2.1", 1))
    async with httpx.AsyncClient(transport=other, base_url="http://test") as c:
        assert (await c.get("/g")).status_code == 403


def test_handler_names_checked() -> None:
    with pytest.raises(ValueError, match="no profile named 'nosuch'"):
        handler("nosuch")
    with pytest.raises(TypeError, match="must be a string"):
        handler(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown option"):
        handler("heap", nope=1)


# --- the README's examples, for real ------------------------------------------------------


def example(name: str, tmp_path: Path, port: int) -> Path:
    """Copy example ``name`` to ``tmp_path`` with port 6060 replaced by ``port``."""
    text = (EXAMPLES / name).read_text()
    if not hasattr(asgi_pprof, "handler"):  # until __init__ exports it (the lead's file)
        text = text.replace(
            "from asgi_pprof import handler", "from asgi_pprof.handlers import handler"
        )
    dest = tmp_path / name
    dest.write_text(text.replace("6060", str(port)))
    return dest


@pytest.mark.slow
def test_example_custom_mux(tmp_path: Path, go_tool: Any) -> None:
    port = free_port()
    example("mux_app.py", tmp_path, port)
    uvicorn = [sys.executable, "-m", "uvicorn", "mux_app:app", "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    # The heap profile reads tracemalloc (the example's docstring says so).
    with running([*uvicorn, "--log-level", "warning"], tmp_path, base + "/", PYTHONTRACEMALLOC="1"):
        heap = go_tool("-top", f"{base}/custom/heap")
        assert "Type: inuse_space" in heap
        with traffic(base + "/spin", 30):
            cpu = go_tool("-top", f"{base}/custom/profile?seconds=2")
        assert "mux_app_busy_work" in cpu
        goroutine = go_tool("-top", f"{base}/custom/goroutine")  # through the index's subtree
        assert "Type: goroutine" in goroutine
        index = httpx.get(base + "/custom/")
        assert "<a href='heap?debug=1'>heap</a>" in index.text
        assert httpx.get(base + "/custom/cmdline").text.split("\x00")[1:3] == ["-m", "uvicorn"]
        trace = httpx.get(base + "/custom/trace?seconds=0.2", timeout=30)
        assert trace.headers["content-disposition"] == 'attachment; filename="trace"'
        assert httpx.post(base + "/custom/symbol", content=b"").text == "num_symbols: 1\n"


@pytest.mark.slow
def test_example_debug_port(tmp_path: Path, go_tool: Any) -> None:
    port = free_port()
    script = example("debug_port.py", tmp_path, port)
    url = f"http://127.0.0.1:{port}/debug/pprof/"
    with running([sys.executable, str(script)], tmp_path, url):
        cpu = go_tool("-top", url + "profile?seconds=2")
        assert "debug_port_crunch" in cpu


@pytest.mark.slow
def test_example_production_separate_debug_port(tmp_path: Path, go_tool: Any) -> None:
    debug_port, port = free_port(), free_port()
    example("production.py", tmp_path, debug_port)
    uvicorn = [sys.executable, "-m", "uvicorn", "production:app", "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    debug = f"http://127.0.0.1:{debug_port}/debug/pprof/"
    with running([*uvicorn, "--log-level", "warning"], tmp_path, debug):
        assert httpx.get(base + "/debug/pprof/").status_code == 404  # not on the service's port
        assert httpx.get(base + "/checkout").json()["total"] > 0
        with traffic(base + "/checkout", 30):
            cpu = go_tool("-top", debug + "profile?seconds=2")
        assert "production_checkout_total" in cpu


def test_single_handler_as_a_servers_root_app() -> None:
    """uvicorn serving handler("goroutine") itself: lifespan is declined quietly, HTTP works."""
    from tests.conftest import ServerThread

    # lifespan="on": an app that raises on the lifespan scope fails uvicorn's startup.
    with ServerThread(handler("goroutine"), lifespan="on") as srv:
        r = httpx.get(f"{srv.url}/anything?debug=1", timeout=10)
        assert r.text.startswith("goroutine profile: total ")
