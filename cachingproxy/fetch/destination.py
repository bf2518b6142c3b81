"""Which upstream addresses and ports may be reached (SPEC 8): the policy
checked on every resolved address before connecting, IPv4 embedded in IPv6
addresses included."""

from __future__ import annotations

import ipaddress

import attrs
from attrs import frozen

from cachingproxy.config import Network

_NAT64 = (
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("64:ff9b:1::/48"),
)
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to (SPEC 8): IPv4-mapped
    ``::ffff:a.b.c.d``, IPv4-compatible ``::a.b.c.d``, NAT64 (the well-known
    ``64:ff9b::/96`` and the local-use ``64:ff9b:1::/48``, last 32 bits),
    6to4 ``2002::/16`` and Teredo ``2001::/32`` (server and client)."""
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    if any(ip in net for net in _NAT64) or (
        ip in _IPV4_COMPATIBLE and int(ip) > 1  # not :: or ::1
    ):
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    return []


@frozen
class DestinationPolicy:
    """Which upstream addresses and ports may be reached (SPEC 8)."""

    allow_upstream: tuple[Network, ...] = ()
    upstream_ports: frozenset[int] = frozenset({80, 443})
    own_addresses: frozenset[str] = frozenset()
    own_listeners: set[tuple[str, int]] = attrs.field(factory=set)
    """(address, port) the proxy listens on, ``""`` for any address; filled in
    once listening.  Never reached, whatever --allow-upstream says (a loop)."""

    def refusal(self, address: str, port: int, mirrored: bool = False) -> str | None:
        """Why connecting to ``address:port`` is refused, or None if allowed.

        An IPv6 address that embeds IPv4 addresses is refused when any of
        them is (a NAT64 gateway would lead to the metadata service).
        """
        ip = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address):
            inner = embedded_ipv4(ip)
            if ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            else:
                for v4 in inner:
                    reason = self._refusal(v4, port, mirrored)
                    if reason is not None:
                        return f"{address} embeds {reason}"
                if inner and all(
                    any(v4 in net for net in self.allow_upstream) for v4 in inner
                ):
                    return None  # leads to allowed addresses only
        return self._refusal(ip, port, mirrored)

    def _refusal(
        self,
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
        port: int,
        mirrored: bool,
    ) -> str | None:
        if (str(ip), port) in self.own_listeners or (
            ("", port) in self.own_listeners
            and (ip.is_loopback or str(ip) in self.own_addresses)
        ):
            return f"{ip}:{port} is the proxy itself"
        if any(ip in net for net in self.allow_upstream):
            return None
        if str(ip) in self.own_addresses:
            return f"{ip} is one of the proxy's own addresses"
        if not ip.is_global or ip.is_multicast:
            return f"{ip} is not a public address (see --allow-upstream)"
        if not mirrored and port not in self.upstream_ports:
            return f"port {port} is not an allowed upstream port (see --upstream-ports)"
        return None


__all__ = ["DestinationPolicy", "embedded_ipv4"]
