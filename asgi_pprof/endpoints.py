"""One async endpoint per Go handler: index, cmdline, profile, symbol, trace, named profiles.

The HTTP contract is Go's (see the README): the same parameter parsing, headers and
error texts. Every error goes through :func:`serve_error`. Endpoints never walk frames
or encode profiles themselves: collectors and builders do that, off the event loop.
"""

from __future__ import annotations

import gc
import html
import logging
import math
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING
from urllib.parse import quote

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from . import builder, cpu, symbols
from .concurrency import run_in_thread
from .params import atoi, first, parse_float, parse_int10
from .profiles import NamedProfile, ProfileError

if TYPE_CHECKING:
    from .options import Options

__all__ = ["Endpoints", "serve_error"]

log = logging.getLogger("asgi_pprof")

_TEXT = "text/plain; charset=utf-8"
_BINARY = "application/octet-stream"
_NOSNIFF = {"X-Content-Type-Options": "nosniff"}

CPU_DEFAULT_SECONDS = 30
"""Go's default CPU profile length."""

TRACE_DEFAULT_SECONDS = 1.0
"""Go's default trace length."""

DESCRIPTIONS = {
    "allocs": "A sampling of all past memory allocations",
    "block": "Stack traces that led to blocking on synchronization primitives",
    "cmdline": "The command line invocation of the current program",
    "goroutine": "Stack traces of all current goroutines. Use debug=2 as a query parameter "
    "to export in the same format as an unrecovered panic.",
    "heap": "A sampling of memory allocations of live objects. You can specify the gc GET "
    "parameter to run GC before taking the heap sample.",
    "mutex": "Stack traces of holders of contended mutexes",
    "profile": "CPU profile. You can specify the duration in the seconds GET parameter. "
    "After you get the profile file, use the go tool pprof command to investigate the profile.",
    "threadcreate": "Stack traces that led to the creation of new OS threads",
    "trace": "A trace of execution of the current program. You can specify the duration in "
    "the seconds GET parameter. The trace is Chrome Trace Event Format JSON: open it in "
    "https://ui.perfetto.dev, chrome://tracing or speedscope.",
}
"""Index descriptions: Go's texts, except trace (our trace is JSON, not Go's format)."""


def serve_error(status: int, text: str) -> Response:
    """Return Go's ``serveError`` response: plain text plus a newline, ``X-Go-Pprof: 1``."""
    return Response(
        text + "\n",
        status_code=status,
        media_type=_TEXT,
        headers={**_NOSNIFF, "X-Go-Pprof": "1"},
    )


def _text(body: str | bytes) -> Response:
    return Response(body, media_type=_TEXT, headers=dict(_NOSNIFF))


def _binary(body: bytes, filename: str) -> Response:
    return Response(
        body,
        media_type=_BINARY,
        headers={**_NOSNIFF, "Content-Disposition": f'attachment; filename="{filename}"'},
    )


def _go_html_escape(s: str) -> str:
    """Return Go's ``html.EscapeString`` (``&#39;`` and ``&#34;``, not Python's forms)."""
    return html.escape(s, quote=False).replace("'", "&#39;").replace('"', "&#34;")


def _href(name: str) -> str:
    """Return Go's ``url.URL{Path: name, RawQuery: "debug=1"}.String()``."""
    path = quote(name, safe="-_.~$&+,/:;=@")
    if ":" in path.split("/", 1)[0]:
        path = "./" + path
    return path + "?debug=1"


class _Disconnect:
    """A capture window that ends early when the client disconnects."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive

    async def wait(self, seconds: float) -> bool:
        """Return True when ``seconds`` passed, False when the client disconnected first."""
        left = True

        async def watch(scope: anyio.CancelScope) -> None:
            nonlocal left
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    left = False
                    scope.cancel()
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, tg.cancel_scope)
            await anyio.sleep(seconds)
            tg.cancel_scope.cancel()
        return left


Handler = Callable[[Request], Awaitable[Response]]


class _MethodGuard:
    """Runs a handler for the methods Go allows; every other method gets Go's 405.

    A class, not a function, so Starlette's ``Route`` passes every method through to it.
    The handler's errors become responses here, never exceptions in the host app.
    """

    def __init__(self, handler: Handler, methods: frozenset[str]) -> None:
        self.handler = handler
        self.methods = methods
        self.allow = ", ".join(m for m in ("GET", "HEAD", "POST") if m in methods)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        if request.method not in self.methods:
            response = Response(
                "Method Not Allowed\n",
                status_code=405,
                media_type=_TEXT,
                headers={**_NOSNIFF, "Allow": self.allow},
            )
        else:
            try:
                response = await self.handler(request)
            except ProfileError as e:
                response = serve_error(e.status, e.text)
            except Exception:
                log.exception("asgi_pprof: %s failed", request.url.path)
                response = serve_error(500, "failed to collect profile")
        if request.method == "HEAD":
            response.body = b""
        await response(scope, receive, send)


class Endpoints:
    """The handlers of one pprof app, bound to its options and profiles."""

    def __init__(self, options: Options, profiles: Sequence[NamedProfile]) -> None:
        self.options = options
        self.profiles = {p.name: p for p in profiles}

    # --- dispatch ---------------------------------------------------------------------

    def route(self, handler: Handler, methods: frozenset[str]) -> ASGIApp:
        """Return an ASGI app that runs ``handler`` for ``methods`` and 405s the rest."""
        return _MethodGuard(handler, methods)

    # --- handlers ---------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        """Return the HTML index: every profile with its count, link and description."""
        entries = [(p.name, p.count(), p.description) for p in self.profiles.values()]
        for pseudo in ("cmdline", "profile", "trace"):
            entries.append((pseudo, 0, DESCRIPTIONS[pseudo]))
        entries.sort(key=lambda e: e[0].encode())
        rows = "".join(
            f"<tr><td>{n}</td><td><a href='{_href(name)}'>{_go_html_escape(name)}</a></td></tr>\n"
            for name, n, _ in entries
        )
        descs = "".join(
            f"<li><div class=profile-name>{_go_html_escape(name)}: </div> "
            f"{_go_html_escape(desc)}</li>\n"
            for name, _, desc in entries
        )
        page = (
            "<html>\n<head>\n<title>/debug/pprof/</title>\n<style>\n.profile-name{\n"
            "\tdisplay:inline-block;\n\twidth:6rem;\n}\n</style>\n</head>\n<body>\n"
            "/debug/pprof/\n<br>\n"
            "<p>Set debug=1 as a query parameter to export in legacy text format</p>\n"
            "<br>\nTypes of profiles available:\n<table>\n"
            "<thead><td>Count</td><td>Profile</td></thead>\n"
            f"{rows}</table>\n"
            '<a href="goroutine?debug=2">full goroutine stack dump</a>\n<br>\n'
            f"<p>\nProfile Descriptions:\n<ul>\n{descs}</ul>\n</p>\n</body>\n</html>"
        )
        return Response(page, media_type="text/html; charset=utf-8", headers=dict(_NOSNIFF))

    async def cmdline(self, request: Request) -> Response:
        """Return the command line, arguments separated by NUL bytes (Go's ``os.Args``)."""
        return _text("\x00".join(_argv()))

    async def symbol(self, request: Request) -> Response:
        """Return ``num_symbols: 1`` and ``<addr> <function>`` for each known address.

        Addresses come from the POST body or the raw query string, ``+``-separated, in
        any base Go's ``ParseUint(s, 0, 64)`` accepts.
        """
        if request.method == "POST":
            raw = (await request.body()).decode("latin-1")
        else:
            raw = request.scope.get("query_string", b"").decode("latin-1")
        lines = ["num_symbols: 1\n"]
        for word in raw.split("+"):
            pc = _parse_uint0(word)
            if pc:
                name = symbols.lookup(pc)
                if name is not None:
                    lines.append(f"{pc:#x} {name}\n")
        return _text("".join(lines))

    def _window_seconds(self, seconds: float) -> None:
        if seconds > self.options.max_seconds:
            raise ProfileError(
                400,
                f"profile duration exceeds server's limit of {self.options.max_seconds} seconds",
            )

    async def profile(self, request: Request) -> Response:
        """Return a CPU profile of ``seconds`` (default 30) as gzipped profile.proto."""
        sec = parse_int10(first(request.query_params, "seconds"))
        if sec is None or sec <= 0:
            sec = min(CPU_DEFAULT_SECONDS, self.options.max_seconds)
        self._window_seconds(sec)
        data = await cpu.profile(sec, _Disconnect(request.receive), self.options)
        body = await run_in_thread(builder.encode, data)
        return _binary(body, "profile")

    async def trace(self, request: Request) -> Response:
        """Return an execution trace of ``seconds`` (float, default 1) as Trace Event JSON."""
        from . import tracing  # the trace is optional machinery: load it on first use

        sec = parse_float(first(request.query_params, "seconds"))
        if sec is None or sec <= 0:
            sec = TRACE_DEFAULT_SECONDS
        if not math.isfinite(sec):
            sec = 0.0  # Go: NaN and Inf end as an immediate trace
        self._window_seconds(sec)
        body = await tracing.capture(sec, _Disconnect(request.receive), self.options)
        return _binary(body, "trace")

    async def named(self, request: Request) -> Response:
        """Return ``/debug/pprof/<name>``: proto (debug=0), text (debug>=1), or a delta."""
        name = request.path_params["name"]
        prof = self.profiles.get(name)
        if prof is None:
            return serve_error(404, "Unknown profile")
        seconds = first(request.query_params, "seconds")
        if seconds != "":
            return await self._delta(request, prof, seconds)
        run_gc = atoi(first(request.query_params, "gc")) > 0 and name == "heap"
        if run_gc:
            await run_in_thread(gc.collect)
        debug = atoi(first(request.query_params, "debug"))
        if debug != 0:
            return _text(await prof.text(debug, gc=run_gc))
        data = await prof.collect(gc=run_gc)
        return _binary(await run_in_thread(builder.encode, data), name)

    async def _delta(self, request: Request, prof: NamedProfile, seconds: str) -> Response:
        # Go's order: seconds value, profile type, debug.
        sec = parse_int10(seconds)
        if sec is None or sec <= 0:
            return serve_error(400, 'invalid value for "seconds" - must be a positive integer')
        if not prof.supports_delta:
            return serve_error(400, '"seconds" parameter is not supported for this profile type')
        self._window_seconds(sec)
        if atoi(first(request.query_params, "debug")) != 0:
            return serve_error(400, "seconds and debug params are incompatible")
        data = await prof.delta(sec, _Disconnect(request.receive))
        if data is None:
            return serve_error(500, "context canceled")
        body = await run_in_thread(builder.encode, data, 6)
        return _binary(body, f"{prof.name}-delta")


def _argv() -> list[str]:
    """Return the real command line: the interpreter's ``sys.orig_argv`` when it has one."""
    return list(getattr(sys, "orig_argv", None) or sys.argv)


def _parse_uint0(word: str) -> int:
    """Return Go's ``strconv.ParseUint(word, 0, 64)``, 0 on error (as the symbol handler)."""
    s = word
    if not s or s != s.strip() or s[0] in "+-":
        return 0
    try:
        n = int(s, 0)
    except ValueError:
        # Go also accepts leading-zero octal ("0755"), which int(s, 0) refuses.
        if len(s) > 1 and s[0] == "0" and s[1:].replace("_", "").isdigit():
            try:
                n = int(s[1:].replace("_", ""), 8)
            except ValueError:
                return 0
        else:
            return 0
    return n if 0 <= n < (1 << 64) else 0
