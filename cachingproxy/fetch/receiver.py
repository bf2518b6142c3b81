"""The two ends of a download's body: the protocol that receives it from
upstream (with the read timeout), and one follower's reading of it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol as TypingProtocol

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from cachingproxy.cache.pump import Pump
from cachingproxy.errors import UpstreamTimeout
from cachingproxy.interfaces import IBodySource, IPartialReader


class Body(TypingProtocol):
    """What a reading needs of the body it reads (a download)."""

    @property
    def readable(self) -> int: ...

    @property
    def body_complete(self) -> bool: ...

    @property
    def failure(self) -> Failure | None: ...

    def read(self, reader: IPartialReader, offset: int, length: int) -> bytes: ...


@implementer(IBodySource)
class Reading:
    """One follower's view of a download's body: what the store took, read
    through the follower's own reader, then what the spill holds."""

    def __init__(
        self,
        body: Body,
        reader: IPartialReader,
        start: int,
        on_consumed: Callable[[], None],
        on_close: Callable[[Reading], None],
    ) -> None:
        self.offset = start
        self.pump: Pump | None = None
        self._body = body
        self._reader = reader
        self._on_consumed = on_consumed
        self._on_close = on_close

    @property
    def readable(self) -> int:
        return self._body.readable

    @property
    def complete(self) -> bool:
        return self._body.body_complete

    @property
    def failure(self) -> Failure | None:
        return self._body.failure

    def read(self, offset: int, length: int) -> bytes:
        return self._body.read(self._reader, offset, length)

    def consumed(self, offset: int) -> None:
        self.offset = offset
        self._on_consumed()

    def close(self) -> None:
        self._reader.close()
        self._on_close(self)


class BodyReceiver(Protocol):
    """Feeds an upstream body to ``on_data``, then its end to ``on_end``,
    with an idle timeout (``--read-timeout`` between body bytes)."""

    def __init__(
        self,
        clock: IReactorTime,
        read_timeout: float,
        on_data: Callable[[bytes], None],
        on_end: Callable[[Failure], None],
    ) -> None:
        self._clock = clock
        self._read_timeout = read_timeout
        self._on_data = on_data
        self._on_end = on_end
        self._timer: IDelayedCall | None = None
        self._error: Failure | None = None
        self._paused = False

    def connectionMade(self) -> None:  # noqa: N802
        self._timer = self._clock.callLater(self._read_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self._abort(
            Failure(UpstreamTimeout(f"upstream silent for {self._read_timeout:g}s"))
        )

    def _abort(self, failure: Failure) -> None:
        self._error = failure
        self.transport.stopProducing()  # type: ignore[union-attr]

    def pause(self) -> None:
        """Stop reading upstream (the spill is full); the idle timer waits too."""
        if not self._paused and self.transport is not None:
            self._paused = True
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self._timer = self._clock.callLater(self._read_timeout, self._timed_out)
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._error is not None:
            return
        if self._timer is not None:
            self._timer.reset(self._read_timeout)
        self._on_data(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: N802,B008
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._on_end(self._error or reason)


__all__ = ["Body", "BodyReceiver", "Reading"]
