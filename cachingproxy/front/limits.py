"""Limits on what one client may hold (SPEC 8): connections per address, and
log lines that a hostile client cannot turn into a flood."""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterable

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IReactorTime

from cachingproxy.config import Network


def client_key(address: IAddress | None) -> str | None:
    """The client connections are counted by: its IPv4 address (IPv4-mapped
    IPv6 addresses as plain IPv4), or the /64 of its IPv6 address — one
    host often holds a whole /64 and can pick any address in it (link-local
    addresses, which every host on a link shares the prefix of, count one by
    one); None for UNIX sockets."""
    if not isinstance(address, IPv4Address | IPv6Address):
        return None
    try:
        ip = ipaddress.ip_address(address.host.split("%", 1)[0])
    except ValueError:
        return address.host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if not ip.is_loopback and not ip.is_link_local:
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def client_allowed(host: str, networks: Iterable[Network]) -> bool:
    """Whether the client address ``host`` is in ``networks``
    (``--allow-client``); IPv4-mapped IPv6 addresses count as IPv4."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


class AllowedClients:
    """``--allow-client`` with the answer for each address remembered: every
    request of a connection asks the same, twice (at its head and on the
    request path)."""

    def __init__(self, networks: Iterable[Network], remembered: int = 4096) -> None:
        self._networks = tuple(networks)
        self._remembered = remembered
        self._known: dict[str, bool] = {}

    def __call__(self, host: str) -> bool:
        known = self._known.get(host)
        if known is None:
            if len(self._known) >= self._remembered:
                self._known.clear()
            known = self._known[host] = client_allowed(host, self._networks)
        return known


class ConnectionLimiter:
    """Counts open connections per client and refuses those over ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, client: str) -> bool:
        """Count one more connection of ``client``; False (and not counted)
        when it already holds ``limit``."""
        count = self._open.get(client, 0)
        if count >= self.limit:
            return False
        self._open[client] = count + 1
        return True

    def release(self, client: str) -> None:
        """One connection counted by ``acquire`` has closed."""
        count = self._open.get(client, 0) - 1
        if count > 0:
            self._open[client] = count
        else:
            self._open.pop(client, None)

    def open(self, client: str) -> int:
        """Connections ``client`` holds now."""
        return self._open.get(client, 0)


class RateLimitedLog:
    """Lets at most ``burst`` messages per key through in each ``interval``
    seconds, and says how many were held back when the next one goes out.

    Keys are client addresses or kinds of message; at most ``max_keys`` are
    remembered (the oldest forgotten), so a client with many addresses cannot
    grow it without bound.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        interval: float = 10.0,
        burst: int = 5,
        max_keys: int = 4096,
    ) -> None:
        self._clock = clock
        self._interval = interval
        self._burst = burst
        self._max_keys = max_keys
        self._windows: OrderedDict[str, list[float]] = OrderedDict()
        """key -> [window start, messages let through, messages held back]"""

    def allow(self, key: str) -> int | None:
        """None if this message is held back; else how many messages of
        ``key`` were held back since the last one let through."""
        now = self._clock.seconds()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self._interval:
            suppressed = int(window[2]) if window is not None else 0
            self._windows[key] = [now, 1, 0]
            self._windows.move_to_end(key)
            while len(self._windows) > self._max_keys:
                self._windows.popitem(last=False)
            return suppressed
        if window[1] < self._burst:
            window[1] += 1
            suppressed = int(window[2])
            window[2] = 0
            return suppressed
        window[2] += 1
        return None


def held_back(suppressed: int) -> str:
    """`` (N similar messages held back)`` for a log line, or nothing."""
    return f" ({suppressed} similar messages held back)" if suppressed else ""


__all__ = ["ConnectionLimiter", "RateLimitedLog", "client_key", "held_back"]
