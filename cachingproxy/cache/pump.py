"""The one loop that streams a body to a client: for hits and for followers.

A :class:`Pump` writes ``[start, end)`` of an
:class:`~cachingproxy.interfaces.IBodySource` to a consumer in chunks of
:data:`CHUNK_SIZE`, honouring pauses.  A source that is still arriving
wakes the pump (:meth:`Pump.wake`) when more is readable.  With a clock the
pump yields to the reactor every :data:`CHUNKS_PER_TURN` chunks, so a
consumer that never pauses cannot starve other connections.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from cachingproxy.errors import BodyMissing
from cachingproxy.interfaces import IBodySource

CHUNK_SIZE = 256 * 1024
"""Bytes per ``consumer.write``."""

CHUNKS_PER_TURN = 16
"""Chunks written in one reactor turn to a consumer that never pauses."""


@implementer(IPushProducer)
class Pump:
    """Streams ``[start, end)`` of ``source`` to ``consumer`` (``end`` None:
    to the end of the body, whenever that comes)."""

    def __init__(
        self,
        consumer: IConsumer,
        source: IBodySource,
        start: int,
        end: int | None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.offset = start
        self._consumer = consumer
        self._source = source
        self._end = end
        self._clock = clock
        self._paused = False
        self._done = False
        self._looping = False
        self._call: IDelayedCall | None = None
        self._deferred: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:
        """Register with the consumer and start writing; fires when the range
        was written, or fails (``BodyMissing``, the source's failure, or
        ``ConnectionDone`` if the consumer stopped reading)."""
        self._consumer.registerProducer(self, True)
        self._produce()
        return self._deferred

    def wake(self) -> None:
        """More of the source may be readable now."""
        if self._call is None:
            self._produce()

    def pauseProducing(self) -> None:  # noqa: N802
        self._paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self._paused = False
        if self._call is None:
            self._produce()

    def stopProducing(self) -> None:  # noqa: N802
        self._finish(Failure(ConnectionDone("the consumer stopped reading")), False)

    def _scheduled(self) -> None:
        self._call = None
        self._produce()

    def _produce(self) -> None:
        # consumer.write (and source.consumed) may pause, resume, stop or
        # wake us re-entrantly; the outer loop then carries on with fresh
        # state, so a nested call does nothing.
        if self._looping:
            return
        self._looping = True
        try:
            budget = CHUNKS_PER_TURN
            while not self._done:
                source = self._source
                limit = source.readable
                if self._end is not None:
                    limit = min(self._end, limit)
                if self.offset >= limit:
                    if source.failure is not None:
                        self._finish(source.failure, True)
                    elif source.complete or (
                        self._end is not None and self.offset >= self._end
                    ):
                        self._finish(None, True)
                    return
                if self._paused:
                    return
                if budget == 0 and self._clock is not None:
                    self._call = self._clock.callLater(0, self._scheduled)
                    return
                budget -= 1
                try:
                    data = source.read(
                        self.offset, min(CHUNK_SIZE, limit - self.offset)
                    )
                except (BodyMissing, OSError) as e:
                    self._finish(Failure(BodyMissing(f"cannot read body: {e}")), True)
                    return
                if not data:
                    self._finish(Failure(BodyMissing("body is truncated")), True)
                    return
                self.offset += len(data)
                self._consumer.write(data)
                source.consumed(self.offset)
        finally:
            self._looping = False

    def _finish(self, failure: Failure | None, unregister: bool) -> None:
        if self._done:
            return
        self._done = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._source.close()
        if unregister:
            self._consumer.unregisterProducer()
        if failure is None:
            self._deferred.callback(None)
        else:
            self._deferred.errback(failure)


__all__ = ["CHUNKS_PER_TURN", "CHUNK_SIZE", "Pump"]
