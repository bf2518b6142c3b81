"""``--upstream-proxy``: reaching origins through a parent HTTP proxy.

Plain HTTP goes to the parent in absolute form (Twisted's ProxyAgent);
HTTPS and CONNECT tunnels go through a ``CONNECT`` to the parent, then TLS
(verified against the origin's name as usual) inside it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectError, ConnectionDone
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

_DONE = Failure(ConnectionDone())
_MAX_HEAD = 16 * 1024


class ParentRefused(ConnectError):
    """The parent proxy did not open the tunnel."""


def parent_endpoint(reactor: Any, url: str, timeout: float) -> IStreamClientEndpoint:
    """A TCP endpoint for the parent proxy at ``http://host:port``."""
    parsed = URI.fromBytes(url.encode("ascii"))
    host = parsed.host.decode("ascii").strip("[]")
    cls = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
    return cls(reactor, host, parsed.port, timeout=timeout)


class _Connect(Protocol):
    """Asks the parent for a tunnel, then hands the connection on."""

    def __init__(self, authority: str, creator: Any, factory: IProtocolFactory) -> None:
        self._authority = authority
        self._creator = creator
        self._factory = factory
        self._buffer = b""
        self._app: IProtocol | None = None
        self.established: defer.Deferred[IProtocol] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(  # type: ignore[union-attr]
            f"CONNECT {self._authority} HTTP/1.1\r\n"
            f"Host: {self._authority}\r\n\r\n".encode("ascii")
        )

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._app is not None:
            self._app.dataReceived(data)
            return
        self._buffer += data
        head, sep, rest = self._buffer.partition(b"\r\n\r\n")
        if not sep:
            if len(self._buffer) > _MAX_HEAD:
                self._fail("the parent proxy sent an oversized answer")
            return
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or parts[1] != "200":
            self._fail(f"the parent proxy answered {status_line!r}")
            return
        transport: Any = self.transport
        if self._creator is not None:
            transport.startTLS(self._creator)
        app = self._factory.buildProtocol(transport.getPeer())
        assert app is not None
        self._app = app
        app.makeConnection(transport)
        self.established.callback(app)
        if rest:
            app.dataReceived(rest)

    def _fail(self, why: str) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]
        if not self.established.called:
            self.established.errback(ParentRefused(why))

    def connectionLost(self, reason: Failure = _DONE) -> None:  # noqa: N802
        if self._app is not None:
            self._app.connectionLost(reason)
        elif not self.established.called:
            self.established.errback(ParentRefused(reason.getErrorMessage()))


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """``host:port`` reached through a CONNECT to the parent, with TLS inside
    when ``creator`` is given."""

    def __init__(
        self, parent: IStreamClientEndpoint, host: str, port: int, creator: Any
    ) -> None:
        self._parent = parent
        netloc = f"[{host}]" if ":" in host else host
        self._authority = f"{netloc}:{port}"
        self._creator = creator

    async def _connect(self, factory: IProtocolFactory) -> IProtocol:
        connect = _Connect(self._authority, self._creator, factory)
        await self._parent.connect(Factory.forProtocol(lambda: connect))
        return await connect.established

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        return defer.Deferred.fromCoroutine(self._connect(factory))


@implementer(IAgentEndpointFactory)
class TunnelEndpointFactory:
    """Endpoints for ``https`` URIs through the parent (an Agent's factory)."""

    def __init__(self, parent: IStreamClientEndpoint, tls: Any) -> None:
        self._parent = parent
        self._tls = tls

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:  # noqa: N802
        host = uri.host.decode("ascii").strip("[]")
        creator = self._tls.creatorForNetloc(uri.host, uri.port)
        return TunnelEndpoint(self._parent, host, uri.port, creator)


__all__ = [
    "ParentRefused",
    "TunnelEndpoint",
    "TunnelEndpointFactory",
    "parent_endpoint",
]
