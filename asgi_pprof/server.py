"""The standalone pprof server: uvicorn in the foreground, or in a daemon thread.

``start_server()`` is Go's ``go http.ListenAndServe(":6060", nil)``: any Python program,
web service or not, gets a pprof endpoint on 127.0.0.1:6060 in one line.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import threading
import time
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.responses import RedirectResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .app import PprofMount, create_app
from .concurrency import THREAD_PREFIX, end_windows

__all__ = ["PprofServer", "half_close_protocol", "make_root_app", "start_server"]

MOUNT = "/debug/pprof"

log = logging.getLogger("asgi_pprof")
_warned: set[tuple[str, int]] = set()
_serving: set[tuple[str, int]] = set()  # (host, port) of this process's running servers


def make_root_app(app: ASGIApp | None = None, mount: str = MOUNT) -> Starlette:
    """Return an app serving ``app`` (or a default pprof app) at ``mount`` (``/debug/pprof``).

    ``/`` redirects to the index, so a browser pointed at host:port finds it.
    """
    mount = "/" + mount.strip("/")

    async def root(request: Any) -> RedirectResponse:
        return RedirectResponse(mount + "/")

    pprof = app or create_app()
    return Starlette(
        routes=[
            Route("/", root),
            # Grafana Alloy's default fgprof path (profile.fgprof): the same endpoint.
            Route("/debug/fgprof", _Alias(pprof, "/fgprof")),
            PprofMount(mount, app=pprof),
        ]
    )


class _Alias:
    """An ASGI app serving ``path`` of ``app`` at another route (a class: Route passes it on)."""

    def __init__(self, app: ASGIApp, path: str) -> None:
        self.app = app
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app({**scope, "path": self.path, "root_path": ""}, receive, send)


def half_close_protocol() -> type[asyncio.Protocol]:
    """Return uvicorn's HTTP protocol (httptools when installed, else h11), made to answer a
    client that half-closed its side (``shutdown(SHUT_WR)``) after sending its request.

    uvicorn's own protocols let asyncio close the connection on the client's EOF
    (``eof_received`` returns None), so such a client never gets its response and the app
    sees ``http.disconnect``. This one keeps the connection open until the response is
    sent, then closes it (the client can send no further request).
    """
    base: type[Any]
    try:  # the module imports httptools, an optional uvicorn extra
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # pragma: no cover
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class HalfCloseProtocol(base):  # type: ignore[misc]
        def eof_received(self) -> bool | None:
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                cycle.keep_alive = False
                return True  # keep the transport open to write the response
            return None

    return HalfCloseProtocol


class _Server(uvicorn.Server):
    """uvicorn's server, remembering the loop it serves on (so :meth:`PprofServer.stop`
    can end that loop's capture windows at once)."""

    loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)


class PprofServer:
    """A running background pprof server; :meth:`stop` shuts it down and joins its thread.

    A handle made when the port was taken (``if_port_taken="warn"``) serves nothing:
    ``running`` is False and ``stop()`` does nothing.
    """

    def __init__(
        self,
        server: uvicorn.Server | None,
        thread: threading.Thread | None,
        *,
        host: str = "",
        port: int = 0,
        mount: str = MOUNT,
    ) -> None:
        self._server = server
        self._thread = thread
        self._host = host
        self._port = port
        self._mount = mount

    @property
    def host(self) -> str:
        """Return the address the server listens on (or was asked to)."""
        if self._server is None:
            return self._host
        return str(self._server.config.host)

    @property
    def port(self) -> int:
        """Return the port the server listens on (the real one when asked for port 0)."""
        if self._server is None:
            return self._port
        servers = getattr(self._server, "servers", None) or []
        for srv in servers:
            for sock in srv.sockets:
                return int(sock.getsockname()[1])
        return int(self._server.config.port)

    @property
    def url(self) -> str:
        """Return the base URL of the pprof index, e.g. ``http://127.0.0.1:6060/debug/pprof/``
        (the server's root with ``mount=None``)."""
        return f"http://{self.host}:{self.port}{self._mount}/"

    @property
    def running(self) -> bool:
        """Return True while the server thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and wait (up to ``timeout`` s) for the server thread to end.

        Open capture windows end at once: their clients get what was captured so far.
        """
        if self._server is None or self._thread is None:
            return
        loop = getattr(self._server, "loop", None)
        if loop is not None:
            end_windows(loop)
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> PprofServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bind(host: str, port: int) -> socket.socket:
    """Return a listening socket on ``host``:``port``; ``OSError`` when it cannot be bound."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind(address)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


def start_server(
    host: str = "127.0.0.1",
    port: int = 6060,
    *,
    app: ASGIApp | None = None,
    mount: str | None = MOUNT,
    if_port_taken: Literal["warn", "raise"] = "warn",
    log_level: str = "warning",
    **options: Any,
) -> PprofServer:
    """Serve pprof with uvicorn in a daemon thread of this process and return its handle.

    ``options`` go to :func:`create_app` (ignored when ``app`` is given). ``app`` is served
    at ``mount`` (``/debug/pprof``, ``/`` redirecting to it); ``mount=None`` serves ``app``
    (or a pprof app) at the root as it is (e.g. your own routes of
    :func:`~asgi_pprof.handler`). Binds 127.0.0.1 unless told otherwise.

    When the port is already taken (another worker of a multi-process server got it first,
    or another program) the default ``if_port_taken="warn"`` logs one warning and returns a
    handle that serves nothing (``running`` is False), as Go's
    ``go log.Println(http.ListenAndServe(...))``: the program goes on. ``"raise"`` raises
    ``OSError`` instead. Other bind errors always raise ``OSError``.
    """
    if if_port_taken not in ("warn", "raise"):
        raise ValueError(f"if_port_taken must be 'warn' or 'raise', not {if_port_taken!r}")
    prefix = "/" + mount.strip("/") if mount is not None else "/"
    prefix = "" if prefix == "/" else prefix
    try:
        sock = _bind(host, port)  # first: a worker that loses the port builds no app
    except OSError as e:
        if e.errno == errno.EADDRINUSE and if_port_taken == "warn":
            if (host, port) not in _warned:
                _warned.add((host, port))
                who = (
                    "this process already serves pprof there"
                    if (host, port) in _serving
                    else "another worker of this server, or another program"
                )
                log.warning(
                    "asgi_pprof: %s:%d is taken (%s): this call (pid %d) serves nothing",
                    host,
                    port,
                    who,
                    os.getpid(),
                )
            return PprofServer(None, None, host=host, port=port, mount=prefix)
        raise OSError(e.errno, f"asgi_pprof: could not serve on {host}:{port}: {e!r}") from e
    bound = (host, int(sock.getsockname()[1]))
    try:
        pprof = app or create_app(**options)
    except BaseException:
        sock.close()
        raise
    root: ASGIApp = pprof if prefix == "" else make_root_app(pprof, prefix)
    config = uvicorn.Config(
        root,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="off",
        http=half_close_protocol(),
    )
    server = _Server(config)
    errors: list[BaseException] = []

    def serve() -> None:
        _serving.add(bound)
        try:
            server.run(sockets=[sock])
        except BaseException as e:
            errors.append(e)
        finally:
            _serving.discard(bound)
            sock.close()

    thread = threading.Thread(target=serve, name=THREAD_PREFIX + "server", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            err = errors[0] if errors else None
            raise OSError(f"asgi_pprof: could not serve on {host}:{port}: {err!r}") from err
        time.sleep(0.005)
    return PprofServer(server, thread, mount=prefix)
