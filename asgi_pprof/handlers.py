"""Go's registration API: ``handler(name)``, one profile's ASGI app, mountable on any path.

Go registers ``pprof.Index``, ``pprof.Profile``, ``pprof.Handler("heap")`` ... one by one
on any mux; this is the same for any ASGI router::

    from starlette.routing import Mount, Route
    from asgi_pprof import handler

    routes = [
        Route("/custom/heap", handler("heap")),  # mux.Handle("/custom/heap", pprof.Handler("heap"))
        Route("/custom/cpu", handler("profile")),  # mux.HandleFunc("/custom/cpu", pprof.Profile)
        Mount("/custom/pprof", handler("")),  # pprof.Index: the index and the named profiles
    ]
"""

from __future__ import annotations

import functools
from typing import Any

from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from .app import _READ, _SYMBOL, _GoRoute, make_endpoints
from .endpoints import Endpoints

__all__ = ["handler"]

PSEUDO = ("cmdline", "profile", "symbol", "trace")
"""The handlers that are not named profiles (Go's ``Cmdline``, ``Profile``, ...)."""


class _Named:
    """One named profile at whatever path it is routed to (Go's ``Handler(name)``)."""

    def __init__(self, app: ASGIApp, name: str) -> None:
        self.app = app
        self.name = name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = {**scope.get("path_params", {}), "name": self.name}
        await self.app({**scope, "path_params": params}, receive, send)


@functools.cache
def _shared() -> Endpoints:
    # Handlers made without options share one set of profiles (and their state), as Go's
    # handlers share the runtime's.
    return make_endpoints({})


def handler(name: str, **options: Any) -> ASGIApp:
    """Return an ASGI app serving ``name`` with Go's contract, wherever it is mounted.

    ``name`` is a named profile (``goroutine``, ``heap``, ``allocs``, ``threadcreate``,
    ``block``, ``mutex``, or one of ``options["profiles"]``), one of ``profile``, ``trace``,
    ``cmdline``, ``symbol``, or ``""`` for the index: a subtree (mount it) that serves the
    index page at its root and every named profile below it, as Go's ``pprof.Index``.
    The single handlers answer at any path: route them to an exact path.
    ``options`` are :func:`~asgi_pprof.create_app`'s; handlers made without options share
    one set of profiles. Raises ``ValueError`` for a name it does not serve.
    """
    if not isinstance(name, str):
        raise TypeError(f"handler name must be a string, not {type(name).__name__}")
    ep = make_endpoints(options) if options else _shared()
    if name == "":
        return Starlette(
            routes=[
                _GoRoute("/", ep.route(ep.index, _READ)),
                _GoRoute("/{name:path}", ep.route(ep.named, _READ)),
            ]
        )
    if name in PSEUDO:
        methods = _SYMBOL if name == "symbol" else _READ
        return ep.route(getattr(ep, name), methods)
    if name in ep.profiles:
        return _Named(ep.route(ep.named, _READ), name)
    served = ", ".join(sorted([*ep.profiles, *PSEUDO]))
    raise ValueError(f"no profile named {name!r}; handler serves {served}, or '' for the index")
