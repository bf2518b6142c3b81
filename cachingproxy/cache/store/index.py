"""The on-disk format of a cache directory and the synchronous SQL over its index.

Shared by :class:`~cachingproxy.cache.store.disk.DiskStore` (which adds the start-up
sweep, body writing and the reactor) and by the ``cachingproxy-cache`` tool,
which must work on a cache that a running proxy is using and so never sweeps.

Layout under the cache directory::

    index.sqlite      the index (WAL); table ``meta`` marks the format
    bodies/XX/NAME    committed bodies; NAME is random hex, XX its first two chars
    tmp/NAME          bodies being written

Rows are always deleted (and committed) before their body files are unlinked,
so no row ever points at a body that is gone on purpose.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple
from urllib.parse import quote

import attrs
from twisted.logger import Logger

from cachingproxy.cache.entry import StoredResponse

_log = Logger()

FORMAT = "1"
INDEX = "index.sqlite"
OURS = frozenset({"bodies", "tmp", "run", INDEX, INDEX + "-wal", INDEX + "-shm"})
"""The names a cache directory may hold (``run`` is the state worker
processes share, SPEC 11)."""
BODY_REF = re.compile(r"\A([0-9a-f]{2})/\1[0-9a-f]{30}\Z")

_FIELDS: tuple[str, ...] = ("url", "variant", "vary", "status", "headers")
_FIELDS += ("stored_at", "initial_age", "size", "digest", "body_ref")
"""The columns holding a StoredResponse, in the order of its fields."""
_COLUMNS = ", ".join(_FIELDS)
_INSERT = (
    f"INSERT OR REPLACE INTO entries ({_COLUMNS}, last_used)"
    f" VALUES ({', '.join(':' + f for f in _FIELDS)}, :last_used)"
)
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entries (
    url TEXT NOT NULL,
    variant TEXT NOT NULL,
    vary TEXT NOT NULL,
    status INTEGER NOT NULL,
    headers TEXT NOT NULL,
    stored_at REAL NOT NULL,
    initial_age REAL NOT NULL,
    size INTEGER NOT NULL,
    digest TEXT NOT NULL,
    body_ref TEXT NOT NULL,
    last_used REAL NOT NULL
);
CREATE UNIQUE INDEX entries_key ON entries (url, variant);
"""
# entries_key serves ``url = ?`` and ``url >= ? AND url < ?`` (BINARY collation).
_LRU_INDEX = "CREATE INDEX IF NOT EXISTS entries_last_used ON entries (last_used, size)"
# Added after format 1 was released, so created at every open for older caches.
# It orders eviction candidates and, holding ``size``, lets SUM(size) skip the
# table (whose rows carry the headers).

_MAX_CHAR = 0x10FFFF
_SURROGATES = range(0xD800, 0xE000)


class CacheDirError(ValueError):
    """The directory is not a cache directory this version can use."""


class Body(NamedTuple):
    """A body an index row pointed at: its ``ref`` and ``size`` in bytes."""

    ref: str
    size: int


class Candidate(NamedTuple):
    """A row considered for eviction, least recently used first."""

    rowid: int
    url: str
    variant: str
    body: Body


class Totals(NamedTuple):
    """Aggregate figures of an index."""

    entries: int
    bytes: int
    oldest_stored: float | None
    newest_stored: float | None
    least_recently_used: float | None


def prefix_successor(prefix: str) -> str | None:
    """The least string greater than every string starting with ``prefix``.

    None when there is none (empty prefix, or only U+10FFFF characters).
    Code point order is UTF-8 byte order, which SQLite's BINARY collation uses.
    """
    chars = list(prefix)
    while chars:
        code = ord(chars.pop()) + 1
        if code in _SURROGATES:
            code = _SURROGATES.stop
        if code <= _MAX_CHAR:
            return "".join(chars) + chr(code)
    return None


def _to_entry(row: tuple[Any, ...]) -> StoredResponse:
    url, variant, vary, status, headers, *rest = row
    return StoredResponse(
        url, variant, tuple(json.loads(vary)), status, json.loads(headers), *rest
    )


def _to_params(entry: StoredResponse, now: float) -> dict[str, Any]:
    """Named parameters for ``entry``'s row, used at ``now``."""
    params = attrs.asdict(entry, recurse=False)
    params.update(vary=json.dumps(entry.vary), headers=json.dumps(entry.headers))
    return params | {"last_used": now}


def unlink_quietly(path: str) -> None:
    """Remove ``path``; one already gone is fine, other errors are logged."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        _log.warn("Cannot remove {path}: {error}", path=path, error=e)


class Index:
    """The index of the cache in ``path``: synchronous, one connection.

    Methods that change several rows run in one transaction of their own,
    or in the caller's when inside :meth:`transaction`.
    """

    def __init__(self, path: str, db: sqlite3.Connection) -> None:
        self.path = path
        self.bodies_dir = os.path.join(path, "bodies")
        self.db = db

    @classmethod
    def open(cls, path: str, *, create: bool = True) -> Index:
        """Open the index of the cache in ``path``.

        With ``create``, a missing index is created in an empty (or missing)
        directory; without, the directory and index must exist already and
        nothing is created.

        @raise CacheDirError: ``path`` holds no cache (without ``create``) or
            holds something else.
        """
        index = os.path.join(path, INDEX)
        if not os.path.exists(index):
            if not create:
                if os.path.isdir(path):
                    _refuse_foreign(path)
                raise CacheDirError(f"no cache in {path}")
            os.makedirs(path, exist_ok=True)
            _refuse_foreign(path)
            for suffix in ("-wal", "-shm"):
                unlink_quietly(index + suffix)  # never replay a log into a new index
            db = sqlite3.connect(index, isolation_level=None)
        else:
            uri = f"file:{quote(os.path.abspath(index))}?mode=rw"
            try:
                db = sqlite3.connect(uri, uri=True, isolation_level=None)
            except sqlite3.Error as e:
                raise CacheDirError(f"cannot open {index}: {e}") from e
        try:
            _prepare(db, index, create)
        except sqlite3.DatabaseError as e:
            db.close()
            raise CacheDirError(f"{index} is not a usable index: {e}") from e
        except BaseException:
            db.close()
            raise
        return cls(path, db)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the block in BEGIN IMMEDIATE/COMMIT (or in the enclosing one)."""
        if self.db.in_transaction:
            yield
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- bodies ----------------------------------------------------------------

    def body_path(self, ref: str) -> str:
        """The file of body ``ref``; ValueError if ``ref`` is not one of ours."""
        if not BODY_REF.match(ref):
            raise ValueError(f"bad body reference {ref!r}")
        return os.path.join(self.bodies_dir, ref)

    def unlink_bodies(self, bodies: Iterable[Body]) -> None:
        """Delete the files of ``bodies`` (whose rows are gone)."""
        for body in bodies:
            if BODY_REF.match(body.ref):
                unlink_quietly(self.body_path(body.ref))

    # -- reading ---------------------------------------------------------------

    def lookup(self, url: str) -> list[StoredResponse]:
        """Every variant of ``url``, ordered by variant."""
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM entries WHERE url = ? ORDER BY variant", (url,)
        )
        return [_to_entry(row) for row in rows]

    def entries(self, prefix: str = "") -> Iterator[tuple[StoredResponse, float]]:
        """Entries whose URL starts with ``prefix`` with their last use, by URL."""
        where, args = _prefix_where(prefix)
        rows = self.db.execute(
            f"SELECT {_COLUMNS}, last_used FROM entries WHERE {where}"
            " ORDER BY url, variant",
            args,
        )
        for row in rows:
            yield _to_entry(row[:-1]), row[-1]

    def digests(self) -> list[tuple[str, str, Body, str]]:
        """``(url, variant, body, sha256)`` of every entry, by URL, read at once
        (so no read transaction stays open while the caller works)."""
        rows = self.db.execute(
            "SELECT url, variant, body_ref, size, digest FROM entries"
            " ORDER BY url, variant"
        ).fetchall()
        return [
            (url, variant, Body(ref, size), d) for url, variant, ref, size, d in rows
        ]

    def sizes(self) -> Iterator[tuple[str, int]]:
        """``(url, size)`` of every entry, in no particular order."""
        yield from self.db.execute("SELECT url, size FROM entries")

    def rows(self) -> Iterator[tuple[int, Body]]:
        """``(rowid, body)`` of every entry, for the start-up sweep."""
        for rowid, ref, size in self.db.execute(
            "SELECT rowid, body_ref, size FROM entries"
        ):
            yield rowid, Body(ref, size)

    def counts(self) -> tuple[int, int]:
        """``(entries, bytes)``: cheap, from the covering entries_last_used."""
        entries, size = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries"
        ).fetchone()
        return entries, size

    def totals(self) -> Totals:
        """Entry count, body bytes and the time range of the index."""
        row = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(stored_at),"
            " MAX(stored_at), MIN(last_used) FROM entries"
        ).fetchone()
        return Totals(*row)

    def data_version(self) -> int:
        """A number that changes when another connection commits a change."""
        version: int = self.db.execute("PRAGMA data_version").fetchone()[0]
        return version

    def least_recently_used(self) -> Iterator[Candidate]:
        """Every entry, least recently used first (through entries_last_used)."""
        for rowid, url, variant, ref, size in self.db.execute(
            "SELECT rowid, url, variant, body_ref, size FROM entries ORDER BY last_used"
        ):
            yield Candidate(rowid, url, variant, Body(ref, size))

    # -- writing ---------------------------------------------------------------

    def insert(self, entry: StoredResponse, now: float) -> Body | None:
        """Store ``entry``'s row, last used ``now``; the body it replaced, if any."""
        with self.transaction():
            old = self.db.execute(
                "SELECT body_ref, size FROM entries WHERE url = ? AND variant = ?",
                (entry.url, entry.variant),
            ).fetchone()
            self.db.execute(_INSERT, _to_params(entry, now))
        return None if old is None else Body(*old)

    def update(self, entry: StoredResponse, now: float) -> bool:
        """Replace the metadata of ``entry``'s row if its body is still the same."""
        with self.transaction():
            changed = self.db.execute(
                "UPDATE entries SET vary = :vary, status = :status,"
                " headers = :headers, stored_at = :stored_at,"
                " initial_age = :initial_age, last_used = :last_used"
                " WHERE url = :url AND variant = :variant AND body_ref = :body_ref",
                _to_params(entry, now),
            ).rowcount
        return bool(changed)

    def touch(self, uses: Iterable[tuple[float, str, str]]) -> None:
        """Record ``(time, url, variant)`` uses in one statement; never goes back."""
        with self.transaction():
            self.db.executemany(
                "UPDATE entries SET last_used = MAX(last_used, ?)"
                " WHERE url = ? AND variant = ?",
                uses,
            )

    def delete(self, url: str, variant: str | None = None) -> list[Body]:
        """Drop the variants of ``url`` (only ``variant`` when given)."""
        if variant is None:
            return self._delete_where("url = ?", [url])
        return self._delete_where("url = ? AND variant = ?", [url, variant])

    def delete_prefix(self, prefix: str) -> list[Body]:
        """Drop every entry whose URL starts with ``prefix``."""
        return self._delete_where(*_prefix_where(prefix))

    def delete_unused_since(self, cutoff: float) -> list[Body]:
        """Drop every entry last used before ``cutoff``."""
        return self._delete_where("last_used < ?", [cutoff])

    def delete_exact(self, url: str, variant: str, ref: str) -> list[Body]:
        """Drop the entry if it still has body ``ref`` (not if since replaced)."""
        where = "url = ? AND variant = ? AND body_ref = ?"
        return self._delete_where(where, [url, variant, ref])

    def delete_rowids(self, rowids: Iterable[int]) -> None:
        """Drop rows by rowid (the caller knows their bodies)."""
        with self.transaction():
            self.db.executemany(
                "DELETE FROM entries WHERE rowid = ?", ((r,) for r in rowids)
            )

    def _delete_where(self, where: str, args: list[Any]) -> list[Body]:
        with self.transaction():
            sql = f"DELETE FROM entries WHERE {where} RETURNING body_ref, size"
            return [Body(*row) for row in self.db.execute(sql, args).fetchall()]


def _prefix_where(prefix: str) -> tuple[str, list[Any]]:
    """A WHERE clause matching URLs that start with ``prefix``, using entries_key."""
    if not prefix:
        return "1", []
    successor = prefix_successor(prefix)
    if successor is None:
        return "url >= ?", [prefix]
    return "url >= ? AND url < ?", [prefix, successor]


def _refuse_foreign(path: str) -> None:
    """CacheDirError if ``path`` (which has no index) holds files not ours."""
    foreign = sorted(set(os.listdir(path)) - OURS)
    if foreign:
        raise CacheDirError(f"{path} holds {foreign[0]!r} but no cache index")


def _prepare(db: sqlite3.Connection, index: str, create: bool) -> None:
    """Check an existing index (before changing anything in it), or create the
    schema in a new one; switch to WAL; add indexes later versions need."""
    tables = {
        n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    if tables:
        if "meta" not in tables or "entries" not in tables:
            raise CacheDirError(f"{index} is not a cachingproxy index")
        row = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        if row is None or row[0] != FORMAT:
            raise CacheDirError(f"{index} has format {row and row[0]!r}, not {FORMAT}")
    elif not create:
        raise CacheDirError(f"no cache in {os.path.dirname(index)}: the index is empty")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    if not tables:
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    db.execute(_LRU_INDEX)


__all__ = [
    "BODY_REF",
    "FORMAT",
    "INDEX",
    "OURS",
    "Body",
    "CacheDirError",
    "Candidate",
    "Index",
    "Totals",
    "prefix_successor",
    "unlink_quietly",
]
