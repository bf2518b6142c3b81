"""Recent index lookups kept in memory, so that a hit costs no SQL query."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from cachingproxy.cache.entry import StoredResponse

RECENT_URLS = 4096
"""URLs whose lookups are kept (least recently used dropped first)."""


class RecentLookups:
    """The entries of recently looked-up URLs, in front of an index.

    Correct across writers: the store forgets a URL it writes itself, and
    ``version`` (SQLite's ``PRAGMA data_version``: it changes when another
    connection, such as another worker or ``cachingproxy-cache``, commits)
    is checked on every lookup; any change empties the whole memory.
    """

    def __init__(self, version: Callable[[], int], size: int = RECENT_URLS) -> None:
        self._version = version
        self._size = size
        self._seen = -1
        self._entries: OrderedDict[str, tuple[StoredResponse, ...]] = OrderedDict()

    def get(self, url: str) -> list[StoredResponse] | None:
        """The entries of ``url`` as last looked up, or None if not known."""
        version = self._version()
        if version != self._seen:
            self._entries.clear()
            self._seen = version
            return None
        entries = self._entries.get(url)
        if entries is None:
            return None
        self._entries.move_to_end(url)
        return list(entries)

    def put(self, url: str, entries: list[StoredResponse]) -> None:
        """Remember what the index answered for ``url`` (right after get)."""
        self._entries[url] = tuple(entries)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def forget(self, url: str) -> None:
        self._entries.pop(url, None)

    def clear(self) -> None:
        self._entries.clear()


__all__ = ["RECENT_URLS", "RecentLookups"]
