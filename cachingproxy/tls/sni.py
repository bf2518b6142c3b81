"""Transparent port-443 interception (``--listen-tls``), by SNI.

A router redirects clients' port-443 connections here.  The first TLS
record (the ClientHello) is read, not answered, to learn the server name:
a host that ``--intercept`` covers gets TLS terminated with a certificate
from the local CA and its requests are served like forward requests to
``https://host/…``; any other host is tunnelled byte for byte to where the
client was going (its original destination, else the name on port 443).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from cachingproxy.front.origdst import original_destination
from cachingproxy.tls.connect import TUNNEL_IDLE_TIMEOUT
from cachingproxy.tls.tunnel import Tunnel

if TYPE_CHECKING:
    from cachingproxy.front.surface import Surface

_log = Logger()
_DONE = Failure(ConnectionDone())
MAX_HELLO = 16 * 1024 + 5


class NotTLS(ValueError):
    """The first bytes are not a TLS ClientHello."""


def server_name(data: bytes) -> str | None:
    """The SNI host name of the ClientHello at the start of ``data``.

    None while more bytes are needed, ``""`` when the hello has no name.
    @raise NotTLS: not a TLS handshake record with a ClientHello.
    """
    if len(data) < 5:
        return None
    if data[0] != 0x16 or data[1] != 0x03:
        raise NotTLS("not a TLS handshake")
    length = struct.unpack("!H", data[3:5])[0]
    if len(data) < 5 + length:
        return None
    hello = data[5 : 5 + length]
    try:
        if hello[0] != 0x01:
            raise NotTLS("not a ClientHello")
        pos = 4 + 2 + 32  # handshake header, version, random
        pos += 1 + hello[pos]  # session id
        pos += 2 + struct.unpack("!H", hello[pos : pos + 2])[0]  # cipher suites
        pos += 1 + hello[pos]  # compression methods
        end = pos + 2 + struct.unpack("!H", hello[pos : pos + 2])[0]
        pos += 2
        while pos + 4 <= end:
            kind, size = struct.unpack("!HH", hello[pos : pos + 4])
            pos += 4
            if kind == 0:  # server_name
                names = hello[pos : pos + size]
                if names[2] == 0:  # host_name
                    name_length = struct.unpack("!H", names[3:5])[0]
                    return names[5 : 5 + name_length].decode("ascii").lower()
            pos += size
    except (IndexError, struct.error, UnicodeDecodeError) as e:
        raise NotTLS(f"malformed ClientHello: {e}") from None
    return ""


class _Peek(Protocol):
    """Reads the ClientHello, then hands the connection on."""

    def __init__(self, proxy: Surface, site: Any) -> None:
        self._proxy = proxy
        self._site = site
        self._buffer = b""
        self._next: Any = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._next is not None:
            self._next.dataReceived(data)
            return
        self._buffer += data
        try:
            name = server_name(self._buffer)
        except NotTLS as e:
            _log.info("not TLS on --listen-tls: {e}", e=e)
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if name is None:
            if len(self._buffer) > MAX_HELLO:
                self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self._route(name)

    def _route(self, name: str) -> None:
        proxy, transport = self._proxy, self.transport
        assert transport is not None
        destination = original_destination(transport)
        port = destination[1] if destination else 443
        buffered, self._buffer = self._buffer, b""
        ca = proxy.ca
        if name and proxy.intercepts(name) and ca is not None and ca.permits(name):
            tls = TLSMemoryBIOFactory(ca.context_factory(name), False, self._site)
            protocol = tls.buildProtocol(transport.getPeer())
            channel: Any = protocol.wrappedProtocol  # channel.Channel
            channel.intercept = (name, port)
            self._next = protocol
            protocol.makeConnection(transport)
            protocol.dataReceived(buffered)
            return
        if not name and destination is None:
            _log.info("TLS without SNI and no original destination: closing")
            transport.loseConnection()
            return
        host = name or destination[0]  # type: ignore[index]
        self._tunnel(host, port, buffered)

    def _tunnel(self, host: str, port: int, buffered: bytes) -> None:
        proxy, transport = self._proxy, self.transport
        assert transport is not None
        tunnel = Tunnel(
            transport, proxy.clock, TUNNEL_IDLE_TIMEOUT, lambda up, down: None
        )
        self._next = tunnel
        tunnel.from_client(buffered)
        d = proxy.upstream.connect_tcp(host, port, tunnel.factory(), frozenset({port}))

        def failed(failure: Failure) -> None:
            _log.info(
                "cannot tunnel TLS to {host}:{port}: {why}",
                host=host,
                port=port,
                why=failure.getErrorMessage(),
            )
            transport.loseConnection()

        d.addCallbacks(tunnel.connected, failed)

    def connectionLost(self, reason: Failure = _DONE) -> None:  # noqa: N802
        if self._next is not None:
            self._next.connectionLost(reason)


class SNIFactory(Factory):
    """The factory for a ``--listen-tls`` endpoint."""

    noisy = False

    def __init__(self, proxy: Callable[[], Surface | None], site: Any) -> None:
        self._proxy = proxy
        self._site = site

    def buildProtocol(self, addr: Any) -> Protocol | None:  # noqa: N802
        proxy = self._proxy()
        if proxy is None:
            return None  # not started yet: refuse the connection
        return _Peek(proxy, self._site)


__all__ = ["MAX_HELLO", "NotTLS", "SNIFactory", "server_name"]
