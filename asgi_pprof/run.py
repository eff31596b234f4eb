"""``python -m asgi_pprof run [--host H] [--port P] <script.py | -m module | command> [args...]``.

Runs an unmodified program with the background pprof server already started, the way
``ddtrace-run`` works: ``python -m asgi_pprof run uvicorn app:app --port 8000`` serves the
program's profiles on http://127.0.0.1:6060/debug/pprof/. The program runs in this
process, as ``python script.py`` / ``python -m module`` / the console script would run it
(same ``sys.argv``, ``__name__ == "__main__"``, exit status); ``import asgi_pprof`` has read
the ``ASGI_PPROF_*`` environment variables before it starts.
"""

from __future__ import annotations

import os
import runpy
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

__all__ = ["USAGE", "Target", "UsageError", "main", "parse", "resolve"]

USAGE = (
    "usage: python -m asgi_pprof run [--host H] [--port P] [--allow CIDR]... "
    "<script.py | -m module | command> [args...]"
)

TOKEN_ENV = "ASGI_PPROF_AUTH_TOKEN"
"""The environment variable holding ``auth_token`` for ``python -m asgi_pprof [run]`` (not the
command line: ``/cmdline`` and ``ps`` would show it)."""


@dataclass
class Target:
    """What ``run`` was asked to run: ``kind`` is "script", "module" or "command"."""

    kind: str
    name: str
    args: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 6060
    allow: list[str] = field(default_factory=list)


class UsageError(Exception):
    """A command line ``run`` cannot parse; the text says why."""


def parse(argv: list[str]) -> Target:
    """Return the target of ``run``'s ``argv``; ``UsageError`` with a sentence when it is bad.

    ``run``'s own options come before the program; everything after the program's name is
    the program's (``--port`` there is the program's, not ours).
    """
    host, port = "127.0.0.1", 6060
    allow: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        opt, eq, value = arg.partition("=")
        if opt in ("--host", "--port", "--allow"):
            if not eq:
                if i + 1 >= len(argv):
                    raise UsageError(f"{opt} needs a value")
                i += 1
                value = argv[i]
            if opt == "--host":
                host = value
            elif opt == "--allow":
                allow.append(value)
            else:
                if not value.isdigit() or not 0 <= int(value) <= 65535:
                    raise UsageError(f"--port must be a port number, not {value!r}")
                port = int(value)
            i += 1
            continue
        if arg == "-m":
            if i + 1 >= len(argv):
                raise UsageError("-m needs a module name")
            return Target("module", argv[i + 1], argv[i + 2 :], host, port, allow)
        if arg == "--":
            i += 1
            break
        if arg.startswith("-"):
            raise UsageError(f"unknown option {arg!r}")
        break
    if i >= len(argv):
        raise UsageError("no program to run")
    name, args = argv[i], argv[i + 1 :]
    kind = "script" if name.endswith(".py") or os.sep in name else "command"
    return Target(kind, name, args, host, port, allow)


def _console_script(name: str) -> Callable[[], Any] | None:
    """Return the entry point installed as console script ``name``, if there is one."""
    for ep in metadata.entry_points(group="console_scripts", name=name):
        loaded: Callable[[], Any] = ep.load()
        return loaded
    return None


def _is_python_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            first = f.readline(256)
    except OSError:
        return False
    return first.startswith(b"#!") and b"python" in first


def resolve(target: Target) -> Callable[[], None]:
    """Return a function that runs ``target`` in this process as Python would (its
    ``SystemExit`` passes through); ``UsageError`` when there is nothing to run."""
    if target.kind == "module":

        def run_module() -> None:
            # sys.path[0] is already the working directory, as for ``python -m``;
            # run_module puts the module's file in argv[0].
            sys.argv = [target.name, *target.args]
            runpy.run_module(target.name, run_name="__main__", alter_sys=True)

        return run_module
    path = target.name
    if target.kind == "command":
        entry = _console_script(target.name)
        if entry is not None:

            def run_entry() -> None:
                sys.argv = [target.name, *target.args]
                sys.exit(entry())

            return run_entry
        found = shutil.which(target.name)
        if found is None or not _is_python_file(found):
            what = "not found" if found is None else f"{found} is not a Python program"
            raise UsageError(
                f"{target.name!r}: {what}; run takes a Python script, -m module or an "
                "installed console script"
            )
        path = found
    if not os.path.isfile(path):
        raise UsageError(f"{path!r}: no such file")

    def run_script() -> None:
        sys.argv = [path, *target.args]
        sys.path[0] = os.path.dirname(os.path.abspath(path))  # as ``python script.py`` sets it
        runpy.run_path(path, run_name="__main__")

    return run_script


def exposure_options(allow: list[str]) -> dict[str, Any]:
    """Return the ``create_app`` options for ``--allow`` (added to loopback) and
    ``$ASGI_PPROF_AUTH_TOKEN``; ``ValueError``/``TypeError`` when they are bad."""
    from .exposure import LOOPBACK
    from .options import Options

    options: dict[str, Any] = {}
    if allow:
        options["allow"] = [*LOOPBACK, *allow]  # on the command line: beside loopback
    token = os.environ.get(TOKEN_ENV)
    if token:
        options["auth_token"] = token
    Options(**options)  # checked now: a bad --allow is a usage error
    return options


def main(argv: list[str]) -> None:
    """Start the background pprof server, then run the program ``argv`` names."""
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{USAGE}\n\n{__doc__}")
        return
    try:
        target = parse(argv)
        program = resolve(target)
    except UsageError as e:
        print(f"{USAGE}\nerror: {e}", file=sys.stderr)
        sys.exit(2)
    from .server import start_server  # after parsing: a usage error costs no uvicorn import

    try:
        options = exposure_options(target.allow)
    except (TypeError, ValueError) as e:
        print(f"{USAGE}\nerror: {e}", file=sys.stderr)
        sys.exit(2)
    srv = start_server(target.host, target.port, **options)
    if srv.running:
        print(f"asgi_pprof: serving {srv.url}", file=sys.stderr, flush=True)
    program()
