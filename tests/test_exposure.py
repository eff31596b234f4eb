"""Safe exposure: loopback only by default, ``allow`` and ``auth_token`` widen it, cmdline hidden.

httpx's ``ASGITransport(client=...)`` sets ASGI's ``scope["client"]``, the address the
check reads; the real-server tests show that uvicorn's proxy headers decide it.
"""

from __future__ import annotations

import base64
import logging
import sys
import time
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount

from asgi_pprof import create_app
from tests.conftest import ServerThread

OTHER = ("10.1.2.3", 5555)
PATHS = ["/", "/cmdline", "/profile?seconds=30", "/trace?seconds=5", "/heap", "/goroutine?debug=2"]
PATHS += ["/goroutine?seconds=30", "/nosuch", "/symbol"]


def parent(**options: Any) -> Starlette:
    return Starlette(routes=[Mount("/debug/pprof", app=create_app(**options))])


def client_for(app: Any, address: tuple[str, int]) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=address)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def assert_go_error(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    assert r.headers["x-go-pprof"] == "1"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.text.endswith("\n")
    assert r.text.count("\n") == 1
    assert "content-disposition" not in r.headers


@pytest.mark.anyio
@pytest.mark.parametrize("address", [("127.0.0.1", 1), ("127.3.4.5", 1), ("::1", 1)])
async def test_loopback_is_allowed_by_default(address: tuple[str, int]) -> None:
    async with client_for(parent(), address) as c:
        r = await c.get("/debug/pprof/")
        assert r.status_code == 200
        assert "Types of profiles available" in r.text
        assert (await c.get("/debug/pprof/goroutine?debug=1")).status_code == 200


@pytest.mark.anyio
async def test_ipv4_mapped_loopback_is_loopback() -> None:
    async with client_for(parent(), ("::ffff:127.0.0.1", 1)) as c:
        assert (await c.get("/debug/pprof/cmdline")).status_code == 200


@pytest.mark.anyio
@pytest.mark.parametrize("path", PATHS)
async def test_other_address_refused_with_go_error_shape(path: str) -> None:
    async with client_for(parent(), OTHER) as c:
        t0 = time.monotonic()
        r = await c.get("/debug/pprof" + path)
        # Refused before anything runs: a 30 s window would take 30 s (margin: 25 s of load).
        assert time.monotonic() - t0 < 5
    assert_go_error(r, 403)
    assert "10.1.2.3" in r.text
    assert "create_app(allow=" in r.text
    assert "token" not in r.text  # no token configured: do not advertise one


@pytest.mark.anyio
async def test_refused_before_method_check_and_for_post() -> None:
    async with client_for(parent(), OTHER) as c:
        assert_go_error(await c.post("/debug/pprof/symbol", content=b"0x1"), 403)
        assert_go_error(await c.put("/debug/pprof/heap"), 403)


@pytest.mark.anyio
@pytest.mark.parametrize("address", [("testclient", 50000), ("fe80::1%eth0", 1)])
async def test_unparseable_or_non_loopback_hosts_refused(address: tuple[str, int]) -> None:
    async with client_for(parent(), address) as c:
        assert_go_error(await c.get("/debug/pprof/"), 403)


@pytest.mark.anyio
async def test_allow_cidr_lets_it_through_and_replaces_the_default() -> None:
    app = parent(allow=["10.0.0.0/8", "192.168.1.7"])
    async with client_for(app, OTHER) as c:
        assert (await c.get("/debug/pprof/cmdline")).status_code == 200
    async with client_for(app, ("192.168.1.7", 1)) as c:
        assert (await c.get("/debug/pprof/cmdline")).status_code == 200
    async with client_for(app, ("192.168.1.8", 1)) as c:
        r = await c.get("/debug/pprof/cmdline")
    assert_go_error(r, 403)
    assert "answer the clients of create_app(allow=...) only, not 192.168.1.8" in r.text
    # The list replaces the loopback default (as Django's INTERNAL_IPS): say loopback too.
    async with client_for(app, ("127.0.0.1", 1)) as c:
        assert_go_error(await c.get("/debug/pprof/cmdline"), 403)
    both = parent(allow=["127.0.0.0/8", "::1", "10.0.0.0/8"])
    for address in [("127.0.0.1", 1), OTHER]:
        async with client_for(both, address) as c:
            assert (await c.get("/debug/pprof/cmdline")).status_code == 200


@pytest.mark.anyio
async def test_allow_callable_sync_and_async(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []

    def by_header(request: Request) -> bool:
        seen.append(request.url.path)
        return request.headers.get("x-team") == "perf"

    async def async_rule(request: Request) -> bool:
        return request.query_params.get("k") == "1"

    def broken(request: Request) -> bool:
        raise RuntimeError("boom")

    app = parent(allow=[broken, by_header, async_rule])
    async with client_for(app, OTHER) as c:
        with caplog.at_level(logging.ERROR, logger="asgi_pprof"):
            assert (await c.get("/debug/pprof/", headers={"x-team": "perf"})).status_code == 200
        assert "allow callable failed" in caplog.text
        assert (await c.get("/debug/pprof/cmdline?k=1")).status_code == 200
        assert_go_error(await c.get("/debug/pprof/cmdline", headers={"x-team": "ops"}), 403)
    assert seen[0] == "/debug/pprof/"


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.anyio
async def test_auth_token_bearer_and_basic() -> None:
    token = "s3cret-token-123"
    app = parent(auth_token=token)
    async with client_for(app, OTHER) as c:
        ok = {"authorization": f"Bearer {token}"}
        assert (await c.get("/debug/pprof/cmdline", headers=ok)).status_code == 200
        basic = {"authorization": _basic("anyone", token)}
        assert (await c.get("/debug/pprof/cmdline", headers=basic)).status_code == 200
        for bad in [
            {},
            {"authorization": "Bearer nope-nope-nope"},
            {"authorization": _basic(token, "x")},  # the token is the password, not the user
            {"authorization": "Basic !!!"},
            {"authorization": f"Token {token}"},
        ]:
            r = await c.get("/debug/pprof/cmdline", headers=bad)
            assert_go_error(r, 401)
            assert r.headers["www-authenticate"] == 'Basic realm="asgi_pprof"'
            assert "token" in r.text
    async with client_for(app, ("127.0.0.1", 1)) as c:  # loopback still needs nothing
        assert (await c.get("/debug/pprof/cmdline")).status_code == 200


def test_go_tool_pprof_sends_basic_auth_from_the_url(go_tool: Any) -> None:
    """Real go tool pprof, nobody allowed by address: only the URL's password lets it in."""
    token = "tok-for-go-tool-pprof"
    with ServerThread(parent(allow=[], auth_token=token)) as srv:
        r = httpx.get(f"{srv.url}/debug/pprof/goroutine")
        assert r.status_code == 401
        out = go_tool("-top", f"http://pprof:{token}@127.0.0.1:{srv.port}/debug/pprof/goroutine")
        assert "goroutine" in out.lower()


def test_uvicorn_proxy_headers_decide_the_client_address() -> None:
    """Behind a local proxy: uvicorn's proxy headers make the forwarded address the client."""
    app = parent()
    with ServerThread(app, proxy_headers=True, forwarded_allow_ips="127.0.0.1") as srv:
        fwd = {"x-forwarded-for": "203.0.113.9"}
        r = httpx.get(f"{srv.url}/debug/pprof/cmdline", headers=fwd)
        assert r.status_code == 403
        assert "203.0.113.9" in r.text
        assert httpx.get(f"{srv.url}/debug/pprof/cmdline").status_code == 200
    with ServerThread(app, proxy_headers=False) as srv:
        # Without them every proxied client is the proxy's 127.0.0.1: the README warns of it.
        r = httpx.get(f"{srv.url}/debug/pprof/cmdline", headers=fwd)
        assert r.status_code == 200


@pytest.mark.anyio
async def test_hide_cmdline_args() -> None:
    argv = list(getattr(sys, "orig_argv", None) or sys.argv)
    assert len(argv) > 1  # pytest runs with arguments: the test can fail
    async with client_for(parent(hide_cmdline_args=True), ("127.0.0.1", 1)) as c:
        hidden = (await c.get("/debug/pprof/cmdline")).text
    async with client_for(parent(), ("127.0.0.1", 1)) as c:
        shown = (await c.get("/debug/pprof/cmdline")).text
    assert hidden == argv[0]
    assert shown == "\x00".join(argv)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"allow": "10.0.0.0/8"}, TypeError, "list of CIDR"),
        ({"allow": ["10.0.0.0/33"]}, ValueError, "not an IP address or CIDR"),
        ({"allow": [42]}, TypeError, "not int"),
        ({"auth_token": "short"}, ValueError, "at least 8"),
        ({"hide_cmdline_args": 1}, ValueError, "True or False"),
    ],
)
def test_bad_exposure_options(options: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        create_app(**options)
