"""``python -m asgi_pprof [--host H] [--port P]``: serve pprof in the foreground."""

from __future__ import annotations

import argparse

import uvicorn

from .server import half_close_protocol, make_root_app


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m asgi_pprof", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=6060, help="port to bind (6060)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    uvicorn.run(
        make_root_app(),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        http=half_close_protocol(),
    )


if __name__ == "__main__":
    main()
