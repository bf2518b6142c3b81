"""The HTTP/1.1 client protocol of upstream connections: the response's
``Connection`` header shown, the response head timed (``--read-timeout``),
the TLS handshake awaitable (``--connect-timeout``)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import _HTTP11ClientFactory
from twisted.web.iweb import IResponse
from zope.interface import implementer

from cachingproxy.errors import UpstreamTimeout

_LOST = Failure(ConnectionDone())


async def with_timeout(reactor: Any, d: defer.Deferred[Any], seconds: float) -> Any:
    """Await ``d``, cancelling it and raising UpstreamTimeout after ``seconds``."""
    timed_out = []

    def expire() -> None:
        timed_out.append(True)
        d.cancel()

    call = reactor.callLater(seconds, expire)
    try:
        return await d
    except Exception:
        # Cancellation surfaces as CancelledError or wrapped in
        # ResponseNeverReceived, depending on when it happened.
        if timed_out:
            raise UpstreamTimeout(f"no answer within {seconds:g}s") from None
        raise
    finally:
        if call.active():
            call.cancel()


@implementer(IHandshakeListener)
class ClientProtocol(HTTP11ClientProtocol):
    """Also shows the response's ``Connection`` header to the proxy, and
    enforces ``--read-timeout`` for the response head.

    Twisted keeps ``Connection`` among the connection-control headers, out of
    ``response.headers``, so the header names it lists (hop-by-hop, never to
    be forwarded) would otherwise reach the client.

    The head must arrive within ``read_timeout`` seconds of the request
    being sent (SPEC 5); the time the request body takes to go out does
    not count.  Between body bytes the reader of the body times out.
    """

    def __init__(
        self,
        quiescent_callback: Any,
        clock: Any = None,
        read_timeout: float | None = None,
    ) -> None:
        super().__init__(quiescent_callback)
        self._clock = clock
        self._read_timeout = read_timeout
        self._handshake: defer.Deferred[None] = defer.Deferred()

    def handshakeCompleted(self) -> None:  # noqa: N802
        if not self._handshake.called:
            self._handshake.callback(None)

    def handshake_done(self) -> defer.Deferred[None]:
        """Fires once TLS is established, or the connection is gone."""
        d: defer.Deferred[None] = defer.Deferred()

        def fire(result: None) -> None:
            d.callback(None)
            return result

        self._handshake.addBoth(fire)
        return d

    def connectionLost(self, reason: Failure = _LOST) -> None:  # noqa: N802
        self.handshakeCompleted()
        super().connectionLost(reason)

    def request(self, request: Any) -> defer.Deferred[IResponse]:
        d: defer.Deferred[IResponse] = super().request(request)
        if self._clock is not None and self._read_timeout is not None:
            self._time_head(d, self._clock, self._read_timeout)
        parser = self._parser
        if parser is not None:
            original = parser.headerReceived

            def header_received(name: bytes, value: bytes) -> None:
                original(name, value)
                if name.lower() == b"connection":
                    parser.headers.addRawHeader(b"connection", value)

            parser.headerReceived = header_received  # type: ignore[method-assign]
        return d

    def _time_head(
        self, d: defer.Deferred[IResponse], clock: Any, seconds: float
    ) -> None:
        timed_out: list[bool] = []
        calls: list[Any] = []

        def expire() -> None:
            if self.state == "TRANSMITTING":  # still sending the request body
                calls.append(clock.callLater(seconds, expire))
                return
            timed_out.append(True)
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]

        def done(result: Any) -> Any:
            if calls[-1].active():
                calls[-1].cancel()
            if timed_out and isinstance(result, Failure):
                return Failure(UpstreamTimeout(f"no response head within {seconds:g}s"))
            return result

        calls.append(clock.callLater(seconds, expire))
        d.addBoth(done)


class QuietClientFactory(_HTTP11ClientFactory):
    """Does not log every new upstream connection; uses ``ClientProtocol``."""

    noisy = False

    def __init__(
        self,
        quiescent_callback: Any,
        metadata: Any,
        *,
        clock: Any = None,
        read_timeout: float | None = None,
    ) -> None:
        super().__init__(quiescent_callback, metadata)
        self._clock = clock
        self._read_timeout = read_timeout

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:  # noqa: N802
        return ClientProtocol(self._quiescentCallback, self._clock, self._read_timeout)


__all__ = ["ClientProtocol", "QuietClientFactory", "with_timeout"]
