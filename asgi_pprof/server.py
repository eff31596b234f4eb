"""The standalone pprof server: uvicorn in the foreground, or in a daemon thread.

``start_server()`` is Go's ``go http.ListenAndServe(":6060", nil)``: any Python program,
web service or not, gets a pprof endpoint on 127.0.0.1:6060 in one line.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.responses import RedirectResponse
from starlette.routing import Route

from .app import PprofMount, create_app
from .concurrency import THREAD_PREFIX, end_windows

__all__ = ["PprofServer", "half_close_protocol", "make_root_app", "start_server"]

MOUNT = "/debug/pprof"


def make_root_app(app: Starlette | None = None) -> Starlette:
    """Return an app serving ``app`` (or a default pprof app) at ``/debug/pprof``.

    ``/`` redirects to the index, so a browser pointed at host:port finds it.
    """

    async def root(request: Any) -> RedirectResponse:
        return RedirectResponse(MOUNT + "/")

    return Starlette(routes=[Route("/", root), PprofMount(MOUNT, app=app or create_app())])


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
    """A running background pprof server; :meth:`stop` shuts it down and joins its thread."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def host(self) -> str:
        """Return the address the server listens on."""
        return str(self._server.config.host)

    @property
    def port(self) -> int:
        """Return the port the server listens on (the real one when asked for port 0)."""
        servers = getattr(self._server, "servers", None) or []
        for srv in servers:
            for sock in srv.sockets:
                return int(sock.getsockname()[1])
        return int(self._server.config.port)

    @property
    def url(self) -> str:
        """Return the base URL of the pprof index, e.g. ``http://127.0.0.1:6060/debug/pprof/``."""
        return f"http://{self.host}:{self.port}{MOUNT}/"

    @property
    def running(self) -> bool:
        """Return True while the server thread is alive."""
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and wait (up to ``timeout`` s) for the server thread to end.

        Open capture windows end at once: their clients get what was captured so far.
        """
        loop = getattr(self._server, "loop", None)
        if loop is not None:
            end_windows(loop)
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> PprofServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    host: str = "127.0.0.1",
    port: int = 6060,
    *,
    app: Starlette | None = None,
    log_level: str = "warning",
    **options: Any,
) -> PprofServer:
    """Serve pprof with uvicorn in a daemon thread of this process and return its handle.

    ``options`` go to :func:`create_app` (ignored when ``app`` is given). Binds 127.0.0.1
    unless told otherwise. Raises ``OSError`` when the port cannot be bound.
    """
    root = make_root_app(app or create_app(**options))
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
        try:
            server.run()
        except BaseException as e:  # SystemExit from a failed bind, too
            errors.append(e)

    thread = threading.Thread(target=serve, name=THREAD_PREFIX + "server", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            err = errors[0] if errors else None
            raise OSError(f"asgi_pprof: could not serve on {host}:{port}: {err!r}") from err
        time.sleep(0.005)
    return PprofServer(server, thread)
