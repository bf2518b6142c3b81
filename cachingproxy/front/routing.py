"""Classifying a request (SPEC 2): forward, transparent, self-addressed, CONNECT."""

from __future__ import annotations

import ipaddress
import re
from enum import Enum

from attrs import frozen

from cachingproxy.cache.policy import BadURL, normalize_url

_HOSTPORT_RE = re.compile(
    r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?)"
    r"(?::(?P<port>[0-9]{1,5}))?$"
)


class BadRequest(Exception):
    """The request cannot be routed; the message says why (400)."""


class RouteKind(Enum):
    """How a request is served (SPEC 2)."""

    CONNECT = "connect"
    FORWARD = "forward"
    TRANSPARENT = "transparent"
    SELF = "self"


@frozen
class Route:
    kind: RouteKind
    url: str = ""
    """Normalised absolute URL for FORWARD and TRANSPARENT."""
    path: str = ""
    """Origin-form path (with query) for SELF."""


@frozen
class Listener:
    """Where a connection arrived and what names mean "this proxy"."""

    local_host: str
    local_port: int
    names: frozenset[str]


def split_host(value: str, default_port: int) -> tuple[str, int]:
    """``host[:port]`` (IPv6 in brackets) → (lower-case host, port)."""
    m = _HOSTPORT_RE.match(value.strip())
    if not m:
        raise BadRequest(f"bad host {value!r}")
    host = m.group("host").lower().rstrip(".")
    port = int(m.group("port")) if m.group("port") else default_port
    if not 0 < port < 65536:
        raise BadRequest(f"bad port in {value!r}")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise BadRequest(f"bad IPv6 address in {value!r}") from None
    return host, port


def is_self(host: str, port: int, listener: Listener) -> bool:
    """Whether ``host:port`` addresses this proxy (a --name or its address)."""
    if port != listener.local_port:
        return False
    bare = host.strip("[]")
    if bare in listener.names:
        return True
    try:
        return ipaddress.ip_address(bare) == ipaddress.ip_address(listener.local_host)
    except ValueError:
        return False


def classify(
    method: str,
    target: str,
    host_header: str | None,
    listener: Listener,
    original_destination: tuple[str, int] | None = None,
) -> Route:
    """Route one request.

    @raise BadRequest: malformed target or Host, an absolute-form target
        whose Host header names another host or port, or no way to tell the
        origin.
    """
    if method == "CONNECT":
        return Route(RouteKind.CONNECT, url=target)
    lower = target[:8].lower()
    if lower.startswith(("http://", "https://")):
        try:
            url = normalize_url(target)
        except BadURL as e:
            raise BadRequest(str(e)) from None
        authority = url.split("/", 3)[2]
        default = 443 if url.startswith("https:") else 80
        host, port = split_host(authority, default)
        if host_header is not None and split_host(host_header, default) != (
            host,
            port,
        ):
            # Two servers could each believe another target (SPEC 8).
            raise BadRequest("the Host header names another host than the URL")
        if url.startswith("http:") and is_self(host, port, listener):
            return Route(RouteKind.SELF, path="/" + url.split("/", 3)[3])
        return Route(RouteKind.FORWARD, url=url)
    if not target.startswith("/"):
        raise BadRequest(f"bad request target {target[:100]!r}")
    if host_header is None or not host_header.strip():
        if original_destination is None:
            raise BadRequest("no Host header and no original destination")
        address, port = original_destination
        if ":" in address:
            address = f"[{address}]"
        host_header = f"{address}:{port}"
    host, port = split_host(host_header, 80)
    # A redirected connection (original destination elsewhere) is
    # interception even when its Host happens to name the proxy.
    redirected = original_destination is not None and not is_self(
        original_destination[0], original_destination[1], listener
    )
    if not redirected and is_self(host, port, listener):
        return Route(RouteKind.SELF, path=target)
    netloc = host if port == 80 else f"{host}:{port}"
    try:
        url = normalize_url(f"http://{netloc}{target}")
    except BadURL as e:
        raise BadRequest(str(e)) from None
    return Route(RouteKind.TRANSPARENT, url=url)


__all__ = [
    "BadRequest",
    "Listener",
    "Route",
    "RouteKind",
    "classify",
    "is_self",
    "split_host",
]
