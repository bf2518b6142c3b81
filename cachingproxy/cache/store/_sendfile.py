"""Zero-copy serving of a stored body with ``os.sendfile`` (plain TCP only).

A client on a plain TCP connection gets a stored body straight from the
page cache: the kernel copies the file into the socket, and the process
never sees the bytes.  The socket is non-blocking; the sender watches a
duplicate of its descriptor for writability (its own registration with the
reactor, separate from the transport's), and sends only once the transport
has flushed what it holds (the response head), so bytes stay in order.

TLS (and anything that is not a plain ``tcp.Connection``) keeps the
producer path: :func:`socket_of` answers None for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IPushProducer,
    IReactorFDSet,
    ISSLTransport,
    IWriteDescriptor,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from cachingproxy.errors import BodyMissing

SENDFILE_MIN = 128 * 1024
"""Bodies (or ranges) smaller than this are read and written in one piece."""

SEND_PER_CALL = 8 * 1024 * 1024
"""At most this many bytes per ``sendfile`` call (one reactor turn)."""


def socket_of(consumer: object) -> tcp.Connection | None:
    """The plain TCP transport under ``consumer`` (a twisted.web request that
    has not written yet and has a ``Content-Length``, so its body goes out
    as is, not chunked), or None where sendfile cannot be used."""
    channel = getattr(consumer, "channel", None)
    transport = getattr(channel, "transport", None)
    headers = getattr(consumer, "responseHeaders", None)
    if (
        not isinstance(transport, tcp.Connection)
        or getattr(transport, "TLS", False)
        or ISSLTransport.providedBy(transport)
        or getattr(consumer, "startedWriting", True)
        or headers is None
        or not headers.hasHeader(b"content-length")
        or not transport.connected
        or transport.disconnecting
        or _pending(transport) is None
    ):
        return None
    return transport


@implementer(IPushProducer)
class _Whole:
    """The producer of a body written in one piece: it only hears a stop."""

    stopped = False

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        self.stopped = True


def write_whole(consumer: IConsumer, data: bytes) -> Deferred[None]:
    """Write a small body in one ``write`` (with a producer registered
    around it, as the store's ``read`` promises)."""
    producer = _Whole()
    consumer.registerProducer(producer, True)
    consumer.write(data)
    if producer.stopped:
        return fail(ConnectionDone("the consumer stopped reading"))
    consumer.unregisterProducer()
    return succeed(None)


def _pending(transport: Any) -> int | None:
    """Bytes the transport still holds in user space (None: cannot tell)."""
    try:
        held = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    except (AttributeError, TypeError):
        return None
    return held if isinstance(held, int) else None


@implementer(IPushProducer, IWriteDescriptor)
class Sendfile:
    """Sends ``[start, end)`` of the file ``body`` to ``consumer``'s socket.

    ``consumer`` is a twisted.web request whose head is set; this registers
    as its (push) producer, writes the head, then sends the range whenever
    the socket is writable, honouring pauses.  ``release`` is called once at
    the end.  :meth:`start` fires when the range was sent, or fails with
    ``BodyMissing`` (the file is shorter) or ``ConnectionDone``.
    """

    def __init__(
        self,
        reactor: IReactorFDSet,
        consumer: IConsumer,
        transport: tcp.Connection,
        body: int,
        release: Callable[[], None],
        start: int,
        end: int,
    ) -> None:
        self._reactor = reactor
        self._consumer = consumer
        self._transport = transport
        self._body = body
        self._release = release
        self._offset = start
        self._end = end
        self._fd = -1
        self._writing = False
        self._paused = False
        self._done = False
        self._deferred: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:
        self._fd = os.dup(self._transport.fileno())
        self._consumer.registerProducer(self, True)
        self._consumer.write(b"")  # the response head, through the transport
        if not self._done:
            self._watch(True)
        return self._deferred

    # -- IPushProducer ---------------------------------------------------------

    def pauseProducing(self) -> None:  # noqa: N802
        self._paused = True
        self._watch(False)

    def resumeProducing(self) -> None:  # noqa: N802
        self._paused = False
        self._watch(True)

    def stopProducing(self) -> None:  # noqa: N802
        self._finish(ConnectionDone("the client went away"), unregister=False)

    # -- IWriteDescriptor ------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:  # noqa: N802
        return "Sendfile"

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        # The reactor gave up on our descriptor (an error, or its shutdown).
        self._writing = False
        self._finish(ConnectionDone(str(reason.value)), unregister=True)

    def doWrite(self) -> None:  # noqa: N802
        if self._done or self._paused:
            return
        if _pending(self._transport):
            return  # the head first: the transport sends it in this turn
        count = min(self._end - self._offset, SEND_PER_CALL)
        try:
            sent = os.sendfile(self._fd, self._body, self._offset, count)
        except BlockingIOError:
            return
        except OSError as e:
            self._finish(ConnectionDone(f"sendfile: {e}"), unregister=True)
            return
        if sent == 0:
            self._finish(BodyMissing("body is truncated"), unregister=True)
            return
        self._offset += sent
        # What the access log counts (twisted.web's request.write does it).
        request: Any = self._consumer
        request.sentLength = getattr(request, "sentLength", 0) + sent
        if self._offset >= self._end:
            self._finish(None, unregister=True)

    # -- internals -------------------------------------------------------------

    def _watch(self, on: bool) -> None:
        if on and not self._writing and not self._done:
            self._reactor.addWriter(self)
            self._writing = True
        elif not on and self._writing:
            self._reactor.removeWriter(self)
            self._writing = False

    def _finish(self, error: Exception | None, unregister: bool) -> None:
        if self._done:
            return
        self._done = True
        self._watch(False)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._release()
        if unregister:
            self._consumer.unregisterProducer()
        if error is None:
            self._deferred.callback(None)
        else:
            self._deferred.errback(error)


__all__ = ["SENDFILE_MIN", "SEND_PER_CALL", "Sendfile", "socket_of", "write_whole"]
