"""Several workers behind one port: each worker answers its siblings on a Unix socket, and the
worker a request reaches merges their profiles into its answer.

Who is a sibling: the workers of one server share its *listening socket* (uvicorn's supervisor
and gunicorn's arbiter bind it and keep it while their workers use it), so a process whose
listening socket is also held by its parent is a worker, and the socket's inode names the group.
Two servers started from one shell share a parent but not a socket: never one group. A process
that is not such a worker (a single-process server, a test, a script) registers nothing: no
thread, no file, and each request costs one dictionary look-up.

Each registered worker serves its pprof app on ``<tmp>/asgi_pprof-<uid>/<ppid>-<inode>/<pid>.sock``
(the directory is 0700: same user only) from a thread ``asgi_pprof-peer``. Linux only (it reads
``/proc``); elsewhere every worker answers for itself.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import socket
import stat
import sys
import tempfile
import threading
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .concurrency import THREAD_PREFIX, run_in_thread
from .model import ProfileData, Sample, labels_of

__all__ = ["PEER_KEY", "WORKER_PARAM", "fan_out", "group_active", "register"]

log = logging.getLogger("asgi_pprof")

PEER_KEY = "asgi_pprof.peer"
"""Set in the scope of a request a sibling sent: it is answered for this worker only."""

WORKER_PARAM = "worker"
"""``?worker=<pid>`` asks one worker only (``self``: the one that answers)."""

GRACE_SECONDS = 5.0
"""How long past its window a sibling may take to answer before it is left out."""

_lock = threading.Lock()
_group: Path | None = None  # this process's group directory once registered
_apps: list[weakref.ref[Any]] = []  # apps made before a fork: registered in the child


def _listening_inodes() -> list[int]:
    """Return the inodes of this process's server sockets (Linux), [] elsewhere."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return []
    out: list[int] = []
    for name in fds:
        fd = int(name)
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if not stat.S_ISSOCK(st.st_mode):
            continue
        try:
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        with s, contextlib.suppress(OSError):
            if _server_socket(s):
                out.append(st.st_ino)
    return out


def _server_socket(s: socket.socket) -> bool:
    """Return True for a bound, unconnected stream socket with an address (a server's).

    Not "listening": uvicorn's supervisor binds it and each worker's asyncio calls
    ``listen()``, so the first worker to import the app sees it bound only.
    """
    if s.type != socket.SOCK_STREAM:
        return False
    name = s.getsockname()
    if s.family in (socket.AF_INET, socket.AF_INET6):
        if not name[1]:
            return False
    elif s.family != socket.AF_UNIX or not name:
        return False  # a socketpair (multiprocessing's pipes) has no name
    try:
        s.getpeername()
    except OSError:
        return True
    return False


def _parent_holds(inodes: list[int]) -> int | None:
    """Return the first of ``inodes`` that the parent process also holds, else None."""
    ppid = os.getppid()
    if ppid <= 1:
        return None
    wanted = {f"socket:[{i}]": i for i in inodes}
    try:
        names = os.listdir(f"/proc/{ppid}/fd")
    except OSError:
        return None
    for name in names:
        with contextlib.suppress(OSError):
            hit = wanted.get(os.readlink(f"/proc/{ppid}/fd/{name}"))
            if hit is not None:
                return hit
    return None


def _group_dir(inode: int) -> Path:
    base = Path(tempfile.gettempdir()) / f"asgi_pprof-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    st = base.stat()
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise OSError(f"{base} is not this user's private directory")
    _prune_dead_groups(base)
    group = base / f"{os.getppid()}-{inode}"
    group.mkdir(mode=0o700, exist_ok=True)
    return group


def _prune_dead_groups(base: Path) -> None:
    """Remove the directories of groups whose server is gone.

    A worker its server kills (gunicorn's timeout, a crash) cannot remove its socket file,
    nor its group's directory: without this they pile up in the temporary directory for
    as long as the machine runs. A group whose parent pid is alive (or reused) is kept.
    """
    for group in base.iterdir():
        try:
            parent = int(group.name.split("-", 1)[0])
            os.kill(parent, 0)
            continue
        except ProcessLookupError:
            pass
        except (ValueError, OSError):  # not ours, or another user's process: leave it
            continue
        with contextlib.suppress(OSError):
            for p in group.glob("*.sock"):
                p.unlink()
            group.rmdir()


class _PeerApp:
    """The pprof app as a sibling sees it: same user (the socket's directory is 0700)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await self.app({**scope, "client": ("127.0.0.1", 0), PEER_KEY: True}, receive, send)


def _serve_peer(app: ASGIApp, path: Path) -> None:
    import uvicorn

    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    config = uvicorn.Config(_PeerApp(app), uds=str(path), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)

    def run() -> None:
        try:
            server.run()
        except BaseException:  # a peer that cannot serve: this worker answers for itself
            log.exception("asgi_pprof: the sibling socket %s stopped", path)

    threading.Thread(target=run, name=THREAD_PREFIX + "peer", daemon=True).start()


def register(app: ASGIApp) -> None:
    """Serve ``app`` to this worker's siblings when this process is a worker of a
    multi-process server (now, or after a fork); otherwise do nothing."""
    global _group
    if not sys.platform.startswith("linux"):
        return
    with _lock:
        if not _apps:
            os.register_at_fork(after_in_child=_after_fork)
        _apps.append(weakref.ref(app))
        if _group is not None:
            return
        inode = _parent_holds(_listening_inodes())
        if inode is None:
            return
        try:
            group = _group_dir(inode)
        except OSError as e:
            log.warning("asgi_pprof: no sibling socket (%s): this worker answers for itself", e)
            return
        path = group / f"{os.getpid()}.sock"
        _serve_peer(app, path)
        atexit.register(_unlink, path, os.getpid())
        _group = group


def _unlink(path: Path, pid: int) -> None:
    if os.getpid() == pid:  # not in a child forked later (it inherits the atexit list)
        with contextlib.suppress(OSError):
            path.unlink()


def _after_fork() -> None:
    global _group
    _group = None  # the parent's peer thread did not survive the fork
    apps = [a for a in (r() for r in _apps) if a is not None]
    _apps.clear()
    for app in apps[:1]:  # one peer per process: the first app made
        register(app)


def group_active() -> bool:
    """Return True when this process is a registered worker (fan-out applies)."""
    return _group is not None


def siblings() -> dict[int, Path]:
    """Return the live siblings' sockets by pid (stale ones removed)."""
    group = _group
    if group is None:
        return {}
    out: dict[int, Path] = {}
    me = os.getpid()
    for p in group.glob("*.sock"):
        try:
            pid = int(p.stem)
        except ValueError:
            continue
        if pid == me:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                p.unlink()
            continue
        except PermissionError:
            continue
        out[pid] = p
    return out


# --- asking siblings ---------------------------------------------------------------------


class _Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


async def _ask(path: Path, target: str, timeout: float) -> _Answer:
    """Return a sibling's answer to ``GET target``; raise on failure or after ``timeout``."""

    async def go() -> _Answer:
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            writer.write(
                f"GET {target} HTTP/1.1\r\nHost: peer\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if "chunked" in headers.get("transfer-encoding", ""):
            body = _dechunk(body)
        return _Answer(status, headers, body)

    return await asyncio.wait_for(go(), timeout)


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


def _with_pid(data: ProfileData, pid: int) -> ProfileData:
    samples = [
        Sample(s.stack, s.values, labels_of([*s.labels, ("pid", str(pid))]), s.num_labels)
        for s in data.samples
    ]
    data.samples = samples
    return data


def _merge(own: bytes, own_pid: int, others: dict[int, bytes], notes: list[str]) -> bytes:
    from . import builder

    merged = _with_pid(builder.decode(own), own_pid)
    for pid, body in others.items():
        try:
            data = builder.decode(body)
        except Exception:
            notes.append(f"worker {pid} sent a body that is not a profile: left out")
            continue
        if data.sample_types != merged.sample_types or data.period_type != merged.period_type:
            notes.append(f"worker {pid} sent other sample types: left out")
            continue
        merged.samples += _with_pid(data, pid).samples
        merged.duration_nanos = max(merged.duration_nanos, data.duration_nanos)
        if data.time_nanos:
            merged.time_nanos = min(merged.time_nanos or data.time_nanos, data.time_nanos)
    out = merged.merged()
    out.comments += [f"asgi_pprof: {n}" for n in notes]
    return builder.encode(out)


def _route_target(request: Request) -> str:
    """Return the request's path below the pprof app's mount, with its query."""
    path = str(request.scope.get("path", "/"))
    root = str(request.scope.get("root_path", ""))
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    qs = bytes(request.scope.get("query_string", b"")).decode("latin-1")
    return quote(path, safe="/%:@!$&'()*+,;=-._~") + ("?" + qs if qs else "")


def _window(request: Request) -> float:
    raw = request.query_params.get("seconds", "")
    try:
        sec = float(raw)
    except ValueError:
        sec = 0.0
    if not sec > 0 or sec != sec:
        sec = 30.0 if request.url.path.endswith("/profile") else 0.0
    return min(sec, 24 * 3600.0)


async def fan_out(
    request: Request, own: Callable[[], Awaitable[Response | None]]
) -> Response | None:
    """Return ``own()``'s response merged with every sibling's answer to the same request.

    profile.proto bodies are merged (samples labelled ``pid``); text bodies are put one
    after the other under a ``# worker pid N`` line; errors and other bodies are this
    worker's. ``?worker=<pid>`` answers from that worker only.
    """
    me = os.getpid()
    peers = siblings()
    target = _route_target(request)
    wanted = request.query_params.get(WORKER_PARAM, "")
    if wanted:
        if wanted in ("self", str(me)):
            return await own()
        path = peers.get(int(wanted)) if wanted.isdigit() else None
        if path is None:
            from .endpoints import serve_error

            known = ", ".join(str(p) for p in sorted([me, *peers]))
            return serve_error(404, f"no worker {wanted} in this server (workers: {known})")
        timeout = _window(request) + GRACE_SECONDS
        try:
            ans = await _ask(path, target, timeout)
        except Exception as e:
            from .endpoints import serve_error

            return serve_error(504, f"worker {wanted} did not answer: {e!r}")
        return Response(ans.body, status_code=ans.status, headers=_keep(ans.headers))
    if not peers:
        return await own()
    if request.query_params.get("format", "proto") not in ("", "proto"):
        # A rendered page (format=html, speedscope, folded) is this worker's only: merging
        # needs the peers' proto, rendered once merged, which is not built yet. Said so.
        response = await own()
        if response is not None:
            response.headers["x-asgi-pprof-workers"] = f"1/{len(peers) + 1} (format= renders one)"
        return response
    timeout = _window(request) + GRACE_SECONDS
    tasks = {pid: asyncio.ensure_future(_ask(p, target, timeout)) for pid, p in peers.items()}
    response = await own()
    if response is None:
        for t in tasks.values():
            t.cancel()
        return None
    answers: dict[int, _Answer] = {}
    notes: list[str] = []
    for pid, t in tasks.items():
        try:
            answers[pid] = await t
        except Exception as e:
            notes.append(f"worker {pid} did not answer in {timeout:g} s ({type(e).__name__})")
    if response.status_code != 200:
        return response
    ctype = response.headers.get("content-type", "")
    ok = {pid: a for pid, a in answers.items() if a.status == 200}
    for pid, a in answers.items():
        if a.status != 200:
            notes.append(f"worker {pid} answered {a.status}: left out")
    if ctype.startswith("application/octet-stream") and "trace" not in response.headers.get(
        "content-disposition", ""
    ):
        bodies = {p: a.body for p, a in ok.items()}
        body = await run_in_thread(_merge, bytes(response.body), me, bodies, notes)
    elif ctype.startswith("text/plain"):
        from .endpoints import PiecesResponse

        # Sections one after the other, never joined (a big heap text is sent in pieces).
        mine: list[bytes] = getattr(response, "pieces", None) or [bytes(response.body)]
        sections = [[f"# worker pid {me}\n".encode(), *mine]]
        sections += [[f"# worker pid {p}\n".encode(), a.body] for p, a in ok.items()]
        sections += [[f"# {n}\n".encode()] for n in notes]
        pieces = [piece for i, sec in enumerate(sections) for piece in ([b"\n"] if i else []) + sec]
        headers = _keep(dict(response.headers))
        headers["x-asgi-pprof-workers"] = f"{len(ok) + 1}/{len(peers) + 1}"
        return PiecesResponse(pieces, media_type=ctype, headers=headers)
    else:
        return response
    headers = _keep(dict(response.headers))
    headers["x-asgi-pprof-workers"] = f"{len(ok) + 1}/{len(peers) + 1}"
    return Response(body, status_code=200, headers=headers)


def _keep(headers: dict[str, str]) -> dict[str, str]:
    drop = {"content-length", "transfer-encoding", "connection", "date", "server"}
    return {k: v for k, v in headers.items() if k.lower() not in drop}
