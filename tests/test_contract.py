"""Go's HTTP contract, as a table of rows like Go's own pprof_test.go."""

from __future__ import annotations

import gzip
from dataclasses import dataclass

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.routing import Mount

from asgi_pprof import builder, create_app, symbols
from asgi_pprof.model import Frame, ProfileData, Sample, ValueType
from asgi_pprof.profiles import NamedProfile

TEXT = "text/plain; charset=utf-8"
BIN = "application/octet-stream"
HTML = "text/html; charset=utf-8"


class Custom(NamedProfile):
    """A custom profile like Go's pprof.NewProfile("example.com/custom")."""

    name = "example.com/custom"
    description = ""

    def count(self) -> int:
        return 2

    async def collect(self, *, gc: bool = False) -> ProfileData:
        frame = Frame("tests.custom_entry", __file__, 1, 2)
        return ProfileData(
            sample_types=[ValueType(self.name, "count")],
            period_type=ValueType(self.name, "count"),
            period=1,
            samples=[Sample((frame,), [2])],
        )


HUGE = "9" * 4301  # past int()'s 4 300-digit limit

KNOWN = Frame("tests.test_contract.known_function", __file__, 10, 12)
KNOWN_PC = symbols.address_of(KNOWN)
KNOWN_LINE = f"{KNOWN_PC:#x} {KNOWN.function}\n"


@dataclass
class Row:
    path: str
    status: int
    ctype: str
    disposition: str | None = None
    body: bytes | None = None
    prefix: bytes | None = None
    method: str = "GET"
    content: bytes | None = None
    go_error: bool = False
    client: tuple[str, int] = ("127.0.0.1", 123)  # httpx's default; others are refused


FORBIDDEN = (
    b"forbidden: the pprof endpoints answer loopback clients only, not 192.0.2.7; allow others "
    b"with create_app(allow=['10.0.0.0/8', ...]) (CIDR strings, or a callable of the request "
    b"returning True)\n"
)

ROWS = [
    Row("/debug/pprof/", 200, HTML, prefix=b"<html>\n<head>\n<title>/debug/pprof/</title>"),
    Row("/debug/pprof/?debug=1", 200, HTML, prefix=b"<html>"),
    Row("/debug/pprof/cmdline", 200, TEXT),
    Row("/debug/pprof/cmdline?debug=1", 200, TEXT),
    Row(
        "/debug/pprof/profile?seconds=1",
        200,
        BIN,
        'attachment; filename="profile"',
        prefix=b"\x1f\x8b",
    ),
    Row(
        "/debug/pprof/profile?seconds=%2B1",
        200,
        BIN,
        'attachment; filename="profile"',
        prefix=b"\x1f\x8b",
    ),
    Row(
        "/debug/pprof/profile?seconds=abc",
        200,
        BIN,
        'attachment; filename="profile"',
        prefix=b"\x1f\x8b",
    ),
    Row("/debug/pprof/profile?seconds=-1&debug=1", 200, BIN, 'attachment; filename="profile"'),
    Row(
        "/debug/pprof/profile?seconds=5",
        400,
        TEXT,
        body=b"profile duration exceeds server's limit of 2 seconds\n",
        go_error=True,
    ),
    Row("/debug/pprof/nosuchprofile", 404, TEXT, body=b"Unknown profile\n", go_error=True),
    Row(
        "/debug/pprof/nosuchprofile?seconds=1", 404, TEXT, body=b"Unknown profile\n", go_error=True
    ),
    Row("/debug/pprof/HEAP", 404, TEXT, body=b"Unknown profile\n", go_error=True),
    Row("/debug/pprof/heap/", 404, TEXT, body=b"Unknown profile\n", go_error=True),
    Row(
        "/debug/pprof/%2e%2e/%2e%2e/etc/passwd", 404, TEXT, body=b"Unknown profile\n", go_error=True
    ),
    Row(
        "/debug/pprof/example.com/custom",
        200,
        BIN,
        'attachment; filename="example.com/custom"',
        prefix=b"\x1f\x8b",
    ),
    Row(
        "/debug/pprof/example.com/custom?debug=1",
        200,
        TEXT,
        prefix=b"example.com/custom profile: total 2\n2 @ 0x",
    ),
    Row(
        "/debug/pprof/example.com/custom?debug=abc",
        200,
        BIN,
        'attachment; filename="example.com/custom"',
    ),
    Row(
        "/debug/pprof/example.com/custom?seconds=1",
        400,
        TEXT,
        body=b'"seconds" parameter is not supported for this profile type\n',
        go_error=True,
    ),
    Row(
        "/debug/pprof/example.com/custom?seconds=0",
        400,
        TEXT,
        body=b'invalid value for "seconds" - must be a positive integer\n',
        go_error=True,
    ),
    Row(
        "/debug/pprof/example.com/custom?seconds=1.5",
        400,
        TEXT,
        body=b'invalid value for "seconds" - must be a positive integer\n',
        go_error=True,
    ),
    Row(
        "/debug/pprof/example.com/custom?seconds=",
        200,
        BIN,
        'attachment; filename="example.com/custom"',
    ),
    Row("/debug/pprof/symbol", 200, TEXT, body=b"num_symbols: 1\n"),
    Row(
        f"/debug/pprof/symbol?{KNOWN_PC:#x}",
        200,
        TEXT,
        body=f"num_symbols: 1\n{KNOWN_PC:#x} {KNOWN.function}\n".encode(),
    ),
    Row(
        f"/debug/pprof/symbol?{KNOWN_PC:#x}+0x1+garbage+{KNOWN_PC}",
        200,
        TEXT,
        body=f"num_symbols: 1\n{KNOWN_LINE}{KNOWN_LINE}".encode(),
    ),
    Row(f"/debug/pprof/symbol?{KNOWN_PC:#x}%2B{KNOWN_PC:#x}", 200, TEXT, body=b"num_symbols: 1\n"),
    Row(
        "/debug/pprof/symbol",
        200,
        TEXT,
        method="POST",
        content=f"{KNOWN_PC - 3:#x}".encode(),
        body=f"num_symbols: 1\n{KNOWN_PC - 3:#x} {KNOWN.function}\n".encode(),
    ),
    Row(
        "/debug/pprof/symbol",
        200,
        TEXT,
        method="POST",
        content=f"{KNOWN_PC:#x}+{KNOWN_PC:#x}\n".encode(),
        body=f"num_symbols: 1\n{KNOWN_PC:#x} {KNOWN.function}\n".encode(),
    ),
    Row("/debug/pprof/symbol", 200, TEXT, method="POST", content=b"0x1", body=b"num_symbols: 1\n"),
    Row("/debug/pprof/symbol", 200, TEXT, method="POST", content=b"", body=b"num_symbols: 1\n"),
    Row("/debug/pprof/symbol", 405, TEXT, method="PUT", body=b"Method Not Allowed\n"),
    Row("/debug/pprof/", 405, TEXT, method="POST", body=b"Method Not Allowed\n"),
    Row("/debug/pprof/heap", 405, TEXT, method="POST", body=b"Method Not Allowed\n"),
    Row("/debug/pprof/profile", 405, TEXT, method="DELETE", body=b"Method Not Allowed\n"),
    Row("/debug/pprof/cmdline", 405, TEXT, method="OPTIONS", body=b"Method Not Allowed\n"),
    Row("/debug/pprof/", 200, HTML, method="HEAD", body=b""),
    Row("/debug/pprof/cmdline", 200, TEXT, method="HEAD", body=b""),
    # Oversized and malformed input (issue 8 item 5): Go's answers, never a 5xx.
    Row(
        "/debug/pprof/trace?seconds=5",
        400,
        TEXT,
        body=b"profile duration exceeds server's limit of 2 seconds\n",
        go_error=True,
    ),
    Row(
        f"/debug/pprof/example.com/custom?seconds={HUGE}",
        400,
        TEXT,
        body=b'invalid value for "seconds" - must be a positive integer\n',
        go_error=True,
    ),
    Row(
        f"/debug/pprof/example.com/custom?debug={HUGE}",
        200,
        TEXT,
        prefix=b"example.com/custom profile: total 2\n",
    ),
    Row(
        f"/debug/pprof/example.com/custom?debug=x{HUGE}",
        200,
        BIN,
        'attachment; filename="example.com/custom"',
    ),
    Row(f"/debug/pprof/symbol?{HUGE}", 200, TEXT, body=b"num_symbols: 1\n"),
    Row(
        "/debug/pprof/symbol",
        413,
        TEXT,
        method="POST",
        content=b"0x1+" * (1 << 18) + b"0x1",
        body=b"request body too large (limit 1048576 bytes)\n",
        go_error=True,
    ),
    Row("/debug/pprof/" + "x" * 5000, 404, TEXT, body=b"Unknown profile\n", go_error=True),
    # Safe exposure: a client that is not loopback is refused before anything runs.
    *(
        Row(path, 403, TEXT, body=FORBIDDEN, go_error=True, client=("192.0.2.7", 1), method=m)
        for m, path in [
            ("GET", "/debug/pprof/"),
            ("GET", "/debug/pprof/profile?seconds=30"),
            ("GET", "/debug/pprof/goroutine?debug=2"),
            ("POST", "/debug/pprof/symbol"),
            ("PUT", "/debug/pprof/heap"),
            ("GET", "/debug/pprof/nosuch"),
        ]
    ),
]


def _from(row: Row) -> str:
    return "" if row.client == Row.client else f" from {row.client[0]}"


def parent_starlette() -> Starlette:
    return Starlette(
        routes=[Mount("/debug/pprof", app=create_app(max_seconds=2, profiles=[Custom()]))]
    )


def parent_fastapi() -> FastAPI:
    app = FastAPI()
    app.mount("/debug/pprof", create_app(max_seconds=2, profiles=[Custom()]))
    return app


@pytest.mark.anyio
@pytest.mark.parametrize(
    "make_app", [parent_starlette, parent_fastapi], ids=["starlette", "fastapi"]
)
@pytest.mark.parametrize("row", ROWS, ids=[f"{r.method} {r.path[:60]}{_from(r)}" for r in ROWS])
async def test_contract_row(row: Row, make_app: object) -> None:
    assert callable(make_app)
    transport = httpx.ASGITransport(app=make_app(), client=row.client)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        r = await c.request(row.method, row.path, content=row.content)
    assert r.status_code == row.status, r.text
    assert r.headers["content-type"] == row.ctype
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers.get("content-disposition") == row.disposition
    assert r.headers.get("x-go-pprof") == ("1" if row.go_error else None)
    if row.status == 405:
        allow = "GET, HEAD, POST" if row.path.endswith("/symbol") else "GET, HEAD"
        assert r.headers["allow"] == allow
    if row.body is not None:
        assert r.content == row.body
    if row.prefix is not None:
        assert r.content.startswith(row.prefix), r.content[:200]
    if row.ctype == BIN and row.method == "GET":
        decoded = builder.decode(r.content)
        assert decoded.sample_types


@pytest.mark.anyio
async def test_index_rows_sorted_with_counts_and_relative_links(client: httpx.AsyncClient) -> None:
    transport = httpx.ASGITransport(app=parent_starlette())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        page = (await c.get("/debug/pprof/")).text
    rows = [ln for ln in page.splitlines() if ln.startswith("<tr><td>")]
    names = [ln.split("'>")[1].split("</a>")[0] for ln in rows]
    assert names == sorted(names)
    assert {"cmdline", "profile", "trace", "example.com/custom"} <= set(names)
    assert (
        "<tr><td>2</td><td><a href='example.com/custom?debug=1'>example.com/custom</a></td></tr>"
        in rows
    )
    assert "<tr><td>0</td><td><a href='profile?debug=1'>profile</a></td></tr>" in rows
    assert "symbol" not in names
    assert "<li><div class=profile-name>example.com/custom: </div> </li>" in page
    assert page.endswith("</body>\n</html>")
    assert '<a href="goroutine?debug=2">full goroutine stack dump</a>' in page


@pytest.mark.anyio
async def test_cmdline_is_the_real_command_line_nul_separated(client: httpx.AsyncClient) -> None:
    import sys

    body = (await client.get("/debug/pprof/cmdline")).content
    assert body.split(b"\x00") == [a.encode() for a in sys.orig_argv]
    assert not body.endswith(b"\x00")


@pytest.mark.anyio
async def test_first_query_value_wins() -> None:
    transport = httpx.ASGITransport(app=parent_starlette())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        r = await c.get("/debug/pprof/example.com/custom?debug=1&debug=0")
    assert r.headers["content-type"] == TEXT


@pytest.mark.anyio
async def test_unmounted_path_without_slash_redirects(client: httpx.AsyncClient) -> None:
    r = await client.get("/debug/pprof")
    assert r.status_code in (301, 307, 308)
    assert r.headers["location"].endswith("/debug/pprof/")


def test_profile_bodies_are_gzip_with_go_framing() -> None:
    data = ProfileData([ValueType("x", "count")], ValueType("x", "count"), 1)
    body = builder.encode(data)
    assert body[:4] == b"\x1f\x8b\x08\x00"
    assert gzip.decompress(body) == builder.to_proto(data).SerializeToString()
