"""A client following a download: reads what is on disk, at its own pace."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from cachingproxy.errors import BodyMissing
from cachingproxy.interfaces import IPartialReader

if TYPE_CHECKING:
    from cachingproxy.fetch.download import Download

CHUNK = 256 * 1024
"""Bytes per write to a client."""


@implementer(IPushProducer)
class Follower:
    """One client reading a download's body from the store writer at its own pace."""

    def __init__(
        self,
        download: Download,
        reader: IPartialReader,
        consumer: IConsumer,
        on_finish: Callable[[Failure | None], None],
        start: int,
        end: int | None,
    ) -> None:
        self._download = download
        self._reader = reader
        self._consumer = consumer
        self._on_finish = on_finish
        self.offset = start
        self._end = end
        self._paused = False
        self._finished = False
        self._pumping = False
        self._again = False

    def begin(self) -> None:
        self._consumer.registerProducer(self, True)
        self._pump()

    def wake(self) -> None:
        if not self._paused:
            self._pump()

    def pauseProducing(self) -> None:  # noqa: N802
        self._paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:  # noqa: N802
        self._finish(Failure(ConnectionDone("client went away")), unregister=False)

    def _pump(self) -> None:
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        try:
            self._again = True
            while self._again and not self._finished:
                self._again = False
                self._pump_once()
        finally:
            self._pumping = False

    def _pump_once(self) -> None:
        download = self._download
        while not self._paused and not self._finished:
            available = download.readable
            limit = available if self._end is None else min(self._end, available)
            if self.offset < limit:
                try:
                    data = download.read(
                        self._reader, self.offset, min(CHUNK, limit - self.offset)
                    )
                except BodyMissing:
                    data = b""
                if not data:
                    self._finish(Failure(BodyMissing(download.url)))
                    return
                self.offset += len(data)
                self._consumer.write(data)
                download._consumed()
                continue
            if download.failure is not None:
                self._finish(download.failure)
            elif download.body_complete or (
                self._end is not None and self.offset >= self._end
            ):
                self._finish(None)
            return

    def _finish(self, failure: Failure | None, unregister: bool = True) -> None:
        if self._finished:
            return
        self._finished = True
        self._download._forget(self)
        self._reader.close()
        if unregister:
            self._consumer.unregisterProducer()
        self._on_finish(failure)


__all__ = ["CHUNK", "Follower"]
