"""Requests whose body is streamed upstream as it arrives (issue 10, D1).

twisted.web's HTTPChannel starts a request only once its whole body is read
(spooled to a temporary file past 100 kB).  For a request the proxy forwards
with a body, ``StreamingChannel`` starts it as soon as its head is complete
and hands the body chunks to the request's ``StreamedBody`` (front/upload.py)
instead; the channel's state is reset for the next request only when the
body is complete, as HTTPChannel.allContentReceived would.  A request
answered before its body is complete closes the connection (the rest of the
body cannot be told from a next request).
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Request

from cachingproxy.front.upload import StreamedBody


class StreamedRequest(Request):
    """A Request that can take its body as a StreamedBody."""

    body_stream: StreamedBody | None = None
    """The body, when it is streamed upstream as it arrives (set by the
    channel at the head; ``content`` then stays empty)."""

    def gotLength(self, length: int | None) -> None:  # noqa: N802
        if self.body_stream is None:
            super().gotLength(length)
        else:
            self.content = BytesIO()

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        if self.body_stream is not None:
            self.body_stream.fail(reason)
        super().connectionLost(reason)

    def _close_if_body_pending(self) -> None:
        """Before the response's first byte: answered before the client's
        body is complete, the connection ends after this response."""
        body = self.body_stream
        if (
            not self.startedWriting
            and body is not None
            and not body.complete
            and self.channel is not None
        ):
            self.channel.persistent = False
            self.responseHeaders.setRawHeaders(b"Connection", [b"close"])


class StreamingChannel(HTTPChannel):
    """An HTTPChannel that can start a request before its body is read."""

    _refused = False
    """An error was answered; every later byte is ignored."""
    _streamed: StreamedRequest | None = None
    """The request whose body is being streamed (started at its head)."""

    def _stream_body(self, gate: Any) -> StreamedRequest | None:
        """Give the newest request a StreamedBody if ``gate`` (a HeadGate)
        says it is forwarded with a body; the request, or None."""
        if gate is None or not self.requests or self.length == 0:
            return None
        request = self.requests[-1]
        if not isinstance(request, StreamedRequest):
            return None
        local = self.getHost()
        if not gate.streams(
            (getattr(local, "host", ""), getattr(local, "port", 0)),
            self._command,
            self._path,
            request.requestHeaders,
        ):
            return None
        request.body_stream = StreamedBody(
            self.length,
            self.transport,  # type: ignore[arg-type]
            self.resetTimeout,
        )
        return request

    def _dispatch(self, request: StreamedRequest) -> None:
        """Start ``request`` before its body is complete (what
        HTTPChannel.allContentReceived does, minus the state reset, which
        waits for the body's end)."""
        self._streamed = request
        # The idle timeout keeps running until the body is complete: a body
        # that makes no progress (a stalled client, an upstream that reads
        # nothing) for that long ends the connection and the upstream request.
        request.requestReceived(self._command, self._path, self._version)

    def _streamed_body_done(self, request: StreamedRequest) -> None:
        """The streamed body is complete: the channel is reset as
        HTTPChannel.allContentReceived does, the request already runs."""
        self._streamed = None
        if request not in self.requests:
            self._refused = True
            return
        self.length = 0
        self._receivedHeaderCount = 0
        self._receivedHeaderSize = 0
        self._HTTPChannel__first_line = 1
        self._transferDecoder = None
        del self._command, self._path, self._version
        if self.timeOut:
            self._savedTimeOut = self.setTimeout(None)
        self._handlingRequest = True
        self.setRawMode()
        assert request.body_stream is not None
        request.body_stream.finish()

    def _drop_streamed(self, why: str) -> bool:
        """The body being streamed is refused halfway: the running request is
        over for the client and its upstream request aborted.  True when the
        connection was aborted (the response had begun: no error answer)."""
        streamed, self._streamed = self._streamed, None
        if streamed is None:
            return False
        started = streamed.startedWriting
        streamed.connectionLost(Failure(ConnectionDone(why)))
        if started:
            self.transport.abortConnection()  # type: ignore[union-attr]
        return bool(started)

    def requestDone(self, request: Any) -> None:  # noqa: N802
        streamed = self._streamed
        if streamed is not None and request is streamed:
            # Answered before its body was complete (the connection closes,
            # see StreamedRequest._close_if_body_pending): the rest of the
            # body is not read.
            self._streamed = None
            self._refused = True
            assert streamed.body_stream is not None
            streamed.body_stream.abandon()
        super().requestDone(request)


__all__ = ["StreamedRequest", "StreamingChannel"]
