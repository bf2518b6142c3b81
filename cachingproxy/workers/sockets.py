"""Listening sockets bound once by the supervisor and adopted by each worker.

The supervisor listens on every endpoint with Twisted's own endpoint parser
(so ``tcp:``, ``tcp6:``, ``ssl:``, ``unix:`` and ``systemd:`` bind exactly as
in one process, and errors read the same), then stops accepting on them and
hands the descriptors to its workers.  A worker wraps each inherited
descriptor in a reactor whose ``listen*`` calls become ``adoptStreamPort``
on it, so the endpoint string still decides the protocol (``ssl:`` wraps
the factory in TLS) but no worker ever binds.
"""

from __future__ import annotations

import socket
from typing import Any

from attrs import frozen
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from cachingproxy.config import ProxyConfig
from cachingproxy.front.backlog import with_backlog


@frozen
class Bound:
    """One endpoint the supervisor listens on, and the descriptor it passes."""

    description: str
    option: str
    fd: int
    family: int


class _NoConnections(Factory):
    """The supervisor never accepts; if it ever did, it would hang up."""

    noisy = False

    def buildProtocol(self, addr: object) -> Protocol | None:  # noqa: N802
        return None


def bind_all(
    reactor: Any, config: ProxyConfig
) -> tuple[list[IListeningPort], list[Bound], list[str]]:
    """Listen on every --listen and --listen-tls endpoint without accepting.

    Returns the ports, what to hand the workers, and an error line per
    endpoint that could not be bound.
    """
    ports: list[IListeningPort] = []
    bound: list[Bound] = []
    failures: list[str] = []
    wanted = [(d, "--listen") for d in config.listen]
    wanted += [(d, "--listen-tls") for d in config.listen_tls]
    for description, option in wanted:
        endpoint = serverFromString(reactor, with_backlog(description))
        d = endpoint.listen(_NoConnections())
        got: list[IListeningPort] = []
        d.addCallbacks(
            got.append,
            lambda f, where=f"{option} {description}": failures.append(
                f"{where}: {f.getErrorMessage()}"
            ),
        )
        if not got:
            continue
        port = got[0]
        port.stopReading()  # type: ignore[attr-defined]
        fd = port.fileno()  # type: ignore[attr-defined]
        ports.append(port)
        bound.append(Bound(description, option, fd, _family(fd)))
    return ports, bound, failures


def _family(fd: int) -> int:
    """The address family of socket ``fd`` (which stays open)."""
    sock = socket.socket(fileno=fd)
    try:
        return int(sock.family)
    finally:
        sock.detach()


class _Adopting:
    """A reactor whose listening calls adopt one inherited descriptor."""

    def __init__(self, reactor: Any, fd: int, family: int) -> None:
        self._reactor = reactor
        self._fd = fd
        self._family = family

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def _adopt(self, factory: Any) -> IListeningPort:
        port: IListeningPort = self._reactor.adoptStreamPort(
            self._fd, self._family, factory
        )
        return port

    def listenTCP(self, port: int, factory: Any, *args: Any, **kw: Any) -> Any:  # noqa: N802
        return self._adopt(factory)

    def listenUNIX(self, address: str, factory: Any, *args: Any, **kw: Any) -> Any:  # noqa: N802
        return self._adopt(factory)

    def listenSSL(  # noqa: N802
        self,
        port: int,
        factory: Any,
        contextFactory: Any,  # noqa: N803 (SSL4ServerEndpoint passes it by name)
        *args: Any,
        **kw: Any,
    ) -> Any:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        return self._adopt(TLSMemoryBIOFactory(contextFactory, False, factory))

    def adoptStreamPort(self, fd: int, family: int, factory: Any) -> Any:  # noqa: N802
        return self._adopt(factory)


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """``description`` listened on through the inherited descriptor ``fd``."""

    def __init__(self, reactor: Any, description: str, fd: int, family: int) -> None:
        self._reactor = reactor
        self._description = description
        self._fd = fd
        self._family = family

    def listen(self, factory: Any) -> defer.Deferred[IListeningPort]:
        adopting = _Adopting(self._reactor, self._fd, self._family)
        if self._description.split(":", 1)[0].strip() == "systemd":
            # The supervisor consumed LISTEN_FDS; nothing to parse here.
            return defer.execute(
                adopting.adoptStreamPort, self._fd, self._family, factory
            )
        return serverFromString(adopting, self._description).listen(factory)


__all__ = ["AdoptedEndpoint", "Bound", "bind_all"]
