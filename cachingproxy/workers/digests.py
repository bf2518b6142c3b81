"""Digests published by index documents, shared by the workers (SPEC 11).

A worker that renders a mirrored index document remembers the digests it
publishes (so that a download of one of those files is checked against
it); another worker may be the one that downloads the file.  The digests go
into a small SQLite table under ``run/`` that every worker reads when its
own memory has none for a URL.
"""

from __future__ import annotations

import sqlite3

from twisted.logger import Logger

from cachingproxy.mirror.rewrite import Digest

_log = Logger()

MAX_ROWS = 1_000_000
"""Rows kept; beyond, the oldest half is dropped."""


class SharedDigests:
    """``url -> (algorithm, hex)`` in ``path``, for every worker."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = OFF")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS digests"
            " (url TEXT PRIMARY KEY, algorithm TEXT NOT NULL, hex TEXT NOT NULL)"
        )
        self._added = 0

    def add(self, digests: dict[str, Digest]) -> None:
        """Remember ``digests`` for every worker."""
        if not digests:
            return
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(
                    "INSERT OR REPLACE INTO digests VALUES (?, ?, ?)",
                    [(url, a, h) for url, (a, h) in digests.items()],
                )
            self._added += len(digests)
            if self._added > MAX_ROWS // 4:
                self._added = 0
                self._trim()
        except sqlite3.Error as e:
            _log.warn("cannot share published digests: {e}", e=e)

    def _trim(self) -> None:
        (rows,) = self._db.execute("SELECT COUNT(*) FROM digests").fetchone()
        if rows > MAX_ROWS:
            self._db.execute(
                "DELETE FROM digests WHERE rowid IN"
                " (SELECT rowid FROM digests ORDER BY rowid LIMIT ?)",
                (rows - MAX_ROWS // 2,),
            )

    def get(self, url: str) -> Digest | None:
        """The digest another worker (or this one) saw published for ``url``."""
        try:
            row = self._db.execute(
                "SELECT algorithm, hex FROM digests WHERE url = ?", (url,)
            ).fetchone()
        except sqlite3.Error:
            return None
        return None if row is None else (row[0], row[1])

    def close(self) -> None:
        self._db.close()


__all__ = ["SharedDigests"]
