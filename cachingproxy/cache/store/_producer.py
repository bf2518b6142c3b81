"""Streaming a stored body to a consumer: the producer both stores share."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IReactorTime
from zope.interface import implementer

from cachingproxy.cache.entry import StoredResponse
from cachingproxy.cache.pump import Pump
from cachingproxy.interfaces import IBodySource

PRead = Callable[[int, int], bytes]
"""``pread(length, offset)``: the bytes a producer serves."""


@implementer(IBodySource)
class _StoredBody:
    """A whole stored body of ``size`` bytes, read by ``pread``."""

    complete = True
    failure = None

    def __init__(self, pread: PRead, release: Callable[[], None], size: int) -> None:
        self.readable = size
        self._pread = pread
        self._release = release

    def read(self, offset: int, length: int) -> bytes:
        return self._pread(length, offset)

    def consumed(self, offset: int) -> None:
        pass

    def close(self) -> None:
        self._release()


def produce(
    consumer: IConsumer,
    pread: PRead,
    release: Callable[[], None],
    start: int,
    end: int,
    clock: IReactorTime | None = None,
) -> Deferred[None]:
    """Stream ``[start, end)`` of a stored body to ``consumer``.

    Shared by the stores: ``pread`` reads the body, ``release`` is called
    once when done.  With a ``clock`` the pump yields to the reactor every
    ``CHUNKS_PER_TURN`` chunks.  Fires when done; fails with
    ``BodyMissing`` or ``ConnectionDone``.
    """
    return Pump(consumer, _StoredBody(pread, release, end), start, end, clock).start()


def read_range(
    entry: StoredResponse, start: int, end: int | None
) -> tuple[int, int] | None:
    """``[start, end)`` clamped to ``entry.size``, or None if not a range."""
    if start < 0 or (end is not None and end < start):
        return None
    stop = entry.size if end is None else min(end, entry.size)
    return min(start, stop), stop


__all__ = ["PRead", "produce", "read_range"]
