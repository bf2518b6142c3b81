"""CONNECT tunnels: splicing a client connection to an upstream one.

Once the proxy has answered ``200 Connection established``, the client's
connection stops being HTTP: its channel hands every byte to a
:class:`Tunnel`, which writes it upstream, and the upstream's bytes go back
to the client.  Each side's transport is the other's producer, so a slow
reader on one side pauses the other instead of filling memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

_DONE = Failure(ConnectionDone())


class _Upstream(Protocol):
    """The upstream side: forwards to the tunnel."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.tunnel.from_upstream(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:  # noqa: N802
        self.tunnel.upstream_lost()


class Tunnel:
    """Bytes both ways between ``client`` and an upstream connection."""

    def __init__(
        self,
        client: ITransport,
        clock: IReactorTime,
        idle_timeout: float,
        on_close: Callable[[int, int], None],
    ) -> None:
        self.client = client
        self.upstream: ITransport | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._on_close = on_close
        self._timer: IDelayedCall | None = None
        self._closed = False
        self._pending: list[bytes] = []

    def factory(self) -> Factory:
        """A factory for the upstream connection."""
        return Factory.forProtocol(lambda: _Upstream(self))

    def connected(self, protocol: _Upstream) -> None:
        """The upstream is connected: start splicing."""
        self.upstream = protocol.transport
        assert self.upstream is not None
        client: Any = self.client
        upstream: Any = self.upstream
        client.unregisterProducer()
        client.registerProducer(upstream, True)
        upstream.registerProducer(client, True)
        self._timer = self._clock.callLater(self._idle_timeout, self._idle)
        pending, self._pending = self._pending, []
        for data in pending:
            self.from_client(data)

    def _touch(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle_timeout)

    def _idle(self) -> None:
        self._timer = None
        self.close()

    # -- the client side (called by the client's channel) ----------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.from_client(data)

    def from_client(self, data: bytes) -> None:
        if self.upstream is None:
            self._pending.append(data)
            return
        self.bytes_up += len(data)
        self._touch()
        self.upstream.write(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:  # noqa: N802
        if self.upstream is not None:
            self.upstream.loseConnection()
        self._finish()

    # -- the upstream side -----------------------------------------------------

    def from_upstream(self, data: bytes) -> None:
        self.bytes_down += len(data)
        self._touch()
        self.client.write(data)

    def upstream_lost(self) -> None:
        self.client.loseConnection()
        self._finish()

    def close(self) -> None:
        """Close both sides (idle timeout, shutdown)."""
        if self.upstream is not None:
            self.upstream.loseConnection()
        self.client.loseConnection()

    def _finish(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._on_close(self.bytes_up, self.bytes_down)


__all__ = ["Tunnel"]
