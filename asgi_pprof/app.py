"""``create_app(**options)``: the route table of one pprof app, and nothing else."""

from __future__ import annotations

import re
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp

from .endpoints import Endpoints
from .options import Options
from .registry import builtin_profiles

__all__ = ["create_app"]

_READ = frozenset({"GET", "HEAD"})
_SYMBOL = frozenset({"GET", "HEAD", "POST"})


class _AnyName(Route):
    """``/{name:path}`` whose name may hold any character, a newline too.

    Starlette's path convertor stops at a newline (its regex has no DOTALL), so
    ``/debug/pprof/a%0ab`` fell through to Starlette's own 404; Go's index handler answers
    every name under the prefix, unknown ones with its "Unknown profile" 404.
    """

    def __init__(self, path: str, endpoint: ASGIApp) -> None:
        super().__init__(path, endpoint)
        self.path_regex = re.compile(r"^/(?P<name>.*)$", re.DOTALL)


def create_app(**options: Any) -> Starlette:
    """Return a Starlette app serving Go's ``/debug/pprof/`` tree, ready to mount.

    Raises ``ValueError`` with a sentence for an unknown or invalid option.
    """
    known = Options.__dataclass_fields__
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r}; the options are: {', '.join(known)}")
    opts = Options(**options)
    profiles = [*builtin_profiles(opts), *opts.profiles]
    ep = Endpoints(opts, profiles)
    routes = [
        Route("/", ep.route(ep.index, _READ)),
        Route("/cmdline", ep.route(ep.cmdline, _READ)),
        Route("/profile", ep.route(ep.profile, _READ)),
        # POST too: go tool pprof's remote symbolization posts (current Go refuses it).
        Route("/symbol", ep.route(ep.symbol, _SYMBOL)),
        Route("/trace", ep.route(ep.trace, _READ)),
        _AnyName("/{name:path}", ep.route(ep.named, _READ)),
    ]
    app = Starlette(routes=routes)
    app.state.pprof_options = opts
    app.state.pprof_profiles = profiles
    return app
