"""A shared object's body to a client and, at the same time, into the local
tier (:class:`~cachingproxy.fleet.tiered.TieredStore`'s read-through copy),
checked against the entry's sha256 before the last byte goes out."""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from zope.interface import implementer

from cachingproxy.errors import BodyMissing, StoreFull
from cachingproxy.interfaces import IBodyWriter

_log = Logger()

_DONE = Failure(ResponseDone())

IDLE_TIMEOUT = 30.0
"""Seconds of silence from the store, mid-body, before a read gives up."""


@implementer(IPushProducer)
class CopyPipe(Protocol):
    """An object body to a client and, at the same time, into a local writer.

    ``served`` fires when the client has every byte (or errbacks:
    ConnectionDone when it went away, BodyMissing when the object broke off);
    ``finished`` fires with True when the whole body arrived, after which the
    copy may be committed.  A client that goes away does not stop the copy.
    """

    def __init__(
        self,
        consumer: IConsumer,
        writer: IBodyWriter | None,
        expected: int,
        digest: str,
        clock: Any,
    ) -> None:
        self._consumer: IConsumer | None = consumer
        self._writer = writer
        self._expected = expected
        self._digest = digest
        self._held = b""
        """The last byte of a whole body, sent only once its sha256 matched
        (so a client never gets a corrupt object whole)."""
        self._clock = clock
        self._timer: Any = None
        self._timed_out = False
        self.corrupt = False
        self._size = 0
        self._sha = hashlib.sha256()
        self.served: defer.Deferred[None] = defer.Deferred()
        self.finished: defer.Deferred[bool] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        assert self._consumer is not None
        self._consumer.registerProducer(self, True)
        self._timer = self._clock.callLater(IDLE_TIMEOUT, self._idle)

    def _idle(self) -> None:
        """The store went silent mid-body: give up on it."""
        self._timer = None
        self._timed_out = True
        self.transport.stopProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._timer is not None:
            self._timer.reset(IDLE_TIMEOUT)
        self._size += len(data)
        if self._digest:
            self._sha.update(data)
        if self._writer is not None:
            try:
                self._writer.write(data)
            except StoreFull:
                self._writer.abort()
                self._writer = None
        if self._consumer is not None:
            if self._digest and self._size >= self._expected:
                data, self._held = data[:-1], data[-1:]
            if data:
                self._consumer.write(data)
        elif self._writer is None:
            self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = _DONE) -> None:  # noqa: N802
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        complete = (
            bool(reason.check(ResponseDone))
            and self._size == self._expected
            and not self._timed_out
        )
        verified = complete and (
            not self._digest or self._sha.hexdigest() == self._digest
        )
        self.corrupt = complete and not verified
        if self.corrupt:
            _log.error(
                "a shared object does not match its sha256 {digest}; not served"
                " whole, not copied",
                digest=self._digest,
            )
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            if verified and self._held:
                consumer.write(self._held)
            consumer.unregisterProducer()
            if verified:
                self.served.callback(None)
            else:
                self.served.errback(
                    BodyMissing(f"shared object broke off after {self._size} bytes")
                )
        self.finished.callback(
            verified and bool(self._digest) and self._writer is not None
        )

    # IPushProducer, for the client
    def pauseProducing(self) -> None:  # noqa: N802
        if self._consumer is not None and self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:  # noqa: N802
        if self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:  # noqa: N802
        """The client went away: keep copying (at full speed) if there is a
        copy, else stop reading."""
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        self.served.errback(ConnectionDone("the consumer stopped reading"))
        if self._writer is None:
            self.transport.stopProducing()  # type: ignore[union-attr]
        else:
            self.transport.resumeProducing()  # type: ignore[union-attr]


__all__ = ["IDLE_TIMEOUT", "CopyPipe"]
