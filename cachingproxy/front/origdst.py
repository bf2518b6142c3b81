"""The original destination of a redirected (DNATed) connection, on Linux.

A router that redirects clients' port-80 traffic to the proxy rewrites the
destination; ``SO_ORIGINAL_DST`` (netfilter) tells where the client meant to
go.  Elsewhere, or for a connection that was not redirected, there is no
answer and routing relies on the Host header alone.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import Any

SO_ORIGINAL_DST = 80
"""From <linux/netfilter_ipv4.h>; IP6T_SO_ORIGINAL_DST has the same value."""

_UNKNOWN = object()


def _query(sock: socket.socket) -> tuple[str, int] | None:
    try:
        if sock.family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port = struct.unpack("!H", raw[2:4])[0]
            return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
            port = struct.unpack("!H", raw[2:4])[0]
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    except (OSError, ValueError):
        return None
    return None


def original_destination(transport: Any) -> tuple[str, int] | None:
    """``(address, port)`` the client connected to before a redirect, if it
    was redirected; None when it addressed the proxy directly or the
    platform cannot tell.  Cached on the transport (one syscall per
    connection)."""
    cached = getattr(transport, "_cachingproxy_original_dst", _UNKNOWN)
    if cached is not _UNKNOWN:
        return cached  # type: ignore[return-value]
    result = None
    get_handle = getattr(transport, "getHandle", None)
    sock = get_handle() if get_handle is not None else None
    if isinstance(sock, socket.socket):
        found = _query(sock)
        if found is not None:
            local = sock.getsockname()
            if (found[0], found[1]) != (local[0], local[1]):
                result = found
    with contextlib.suppress(AttributeError):
        transport._cachingproxy_original_dst = result
    return result


__all__ = ["SO_ORIGINAL_DST", "original_destination"]
