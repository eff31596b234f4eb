"""``create_app(**options)``: the route table of one pprof app, and nothing else."""

from __future__ import annotations

import re
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

from . import workers
from .endpoints import Endpoints
from .options import Options
from .registry import builtin_profiles

__all__ = ["PprofMount", "create_app", "make_endpoints"]

_READ = frozenset({"GET", "HEAD"})
_SYMBOL = frozenset({"GET", "HEAD", "POST"})


class _GoRoute(Route):
    """A ``Route`` that matches paths as Go's mux does, newlines included.

    Starlette's regexes end in ``$`` (which also matches before a final newline, so
    ``/cmdline%0a`` was the cmdline) and its path convertor stops at a newline (so
    ``/a%0ab`` fell through to Starlette's own 404). Go answers every other name under the
    prefix with its "Unknown profile" 404.
    """

    def __init__(self, path: str, endpoint: ASGIApp) -> None:
        super().__init__(path, endpoint)
        pattern = self.path_regex.pattern
        if pattern.endswith("$"):
            pattern = pattern[:-1] + r"\Z"
        self.path_regex = re.compile(pattern, re.DOTALL)


class PprofMount(Mount):
    """Starlette's ``Mount`` that also passes paths holding a newline (``%0a``) to the app.

    Starlette's own ``Mount`` does not match them (its regex has no DOTALL), so the
    parent app answers its own 404; with this one the pprof app answers Go's.
    """

    def __init__(self, path: str, app: ASGIApp, name: str | None = None) -> None:
        super().__init__(path, app=app, name=name)
        pattern = self.path_regex.pattern
        if pattern.endswith("$"):
            pattern = pattern[:-1] + r"\Z"
        self.path_regex = re.compile(pattern, re.DOTALL)


def make_endpoints(options: dict[str, Any]) -> Endpoints:
    """Return the endpoints of one pprof app made with ``options`` (checked here).

    Raises ``ValueError`` with a sentence for an unknown or invalid option.
    """
    known = Options.__dataclass_fields__
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r}; the options are: {', '.join(known)}")
    opts = Options(**options)
    return Endpoints(opts, [*builtin_profiles(opts), *opts.profiles])


def create_app(**options: Any) -> Starlette:
    """Return a Starlette app serving Go's ``/debug/pprof/`` tree, ready to mount.

    Raises ``ValueError`` with a sentence for an unknown or invalid option.
    """
    ep = make_endpoints(options)
    routes = [
        _GoRoute("/", ep.route(ep.index, _READ)),
        _GoRoute("/cmdline", ep.route(ep.cmdline, _READ)),
        _GoRoute("/profile", ep.route(ep.profile, _READ, fanout=True)),
        _GoRoute("/fgprof", ep.route(ep.fgprof, _READ, fanout=True)),
        # POST too: go tool pprof's remote symbolization posts (current Go refuses it).
        _GoRoute("/symbol", ep.route(ep.symbol, _SYMBOL)),
        _GoRoute("/trace", ep.route(ep.trace, _READ)),
        _GoRoute("/{name:path}", ep.route(ep.named, _READ, fanout=True)),
    ]
    app = Starlette(routes=routes)
    workers.register(app)  # a worker of a multi-process server answers its siblings
    app.state.pprof_options = ep.options
    app.state.pprof_profiles = list(ep.profiles.values())
    return app
