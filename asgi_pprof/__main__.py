"""``python -m asgi_pprof [--host H] [--port P]``: serve pprof in the foreground.

``python -m asgi_pprof run [--host H] [--port P] <script.py | -m module | command> [args...]``
runs a program with the pprof server in the background (see :mod:`asgi_pprof.run`).
"""

from __future__ import annotations

import argparse
import sys

import uvicorn

from .app import create_app
from .run import exposure_options
from .server import half_close_protocol, make_root_app


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve until interrupted (or run a program: ``run``)."""
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["run"]:
        from .run import main as run_main

        run_main(args_in[1:])
        return
    parser = argparse.ArgumentParser(
        prog="python -m asgi_pprof",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=6060, help="port to bind (6060)")
    parser.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="CIDR",
        help="also answer these clients (repeatable; loopback only by default; a token: "
        "$ASGI_PPROF_AUTH_TOKEN)",
    )
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(args_in)
    try:
        options = exposure_options(args.allow)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    uvicorn.run(
        make_root_app(create_app(**options)),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        http=half_close_protocol(),
    )


if __name__ == "__main__":
    main()
