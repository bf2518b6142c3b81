"""Streaming a stored body to a consumer: the producer both stores share."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
)
from zope.interface import implementer

from cachingproxy.cache.entry import StoredResponse
from cachingproxy.errors import BodyMissing

CHUNK_SIZE = 256 * 1024
"""Bytes per ``consumer.write`` when serving a body."""

CHUNKS_PER_TURN = 16
"""Chunks written in one reactor turn to a consumer that never pauses."""

PRead = Callable[[int, int], bytes]
"""``pread(length, offset)``: the bytes a producer serves."""


@implementer(IPushProducer)
class RangeProducer:
    """Streams ``[start, end)`` of a body to a consumer, honouring pauses.

    Shared by the stores: ``pread`` reads the body, ``release`` is called once
    when done.  With a ``clock``, yields to the reactor every
    ``CHUNKS_PER_TURN`` chunks so a consumer that never pauses cannot starve
    it.
    """

    def __init__(
        self,
        consumer: IConsumer,
        pread: PRead,
        release: Callable[[], None],
        start: int,
        end: int,
        clock: IReactorTime | None = None,
    ) -> None:
        self._consumer = consumer
        self._pread = pread
        self._release = release
        self._offset = start
        self._end = end
        self._clock = clock
        self._paused = False
        self._done = False
        self._looping = False
        self._call: IDelayedCall | None = None
        self._deferred: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:
        """Register with the consumer and start writing."""
        self._consumer.registerProducer(self, True)
        self._produce()
        return self._deferred

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._call is None:
            self._produce()

    def stopProducing(self) -> None:
        if not self._done:
            self._finish(ConnectionDone("the consumer stopped reading"), False)

    def _scheduled(self) -> None:
        self._call = None
        self._produce()

    def _produce(self) -> None:
        # consumer.write may pause, resume or stop us re-entrantly; the outer
        # loop then carries on, so a nested call does nothing.
        if self._looping:
            return
        self._looping = True
        try:
            budget = CHUNKS_PER_TURN
            while not self._done:
                if self._offset >= self._end:
                    self._finish(None, True)
                elif self._paused:
                    return
                elif budget == 0 and self._clock is not None:
                    self._call = self._clock.callLater(0, self._scheduled)
                    return
                else:
                    budget -= 1
                    length = min(CHUNK_SIZE, self._end - self._offset)
                    try:
                        data = self._pread(length, self._offset)
                    except OSError as e:
                        self._finish(BodyMissing(f"cannot read body: {e}"), True)
                        return
                    if not data:
                        self._finish(BodyMissing("body is truncated"), True)
                        return
                    self._offset += len(data)
                    self._consumer.write(data)
        finally:
            self._looping = False

    def _finish(self, error: Exception | None, unregister: bool) -> None:
        self._done = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._release()
        if unregister:
            self._consumer.unregisterProducer()
        if error is None:
            self._deferred.callback(None)
        else:
            self._deferred.errback(error)


def read_range(
    entry: StoredResponse, start: int, end: int | None
) -> tuple[int, int] | None:
    """``[start, end)`` clamped to ``entry.size``, or None if not a range."""
    if start < 0 or (end is not None and end < start):
        return None
    stop = entry.size if end is None else min(end, entry.size)
    return min(start, stop), stop


__all__ = ["CHUNKS_PER_TURN", "CHUNK_SIZE", "PRead", "RangeProducer", "read_range"]
