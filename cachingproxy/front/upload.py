"""A request body streamed upstream as it arrives (issue 10, D1).

twisted.web reads a whole request body before the resource runs, spooling
anything over 100 kB to a temporary file.  For requests the proxy forwards,
the channel instead starts the request when its head is complete and feeds
the body through a ``StreamedBody``: a push ``IBodyProducer`` for the
upstream HTTP client that holds at most ``BUFFER`` bytes and pauses reading
from the client while it is full or while the upstream connection cannot
take more (backpressure both ways).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

BUFFER = 1024 * 1024
"""Body bytes held while the upstream connection is not ready for them;
past this, the client's connection is not read from."""


@implementer(IBodyProducer)
class StreamedBody:
    """The body of one request, written by the channel as it is received."""

    def __init__(
        self,
        length: int | None,
        client: IPushProducer,
        progress: Callable[[], None] = lambda: None,
    ) -> None:
        self.length: Any = UNKNOWN_LENGTH if length is None else length
        self._client = client
        self._progress = progress
        """Called when bytes go upstream (the channel's idle timeout runs
        while the body streams: bytes from the client or to the upstream
        reset it)."""
        self._held: list[bytes] = []
        self._held_size = 0
        self._consumer: IConsumer | None = None
        self._paused = False
        self._client_paused = False
        self._stopped = False
        self._done: defer.Deferred[None] | None = None
        self.complete = False
        """The whole body has been received from the client."""
        self._failure: Failure | None = None

    # -- the channel's side ---------------------------------------------------

    def write(self, data: bytes) -> None:
        """Body bytes from the client."""
        if self._stopped or self._failure is not None or not data:
            return
        if self._consumer is not None and not self._paused and not self._held:
            self._consumer.write(data)
            self._progress()
            return
        self._held.append(data)
        self._held_size += len(data)
        if self._held_size >= BUFFER:
            # Also when already paused: twisted.web may have resumed reading.
            self._client_paused = True
            self._client.pauseProducing()

    def finish(self) -> None:
        """The client's body is complete."""
        self.complete = True
        self._settle()

    def fail(self, reason: Failure) -> None:
        """The client is gone (or refused) before its body was complete:
        the upstream request is aborted."""
        if self.complete or self._failure is not None:
            return
        self._failure = reason
        self._held, self._held_size = [], 0
        done, self._done = self._done, None
        if done is not None and not self._stopped:
            done.errback(reason)

    def abandon(self) -> None:
        """The client was answered before its body was complete (the
        upstream answered early, or was never asked): nothing more is sent.
        An upstream that answered early closes its connection itself (it
        stops this producer); the Deferred it waits on is not fired, since
        twisted's client logs a failure that comes after the response."""
        self._stopped = True
        self._done = None
        self._held, self._held_size = [], 0

    # -- IBodyProducer, for the upstream HTTP client --------------------------

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:  # noqa: N802
        self._consumer = consumer
        self._done = defer.Deferred()
        done = self._done
        if self._failure is not None:
            self._done = None
            done.errback(self._failure)
            return done
        self._flush()
        return done

    def pauseProducing(self) -> None:  # noqa: N802
        self._paused = True
        self._pause_client()

    def resumeProducing(self) -> None:  # noqa: N802
        self._paused = False
        self._flush()

    def stopProducing(self) -> None:  # noqa: N802
        # The upstream request is over (an early answer, a lost connection):
        # whatever else the client sends is read and dropped.
        self._stopped = True
        self._done = None
        self._held, self._held_size = [], 0
        self._resume_client()

    # -- internals --------------------------------------------------------------

    def _flush(self) -> None:
        while self._held and not self._paused and self._consumer is not None:
            data = self._held.pop(0)
            self._held_size -= len(data)
            self._consumer.write(data)
            self._progress()
        if not self._paused and self._held_size < BUFFER:
            self._resume_client()
        self._settle()

    def _settle(self) -> None:
        if self.complete and not self._held and self._done is not None:
            done, self._done = self._done, None
            done.callback(None)

    def _pause_client(self) -> None:
        if not self._client_paused:
            self._client_paused = True
            self._client.pauseProducing()

    def _resume_client(self) -> None:
        if self._client_paused:
            self._client_paused = False
            self._client.resumeProducing()


__all__ = ["BUFFER", "StreamedBody"]
