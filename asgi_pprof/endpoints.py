"""One async endpoint per Go handler: index, cmdline, profile, symbol, trace, named profiles.

The HTTP contract is Go's (see the README): the same parameter parsing, headers and
error texts. Every error goes through :func:`serve_error`. Endpoints never walk frames
or encode profiles themselves: collectors and builders do that, off the event loop.
"""

from __future__ import annotations

import contextlib
import gc
import html
import logging
import math
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING
from urllib.parse import quote

import anyio
import anyio.lowlevel
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from . import builder, cpu, limits, symbols, workers
from .concurrency import RequestWindow, Window, run_in_thread
from .exposure import Exposure, Refusal
from .model import ProfileData
from .params import atoi, first, parse_float, parse_int10
from .profiles import NamedProfile, ProfileError

if TYPE_CHECKING:
    from .options import Options

__all__ = ["Call", "ClientGone", "Endpoints", "serve_error"]

log = logging.getLogger("asgi_pprof")

_TEXT = "text/plain; charset=utf-8"
_BINARY = "application/octet-stream"
_NOSNIFF = {"X-Content-Type-Options": "nosniff"}

CPU_DEFAULT_SECONDS = 30
"""Go's default CPU profile length."""

TRACE_DEFAULT_SECONDS = 1.0
"""Go's default trace length."""

CLIENT_GONE = 499
"""The status sent for a client that left (nginx's "client closed request")."""

_SYMBOL_INLINE = 4096
"""Symbol requests up to this many bytes are answered on the loop (a thread hop costs more)."""

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


def serve_error(status: int, text: str, headers: dict[str, str] | None = None) -> Response:
    """Return Go's ``serveError`` response: plain text plus a newline, ``X-Go-Pprof: 1``."""
    return Response(
        text + "\n",
        status_code=status,
        media_type=_TEXT,
        headers={**_NOSNIFF, "X-Go-Pprof": "1", **(headers or {})},
    )


def _text(body: str | bytes | list[bytes]) -> Response:
    if isinstance(body, list):
        return PiecesResponse(body, media_type=_TEXT, headers=dict(_NOSNIFF))
    return Response(body, media_type=_TEXT, headers=dict(_NOSNIFF))


class PiecesResponse(Response):
    """A body kept in pieces and sent one piece per ASGI message, never joined.

    The loop then copies one piece at a time into the transport, with the server's flow
    control between pieces, where one 140 MB body was a single copy on the loop.
    ``body`` joins them, for the few readers that want it whole (merging workers' texts).
    """

    def __init__(self, pieces: list[bytes], media_type: str, headers: dict[str, str]) -> None:
        total = sum(len(p) for p in pieces)
        super().__init__(
            None, media_type=media_type, headers={**headers, "Content-Length": str(total)}
        )
        self.pieces = pieces

    @property
    def body(self) -> bytes:
        """Return the whole body (joined now)."""
        return b"".join(getattr(self, "pieces", ()))

    @body.setter
    def body(self, value: bytes | memoryview) -> None:
        self.pieces = [bytes(value)] if value else []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        pieces = self.pieces or [b""]
        self.pieces = []
        last = len(pieces) - 1
        for i in range(len(pieces)):
            # Each piece is let go once sent: freeing 550 pieces of 256 KiB together at
            # the end (each one an munmap) held the loop ~10 ms.
            piece, pieces[i] = pieces[i], b""
            await send({"type": "http.response.body", "body": piece, "more_body": i < last})
            del piece
            # A server's send() suspends only when the socket pushes back: to a client
            # that keeps up, a 140 MB body went out in one loop step of 30-50 ms.
            await anyio.lowlevel.checkpoint()


def _binary(body: bytes, filename: str) -> Response:
    return Response(
        body,
        media_type=_BINARY,
        headers={**_NOSNIFF, "Content-Disposition": f'attachment; filename="{filename}"'},
    )


def _flame_graph_links(names: list[str]) -> str:
    """Return the index's extra block: a flame graph page of every profile, in this browser.

    Not in Go's page (it comes after Go's part, which stays byte for byte): links to
    ``<name>?format=html`` and, for the timed profiles, a form choosing the seconds.
    """
    timed = "".join(
        f"<form action='{name}' style='display:inline'>"
        f"<input type=hidden name=format value=html>"
        f"<input name=seconds value=10 size=3> s <button>{name}</button></form>\n"
        for name in ("profile", "fgprof")
    )
    links = "".join(
        f"<a href='{quote(name, safe='-_.~/')}?format=html'>{_go_html_escape(name)}</a>\n"
        for name in names
    )
    return (
        "<p>\nFlame graphs in this browser (no Go needed; also format=speedscope, "
        f"format=folded):\n<br>\n{timed}<br>\n{links}</p>\n"
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


class ClientGone(Exception):
    """The client left: nothing more is built, nothing is logged (see ``CLIENT_GONE``)."""


class Call:
    """What one request's handler gets beside the request: its window and its body.

    A watcher task owns the request's ``receive()``: it buffers the body (up to a cap)
    and, when the client disconnects, ends the window and cancels the handler, so work
    queued for a client that left is never started.
    """

    def __init__(self, body_limit: int) -> None:
        self.window = RequestWindow()
        self.body_limit = body_limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._too_large = False
        self._body_done = anyio.Event()

    async def body(self) -> bytes:
        """Return the request body; 413 (Go's error shape) past the cap."""
        await self._body_done.wait()
        if self._too_large:
            raise ProfileError(413, f"request body too large (limit {self.body_limit} bytes)")
        return b"".join(self._chunks)

    async def watch(self, receive: Receive, handler_scope: anyio.CancelScope) -> None:
        """Read ``receive()`` until the client disconnects, then cancel ``handler_scope``."""
        try:
            while True:
                message = await receive()
                kind = message.get("type")
                if kind == "http.request":
                    self._add(message.get("body", b""), bool(message.get("more_body", False)))
                elif kind == "http.disconnect":
                    break
        except Exception:  # a server's receive() failing means the client is gone too
            log.debug("asgi_pprof: receive() failed; treating the client as gone", exc_info=True)
        self._body_done.set()
        self.window.leave()
        handler_scope.cancel()

    def _add(self, chunk: bytes, more: bool) -> None:
        if not self._too_large:
            self._size += len(chunk)
            if self._size > self.body_limit:
                self._too_large = True
                self._chunks = []  # the rest is read and dropped: memory stays bounded
            elif chunk:
                self._chunks.append(chunk)
        if not more or self._too_large:
            self._body_done.set()


Handler = Callable[[Request, Call], Awaitable[Response]]


class _MethodGuard:
    """Runs a handler for the methods Go allows; every other method gets Go's 405.

    A class, not a function, so Starlette's ``Route`` passes every method through to it.
    The handler's errors become responses here, never exceptions in the host app. The
    handler runs in a cancel scope that a disconnect cancels (see :class:`Call`). A client
    the app's :class:`~asgi_pprof.exposure.Exposure` refuses gets 403 (or 401) first.
    """

    def __init__(
        self,
        handler: Handler,
        methods: frozenset[str],
        body_limit: int,
        exposure: Exposure,
        fanout: bool = False,
    ) -> None:
        self.fanout = fanout
        self.handler = handler
        self.methods = methods
        self.body_limit = body_limit
        self.exposure = exposure
        self.allow = ", ".join(m for m in ("GET", "HEAD", "POST") if m in methods)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            # A handler used as a server's root app also gets "lifespan" (returning says
            # "unsupported") or a websocket (closed unaccepted): pprof is HTTP only.
            return
        request = Request(scope, receive)
        try:
            if not scope.get(workers.PEER_KEY):  # a sibling's (same user, 0700 socket)
                await self.exposure.check(request)
        except Refusal as e:
            await serve_error(e.status, e.text, e.headers)(scope, receive, send)
            return
        if request.method not in self.methods:
            response: Response | None = Response(
                "Method Not Allowed\n",
                status_code=405,
                media_type=_TEXT,
                headers={**_NOSNIFF, "Allow": self.allow},
            )
        elif (
            self.fanout
            and request.method == "GET"
            and workers.group_active()
            and not scope.get(workers.PEER_KEY)
        ):
            # A worker of a multi-process server: its siblings' answers merged in.
            response = await workers.fan_out(request, lambda: self._run(request, receive))
        else:
            response = await self._run(request, receive)
        if response is None:
            # The client left. Nobody reads this, but a middleware in between must see a
            # response (Starlette's BaseHTTPMiddleware raises "No response returned."
            # without one). Go's text, and a 4xx (nginx's 499): a scraper abandoning
            # requests must not count as the service's 5xx.
            response = serve_error(CLIENT_GONE, "context canceled")
            with contextlib.suppress(OSError):  # ASGI servers may refuse a send now
                await response(scope, receive, send)
            return
        if request.method == "HEAD":
            response.body = b""
        await response(scope, receive, send)

    async def _run(self, request: Request, receive: Receive) -> Response | None:
        call = Call(self.body_limit if request.method == "POST" else 0)
        response: Response | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(call.watch, receive, tg.cancel_scope)
            try:
                response = await self.handler(request, call)
            except ProfileError as e:
                response = serve_error(e.status, e.text)
            except ClientGone:
                pass
            except Exception:
                log.exception("asgi_pprof: %s failed", request.url.path)
                response = serve_error(500, "failed to collect profile")
            tg.cancel_scope.cancel()
        return None if call.window.client_left else response


class Endpoints:
    """The handlers of one pprof app, bound to its options and profiles."""

    def __init__(self, options: Options, profiles: Sequence[NamedProfile]) -> None:
        self.options = options
        self.profiles = {p.name: p for p in profiles}
        self.exposure = Exposure(options)

    # --- dispatch ---------------------------------------------------------------------

    def route(self, handler: Handler, methods: frozenset[str], fanout: bool = False) -> ASGIApp:
        """Return an ASGI app that runs ``handler`` for ``methods`` and 405s the rest.

        ``fanout``: in a worker of a multi-process server, merge the siblings' answers.
        """
        return _MethodGuard(handler, methods, self.options.max_symbol_bytes, self.exposure, fanout)

    # --- handlers ---------------------------------------------------------------------

    async def index(self, request: Request, call: Call) -> Response:
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
            f"<p>\nProfile Descriptions:\n<ul>\n{descs}</ul>\n</p>\n"
            f"{_flame_graph_links(sorted(self.profiles))}</body>\n</html>"
        )
        return Response(page, media_type="text/html; charset=utf-8", headers=dict(_NOSNIFF))

    async def cmdline(self, request: Request, call: Call) -> Response:
        """Return the command line, arguments separated by NUL bytes (Go's ``os.Args``).

        With ``hide_cmdline_args`` only the program (the interpreter) is served.
        """
        argv = _argv()
        if self.options.hide_cmdline_args:
            argv = argv[:1]
        return _text("\x00".join(argv))

    async def symbol(self, request: Request, call: Call) -> Response:
        """Return ``num_symbols: 1`` and ``<addr> <function>`` for each known address.

        Addresses come from the POST body or the raw query string, ``+``-separated, in
        any base Go's ``ParseUint(s, 0, 64)`` accepts.
        """
        if request.method == "POST":
            raw = await call.body()  # bounded by max_symbol_bytes (Go reads any size)
        else:
            raw = request.scope.get("query_string", b"")
        if len(raw) <= _SYMBOL_INLINE:
            return _text(_symbolize(raw))
        return _text(await run_in_thread(_symbolize, raw))

    async def profile(self, request: Request, call: Call) -> Response:
        """Return a CPU profile of ``seconds`` (default 30) as gzipped profile.proto."""
        return await self._timed(request, call, "profile", cpu.profile)

    async def fgprof(self, request: Request, call: Call) -> Response:
        """Return a wall-clock profile (fgprof's) of ``seconds`` (default 30): every thread and
        every asyncio task, running or waiting, as gzipped profile.proto."""
        from . import fgprof  # a sampler of its own: load it on first use

        return await self._timed(request, call, "fgprof", fgprof.profile)

    async def _timed(self, request: Request, call: Call, name: str, capture: Capture) -> Response:
        fmt = _format_of(request)  # checked before the window, not after it
        sec = parse_int10(first(request.query_params, "seconds"))
        if sec is None or sec <= 0:
            sec = min(CPU_DEFAULT_SECONDS, self.options.max_seconds)
        limits.check_window("profile", sec, self.options)
        with limits.window_slot("profile", self.options):
            data = await capture(sec, call.window, self.options)
        if data is None:
            raise ClientGone
        return await _respond(data, name, fmt, request)

    async def trace(self, request: Request, call: Call) -> Response:
        """Return an execution trace of ``seconds`` (float, default 1) as Trace Event JSON."""
        from . import tracing  # the trace is optional machinery: load it on first use

        # Go: a parse error (including ErrRange, e.g. 1e309) or sec <= 0 is the default.
        sec = parse_float(first(request.query_params, "seconds"))
        if sec is None or sec <= 0:
            sec = TRACE_DEFAULT_SECONDS
        if not math.isfinite(sec):
            sec = 0.0  # Go: NaN and Inf end as an immediate trace
        limits.check_window("trace", sec, self.options)
        with limits.window_slot("trace", self.options):
            body = await tracing.capture(sec, call.window, self.options)
        return _binary(body, "trace")

    async def named(self, request: Request, call: Call) -> Response:
        """Return ``/debug/pprof/<name>``: proto (debug=0), text (debug>=1), or a delta."""
        name = request.path_params["name"]
        prof = self.profiles.get(name)
        if prof is None:
            return serve_error(404, "Unknown profile")
        seconds = first(request.query_params, "seconds")
        if seconds != "":
            return await self._delta(request, call, prof, seconds)
        run_gc = atoi(first(request.query_params, "gc")) > 0 and name == "heap"
        if run_gc:
            await run_in_thread(gc.collect)
        fmt = _format_of(request)
        debug = atoi(first(request.query_params, "debug"))
        if debug != 0 and fmt is None:
            return _text(await prof.text(debug, gc=run_gc))
        if fmt is None:
            return _binary(await prof.encoded(gc=run_gc), name)
        data = await prof.collect(gc=run_gc)
        return await _respond(data, name, fmt, request)

    async def _delta(
        self, request: Request, call: Call, prof: NamedProfile, seconds: str
    ) -> Response:
        # Go's order: seconds value, profile type, debug.
        sec = parse_int10(seconds)
        if sec is None or sec <= 0:
            return serve_error(400, 'invalid value for "seconds" - must be a positive integer')
        if not prof.supports_delta:
            return serve_error(400, '"seconds" parameter is not supported for this profile type')
        limits.check_window("delta", sec, self.options)
        if atoi(first(request.query_params, "debug")) != 0:
            return serve_error(400, "seconds and debug params are incompatible")
        fmt = _format_of(request)
        with limits.window_slot("delta", self.options):
            data = await prof.delta(sec, call.window)
        if data is None:
            raise ClientGone
        return await _respond(data, f"{prof.name}-delta", fmt, request, compresslevel=6)


Capture = Callable[[float, Window, "Options"], Awaitable[ProfileData | None]]
"""A timed capture: ``cpu.profile`` or ``fgprof.profile``."""


def _format_of(request: Request) -> str | None:
    """Return the ``format=`` asked for (None: Go's profile.proto), checked up front.

    Raises ProfileError(400) for a format we do not render.
    """
    fmt = first(request.query_params, "format")
    if fmt in ("", "proto"):
        return None
    from . import views  # pyinstrument and the renderers: loaded on first use

    if fmt not in views.FORMATS:
        raise ProfileError(
            400, f"unknown format {fmt!r}: use proto, " + ", ".join(sorted(views.FORMATS))
        )
    return fmt


async def _respond(
    data: ProfileData, name: str, fmt: str | None, request: Request, compresslevel: int = 1
) -> Response:
    """Return ``data`` as Go's binary profile, or rendered in ``fmt`` (in a worker thread)."""
    if fmt is None:
        body = await run_in_thread(builder.encode, data, compresslevel)
        return _binary(body, name)
    from . import views

    raw_index = first(request.query_params, "sample_index")
    index = parse_int10(raw_index) if raw_index else None
    try:
        body, media = await run_in_thread(views.render, data, fmt, name, index)
    except ValueError as e:
        raise ProfileError(400, str(e)) from None
    return Response(body, media_type=media, headers=dict(_NOSNIFF))


def _argv() -> list[str]:
    """Return the real command line: the interpreter's ``sys.orig_argv`` when it has one."""
    return list(getattr(sys, "orig_argv", None) or sys.argv)


def _symbolize(raw: bytes) -> str:
    """Return the symbol handler's text for ``raw``, ``+``-separated addresses."""
    lines = ["num_symbols: 1\n"]
    for word in raw.decode("latin-1").split("+"):
        pc = _parse_uint0(word)
        if pc:
            name = symbols.lookup(pc)
            if name is not None:
                lines.append(f"{pc:#x} {name}\n")
    return "".join(lines)


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
