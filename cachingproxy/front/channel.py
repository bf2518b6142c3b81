"""HTTP/1.1 connections of the proxy: limits, deadlines, hand-over to tunnels.

``Channel`` is twisted.web's HTTPChannel with the hardening of SPEC 8 (header
limits, a deadline for the request head, idle timeout, per-client connection
cap, smuggling shapes refused) and the CONNECT hand-over; ``ProxySite`` keeps
track of its channels so that shutdown can close them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from cachingproxy.cache.status import CacheStatus
from cachingproxy.front import quick as heads
from cachingproxy.front.gate import MAX_REQUEST_BODY, HeadGate, Refusal
from cachingproxy.front.limits import (
    ConnectionLimiter,
    RateLimitedLog,
    client_key,
    held_back,
)
from cachingproxy.front.origdst import original_destination
from cachingproxy.front.streaming import StreamedRequest, StreamingChannel
from cachingproxy.interfaces import IQuickHits

_log = Logger()

METHOD_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
"""RFC 9110 5.6.2 token: what a method name may consist of."""


_DONE = Failure(ConnectionDone())


HEAD_TIMEOUT = 30.0
"""Seconds a client has to send a whole request head, from its first byte
(or from the connection's start): a trickle of bytes does not extend it."""

IDLE_TIMEOUT = 60.0
"""Seconds a keep-alive connection may sit idle between requests."""

MAX_HEADERS = 100
"""Header fields a request may have."""

_REASONS = {
    400: b"Bad Request",
    403: b"Forbidden",
    407: b"Proxy Authentication Required",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
}


class Channel(StreamingChannel):
    """An HTTP/1.1 channel that tells its site when it is gone, and that
    holds the line against hostile clients (SPEC 8): a deadline for the
    request head, limits on its size and header count answered with a clear
    4xx, no obs-fold, bare LF or Transfer-Encoding other than chunked, and at
    most ``--max-client-connections`` connections per client address.

    Twisted's own idle timeout (``timeOut``) runs between requests; it is off
    while a response is being sent, however slowly the client reads.
    """

    site: ProxySite
    maxHeaders = MAX_HEADERS
    taken_over: Any = None
    """The protocol that gets this connection's bytes after a CONNECT."""
    intercept: tuple[str, int] | None = None
    """For a channel inside an intercepted tunnel: the CONNECT authority."""
    _client: str | None = None
    """The address counted in the site's ConnectionLimiter, if any."""
    _refused = False
    """An error was answered; every later byte is ignored."""
    _head_lines = 0
    """Lines of the request head so far (0: waiting for a request line)."""
    _head_size = 0
    _head_timer: IDelayedCall | None = None
    _receiving = 0
    """dataReceived calls in progress (requestDone re-enters it)."""
    _host: Any = None
    _peer: Any = None
    _gate_pending = False
    """The head gate is checking credentials: reading is paused."""
    _content_waiting = False
    """The body was complete while the gate was still checking."""
    _plain_get: heads.SimpleGet | None = None
    """A plain GET head the memo did not know, for the request made of it."""
    _quick: IQuickHits | None = None
    """Where plain repeat GETs on this connection are answered from memory
    (a plain TCP connection, routed by its heads alone)."""

    def connectionMade(self) -> None:  # noqa: N802
        super().connectionMade()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.site.channels.add(self)
        # The channel inside an intercepted tunnel is the same connection,
        # counted already.
        if self.intercept is None:
            client = client_key(self.transport.getPeer())  # type: ignore[union-attr]
            if client is not None:
                if not self.site.limiter.acquire(client):
                    self.site.refused(client)
                    self._reject(429, "too many connections from your address")
                    return
                self._client = client
            quick = self.site.quick
            if (
                quick is not None
                and heads.plain_tcp(self.transport)
                and original_destination(self.transport) is None
            ):
                self._quick = quick
        self._start_head_timer()

    def getHost(self) -> Any:  # noqa: N802
        # Asked for by every request (twisted.web's Request keeps it, the
        # head gate checks it); the addresses of a connection do not
        # change, so one getsockname() (and one address object) serves all.
        host = self._host
        if host is None:
            host = self._host = super().getHost()
        return host

    def getPeer(self) -> Any:  # noqa: N802
        peer = self._peer
        if peer is None:
            peer = self._peer = super().getPeer()
        return peer

    def take_over(self, protocol: Any) -> None:
        """Hand the connection to ``protocol`` (after a CONNECT's 200): no
        more HTTP parsing, no HTTP idle timeout."""
        self.taken_over = protocol
        self.setTimeout(None)
        # requestDone would restore the idle timeout saved for the CONNECT.
        self._savedTimeOut = None
        self._stop_head_timer()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.taken_over is not None:
            self.taken_over.dataReceived(data)
            return
        if self._refused:
            return
        if (
            self._quick is not None
            and not self.requests
            and self.line_mode
            and not self._buffer
            and self.persistent
            and self._answered_quickly(self._quick, data)
        ):
            return
        if self.line_mode and not self._handlingRequest and self._head_timer is None:
            self._start_head_timer()  # the first byte of the next request
        self._receiving += 1
        try:
            super().dataReceived(data)
        finally:
            self._receiving -= 1
        if (
            self._receiving == 0
            and self.line_mode
            and not self._refused
            and self.taken_over is None
            and b"\n" in self._buffer
        ):
            # Lines end with CRLF: an LF left in an unfinished line is bare
            # (and would leave the client waiting for the head's end).  Only
            # the outermost call looks: a nested one (pipelined bytes given
            # back by requestDone) just queues them for the running loop.
            self._reject(400, "bare LF in the request head")

    def _answered_quickly(self, quick: IQuickHits, data: bytes) -> bool:
        """Answer ``data`` from ``quick`` if it is a plain repeat GET that
        the memo knows (front/quick.py, handler/quick.py)."""
        found = self._plain_get = heads.simple_get(data, self.maxHeaders)
        if found is None:
            return False
        client = getattr(self.getPeer(), "host", None)
        local = self.getHost()
        where = (getattr(local, "host", ""), getattr(local, "port", 0))
        reply = quick.answer(found.target, found.host, client, where, found.conditions)
        if reply is None:
            return False  # the request made of it carries it (plain_get)
        self._plain_get = None
        self.resetTimeout()
        self._stop_head_timer()
        # As after a parsed request: one empty line before the next is skipped.
        self._HTTPChannel__first_line = 1
        heads.send_now(self.transport, heads.framed(*reply, found))  # type: ignore[arg-type]
        if not found.keep_alive:
            self.persistent = False
            self.loseConnection()
        return True

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        if b"\n" in line:
            return self._reject(400, "bare LF in the request head")
        self._head_size += len(line)
        if self._head_size > self.totalHeadersSize:
            return self._reject(431, "request head larger than 16 KiB")
        if self._head_lines == 0:
            self._head_lines = 1 if line else 0
        elif not line:
            self._head_lines = 0  # the end of the head
            self._head_size = 0
        elif line[:1] in (b" ", b"\t"):
            return self._reject(400, "header continuation line (obs-fold)")
        else:
            self._head_lines += 1
            if self._head_lines - 1 > self.maxHeaders:
                return self._reject(431, f"more than {self.maxHeaders} header fields")
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:  # noqa: N802
        name, sep, value = line.partition(b":")
        if (
            sep
            and name.strip().lower() == b"transfer-encoding"
            and value.strip(b" \t").lower() != b"chunked"
        ):
            # Twisted takes "identity" as no body at all: a smuggling shape.
            self._reject(400, "Transfer-Encoding other than chunked")
            return False
        return bool(super().headerReceived(line))

    def allHeadersReceived(self) -> None:  # noqa: N802
        self._stop_head_timer()
        if self._plain_get is not None:  # the request made of this head
            self.requests[-1].plain_get, self._plain_get = self._plain_get, None
        verdict = self._gate()
        if isinstance(verdict, Refusal):
            return self._reject(verdict.status, verdict.message, verdict.headers)
        if isinstance(verdict, defer.Deferred):
            # A password check in a thread: read nothing more until it is done.
            self._gate_pending = True
            self.paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]
            verdict.addCallback(self._gate_done)
        streamed = self._stream_body(self.site.gate)
        super().allHeadersReceived()
        if streamed is not None and not self._gate_pending and not self._refused:
            self._dispatch(streamed)

    def _gate(self) -> Refusal | defer.Deferred[Refusal | None] | None:
        """The site's head-time checks (SPEC 8: refused before any body
        byte is read, let alone spooled to disk)."""
        command, path = getattr(self, "_command", b""), getattr(self, "_path", b"")
        if not METHOD_TOKEN.match(command):
            return Refusal(400, "method name is not a token")
        gate = self.site.gate
        if gate is None or not self.requests:
            return None
        peer, local = self.getPeer(), self.getHost()
        return gate.check(
            getattr(peer, "host", None),
            (getattr(local, "host", ""), getattr(local, "port", 0)),
            command,
            path,
            self.requests[-1].requestHeaders,
            self.intercept is not None,
        )

    def _gate_done(self, verdict: Refusal | None) -> None:
        self._gate_pending = False
        if self._refused or self.transport is None:
            return
        if verdict is not None:
            self._reject(verdict.status, verdict.message, verdict.headers)
            return
        self.paused = False
        self.transport.resumeProducing()  # type: ignore[attr-defined]
        request = self.requests[-1] if self.requests else None
        if isinstance(request, StreamedRequest) and request.body_stream is not None:
            self._dispatch(request)
        if self._content_waiting:
            self._content_waiting = False
            self.allContentReceived()
        self.dataReceived(b"")  # what arrived with the head

    def allContentReceived(self) -> None:  # noqa: N802
        if self._refused:
            return
        if self._gate_pending:
            self._content_waiting = True
            return
        if self._streamed is not None:
            return self._streamed_body_done(self._streamed)
        super().allContentReceived()

    def rawDataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._refused:
            return
        super().rawDataReceived(data)

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802
        # LineReceiver's default drops the connection without a word.
        if self._head_lines == 0:
            self._reject(414, "request line longer than 16 KiB")
        else:
            self._reject(431, "header line longer than 16 KiB")

    def _respondToBadRequestAndDisconnect(self) -> None:  # noqa: N802
        # Twisted's own rejections (malformed request line or header,
        # conflicting Content-Length/Transfer-Encoding, bad chunks).
        self._reject(400, "malformed request")

    def timeoutConnection(self) -> None:  # noqa: N802
        if self.taken_over is None:
            super().timeoutConnection()

    def _reject(
        self, status: int, message: str, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        """Answer ``status`` (and ``message`` as the body), then close."""
        if self._refused:
            return
        self._refused = True
        self._stop_head_timer()
        if self._drop_streamed(message):
            return
        # No idle timeout any more, but a client that does not read its
        # answer is cut off as after one (HTTPChannel.timeoutConnection).
        self.setTimeout(None)
        if self.abortTimeout is not None and self._abortingCall is None:
            self._abortingCall = self.callLater(
                self.abortTimeout, self.forceAbortClient
            )
        body = f"{status} {message}\n".encode()
        # Like every answer (SPEC 5): X-Cache (the cache was not consulted)
        # and the proxy's Via.
        own = [("X-Cache", CacheStatus.BYPASS.value)]
        via = getattr(self.site, "via", None)
        if via:
            own.append(("Via", via))
        extra = b"".join(
            b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in (*headers, *own)
        )
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"%sContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, _REASONS[status], extra, len(body), body)
        )
        self.loseConnection()

    def _start_head_timer(self) -> None:
        self._stop_head_timer()
        self._head_timer = self.callLater(self.site.head_timeout, self._head_late)

    def _stop_head_timer(self) -> None:
        timer, self._head_timer = self._head_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _head_late(self) -> None:
        self._head_timer = None
        if self.taken_over is not None or self._handlingRequest or not self.line_mode:
            return
        peer = self.transport.getPeer() if self.transport is not None else None
        self.site.refused(client_key(peer) or "-", "slow request head")
        self._reject(408, "request head not received in time")

    def connectionLost(self, reason: Failure = _DONE) -> None:  # noqa: N802
        self.site.channels.discard(self)
        self._stop_head_timer()
        client, self._client = self._client, None
        if client is not None:
            self.site.limiter.release(client)
        try:
            if self.taken_over is not None:
                self.taken_over.connectionLost(reason)
            super().connectionLost(reason)
        finally:
            self.lost.callback(None)


class ProxyRequest(StreamedRequest):
    """A Request whose ``*`` target goes to the proxy like any other, and
    whose 400 closes the connection.

    twisted.web answers ``OPTIONS *`` itself with 200 before any resource
    runs, which would bypass --allow-client; the proxy refuses or 400s it.
    """

    plain_get: heads.SimpleGet | None = None
    """The head as :func:`~cachingproxy.front.quick.simple_get` read it when
    the memo of repeat hits may keep this request's answer."""

    def _handleStar(self) -> None:  # noqa: N802
        site = self.site
        assert site is not None
        self.render(site.getResourceFor(self))

    _body_size = 0

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802
        """Bodies past MAX_REQUEST_BODY (chunked ones, whose size is not
        declared) are refused with 413 instead of spooled on."""
        self._body_size += len(data)
        channel = self.channel
        if self._body_size > MAX_REQUEST_BODY and isinstance(channel, Channel):
            channel._reject(413, "request body too large")
            return
        if self.body_stream is not None:
            self.body_stream.write(data)
        else:
            super().handleContentChunk(data)

    def write(self, data: bytes) -> None:
        self._close_if_body_pending()
        if not self.startedWriting and self.code == 400 and self.channel is not None:
            # The bytes behind a request the proxy could not make sense of
            # (a Host contradicting the URL …) are not served either.
            self.channel.persistent = False
            self.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        super().write(data)


class ProxySite(Site):
    """A Site that leaves access logging to cachingproxy's own access log,
    keeps track of its connections so that shutdown can close them, and
    counts them per client address (``--max-client-connections``)."""

    displayTracebacks = False
    noisy = False
    protocol = Channel  # type: ignore[assignment]
    requestFactory = ProxyRequest
    head_timeout = HEAD_TIMEOUT
    """Seconds for a request head (tests make it short)."""
    gate: HeadGate | None = None
    """Checks made when a request head is complete (set by the service)."""
    quick: IQuickHits | None = None
    """Answers plain repeat GETs from memory (set by the service)."""
    via: str | None = None
    """The proxy's ``Via`` token, sent with the answers written here."""

    def __init__(self, resource: Any, max_client_connections: int = 256) -> None:
        super().__init__(resource, timeout=IDLE_TIMEOUT)
        self.channels: set[Channel] = set()
        self.limiter = ConnectionLimiter(max_client_connections)
        self._refusals = RateLimitedLog(self.reactor)

    def refused(self, client: str, why: str = "") -> None:
        """Log a refused connection (rate-limited per client address)."""
        suppressed = self._refusals.allow(client)
        if suppressed is None:
            return
        if why:
            _log.info(
                "closed {client}: {why}{more}",
                client=client,
                why=why,
                more=held_back(suppressed),
            )
        else:
            _log.warn(
                "refused a connection from {client}: it holds {n} already"
                " (--max-client-connections){more}",
                client=client,
                n=self.limiter.open(client),
                more=held_back(suppressed),
            )

    def log(self, request: Any) -> None:
        pass

    def close_connections(self) -> defer.Deferred[None]:
        """Drop every client connection; fires when all are gone."""
        channels = list(self.channels)
        for channel in channels:
            channel.transport.abortConnection()  # type: ignore[union-attr]
        return defer.DeferredList([c.lost for c in channels]).addCallback(
            lambda _: None
        )


__all__ = [
    "HEAD_TIMEOUT",
    "IDLE_TIMEOUT",
    "MAX_HEADERS",
    "Channel",
    "ProxyRequest",
    "ProxySite",
]
