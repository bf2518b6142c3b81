"""Bytes of a download that the store could not take (disk full).

The clients already following the download still get them: they are kept in
memory only until every follower has read them, and the upstream is paused
while more than a bounded amount waits, so memory stays flat.
"""

from __future__ import annotations

from collections import deque

from zope.interface import implementer

from cachingproxy.errors import BodyMissing
from cachingproxy.interfaces import IPartialReader

SPILL_LIMIT = 8 * 1024 * 1024
"""Bytes held before the upstream is paused."""


@implementer(IPartialReader)
class Spill:
    """Body bytes from offset ``base`` on, held until read by every follower:
    the partial reader of what the store could not take."""

    def __init__(self, base: int, limit: int = SPILL_LIMIT) -> None:
        self.base = base
        self.end = base
        self.limit = limit
        self._start = base
        self._chunks: deque[bytes] = deque()

    @property
    def buffered(self) -> int:
        return self.end - self._start

    @property
    def full(self) -> bool:
        return self.buffered > self.limit

    def append(self, data: bytes) -> None:
        self._chunks.append(data)
        self.end += len(data)

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (which must not be trimmed yet)."""
        if offset < self._start:
            raise BodyMissing(f"bytes at {offset} were already released")
        position = self._start
        for chunk in self._chunks:
            if offset < position + len(chunk):
                skip = offset - position
                return chunk[skip : skip + length]
            position += len(chunk)
        return b""

    def close(self) -> None:
        """Nothing to release: :meth:`trim` frees what was read."""

    def trim(self, upto: int) -> None:
        """Release every whole chunk below offset ``upto``."""
        while self._chunks and self._start + len(self._chunks[0]) <= upto:
            self._start += len(self._chunks.popleft())


__all__ = ["SPILL_LIMIT", "Spill"]
