"""Who may read the profiles: loopback clients by default, ``allow`` and ``auth_token`` widen it.

Profiles expose stacks, file paths, task names and the command line. Like Django's
``INTERNAL_IPS`` and Spring Boot Actuator, the default answers only clients whose address
(ASGI's ``scope["client"]``, which uvicorn's ``--proxy-headers`` and
``--forwarded-allow-ips`` set from ``X-Forwarded-For``) is a loopback address.
"""

from __future__ import annotations

import base64
import hmac
import inspect
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from starlette.requests import Request

    from .options import Options

__all__ = ["LOOPBACK", "AllowRule", "Exposure", "Refusal", "check_allow"]

log = logging.getLogger("asgi_pprof")

AllowRule = Union[str, "Callable[[Request], bool | Awaitable[bool]]"]
"""One ``allow`` entry: a CIDR string (``"10.0.0.0/8"``, ``"::1"``) or a callable of the request."""

LOOPBACK: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
"""The default ``allow``: IPv4 and IPv6 loopback."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def check_allow(allow: object) -> tuple[list[Network], list[Callable[[Request], object]]]:
    """Return ``allow`` split into networks and callables; ``TypeError``/``ValueError`` if bad."""
    if isinstance(allow, str | bytes) or not isinstance(allow, Sequence):
        raise TypeError(
            f"allow must be a list of CIDR strings and/or callables, not {type(allow).__name__}"
        )
    nets: list[Network] = []
    calls: list[Callable[[Request], object]] = []
    for rule in allow:
        if isinstance(rule, str):
            try:
                nets.append(ipaddress.ip_network(rule, strict=False))
            except ValueError:
                raise ValueError(
                    f"allow entry {rule!r} is not an IP address or CIDR network"
                ) from None
        elif callable(rule):
            calls.append(rule)
        else:
            raise TypeError(
                f"allow entries are CIDR strings or callables of the request, "
                f"not {type(rule).__name__}"
            )
    return nets, calls


class Refusal(Exception):
    """A request that may not read profiles: its status, Go-shaped text and extra headers."""

    def __init__(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = headers or {}


class Exposure:
    """The access check of one pprof app, built once from its options."""

    def __init__(self, options: Options) -> None:
        self.nets, self.calls = check_allow(options.allow)
        self.who = (
            "loopback clients only"
            if tuple(options.allow) == LOOPBACK
            else "the clients of create_app(allow=...) only"
        )
        token = options.auth_token
        self.token = token.encode() if token is not None else None

    async def check(self, request: Request) -> None:
        """Return when ``request`` may read profiles; raise :class:`Refusal` otherwise."""
        if self.token is not None and self._credentials_ok(request, self.token):
            return
        host = request.client.host if request.client else None
        if host is not None and self._address_allowed(host):
            return
        for rule in self.calls:
            try:
                verdict = rule(request)
                if inspect.isawaitable(verdict):
                    verdict = await verdict
            except Exception:
                log.exception("asgi_pprof: an allow callable failed; refusing the request")
                continue
            if verdict is True:
                return
        who = host if host is not None else "an unknown address"
        text = (
            f"forbidden: the pprof endpoints answer {self.who}, not {who}; "
            "allow others with create_app(allow=['10.0.0.0/8', ...]) (CIDR strings, or a "
            "callable of the request returning True)"
        )
        if self.token is None:
            raise Refusal(403, text)
        # With a token, 401 and a Basic challenge: a browser asks for it.
        text += ", or send the token (Authorization: Bearer <token>, or as a Basic password)"
        raise Refusal(401, text, {"WWW-Authenticate": 'Basic realm="asgi_pprof"'})

    def _address_allowed(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])  # a zone id ("fe80::1%eth0")
        except ValueError:
            return False  # "testclient", a unix socket path: not an address we can vouch for
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            mapped = ip.ipv4_mapped  # a dual-stack socket reports "::ffff:127.0.0.1"
            if any(mapped in n for n in self.nets):
                return True
        return any(ip in n for n in self.nets)

    def _credentials_ok(self, request: Request, token: bytes) -> bool:
        value = request.headers.get("authorization", "")
        scheme, _, rest = value.partition(" ")
        scheme = scheme.lower()
        rest = rest.strip()
        if scheme == "bearer":
            given = rest.encode()
        elif scheme == "basic":
            try:
                decoded = base64.b64decode(rest, validate=True)
            except ValueError:
                return False
            given = decoded.partition(b":")[2]  # any user name; the password is the token
        else:
            return False
        return hmac.compare_digest(given, token)
