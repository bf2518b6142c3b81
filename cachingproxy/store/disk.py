"""A cache store on a local directory: an SQLite index plus one file per body.

Layout under the cache directory::

    index.sqlite      the index (WAL); table ``meta`` marks the format
    bodies/XX/NAME    committed bodies; NAME is random hex, XX its first two chars
    tmp/NAME          bodies being written

A body is fsynced and renamed into ``bodies/`` before its index row is
committed, and an old body is unlinked only after the row replacing it is
committed, so after a crash no row points at a partial body; whatever a crash
leaves behind is swept by :meth:`DiskStore.open`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sqlite3
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorThreads,
    IReactorTime,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..entry import StoredResponse
from ..errors import BodyMissing, StoreFull
from ..interfaces import IBodyWriter, ICacheStore, IPartialReader

_log = Logger()
_T = TypeVar("_T")

_CHUNK_SIZE = 256 * 1024
"""Bytes per ``consumer.write`` when serving a body."""

_CHUNKS_PER_TURN = 16
"""Chunks written in one reactor turn to a consumer that never pauses."""

_FORMAT = "1"
_INDEX = "index.sqlite"
_OURS = frozenset({"bodies", "tmp", _INDEX, _INDEX + "-wal", _INDEX + "-shm"})
_BODY_REF = re.compile(r"\A([0-9a-f]{2})/\1[0-9a-f]{30}\Z")
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


class CacheDirError(ValueError):
    """The directory is not a cache directory this version can use."""


PRead = Callable[[int, int], bytes]
"""``pread(length, offset)``: the bytes a producer serves."""


@implementer(IPushProducer)
class _RangeProducer:
    """Streams ``[start, end)`` of a body to a consumer, honouring pauses.

    Shared by the stores: ``pread`` reads the body, ``release`` is called once
    when done.  With a ``clock``, yields to the reactor every
    ``_CHUNKS_PER_TURN`` chunks so a consumer that never pauses cannot starve
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
            budget = _CHUNKS_PER_TURN
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
                    length = min(_CHUNK_SIZE, self._end - self._offset)
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


def _read_range(
    entry: StoredResponse, start: int, end: int | None
) -> tuple[int, int] | None:
    """``[start, end)`` clamped to ``entry.size``, or None if not a range."""
    if start < 0 or (end is not None and end < start):
        return None
    stop = entry.size if end is None else min(end, entry.size)
    return min(start, stop), stop


@implementer(IPartialReader)
class _FileReader:
    """Reads what a writer has written through a duplicate of its fd."""

    def __init__(self, writer: _DiskWriter, fd: int) -> None:
        self._writer = writer
        self._fd = fd

    def read(self, offset: int, length: int) -> bytes:
        if self._fd < 0:
            raise ValueError("reader is closed")
        stop = min(offset + length, self._writer.bytes_written)
        if stop <= offset:
            return b""
        return os.pread(self._fd, stop - offset, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@implementer(IBodyWriter)
class _DiskWriter:
    """A body being written to ``tmp/``; moved into ``bodies/`` on commit."""

    def __init__(self, store: DiskStore, url: str, name: str, fd: int) -> None:
        self.bytes_written = 0
        self._store = store
        self._url = url
        self._name = name
        self._fd = fd
        self._hash = hashlib.sha256()
        self._state = "open"  # -> full | committing -> committed | aborted

    @property
    def _tmp_path(self) -> str:
        return os.path.join(self._store._tmp_dir, self._name)

    @property
    def _ref(self) -> str:
        return f"{self._name[:2]}/{self._name}"

    def write(self, data: bytes) -> None:
        if self._state != "open":
            if self._state == "full" or self._store._closing is not None:
                raise StoreFull(f"cannot store {self._url}: writer is {self._state}")
            raise ValueError(f"write to a {self._state} writer")
        view = memoryview(data)
        done = 0
        try:
            while done < len(view):
                done += os.write(self._fd, view[done:])
        except OSError as e:
            self._state = "full"
            raise StoreFull(f"cannot store {self._url}: {e}") from e
        self._hash.update(data)
        self.bytes_written += len(data)

    def open_reader(self) -> IPartialReader:
        if self._fd < 0:
            raise ValueError(f"open_reader on a {self._state} writer")
        return _FileReader(self, os.dup(self._fd))

    def commit(self, entry: StoredResponse) -> Deferred[StoredResponse]:
        if self._state != "open" or self._store._closing is not None:
            full = self._state == "full" or self._store._closing is not None
            error = StoreFull if full else ValueError
            return defer.fail(
                error(f"cannot commit {self._url}: writer is {self._state}")
            )
        self._state = "committing"
        stored = entry.replace(
            size=self.bytes_written, digest=self._hash.hexdigest(), body_ref=self._ref
        )
        store = self._store
        d = store._in_thread(self._sync_and_move, store._body_path(self._ref))
        committed = d.addCallback(lambda _: store._insert(stored))
        committed.addErrback(self._commit_failed)
        committed.addBoth(self._close_fd)
        return store._track(committed)

    def _sync_and_move(self, body_path: str) -> None:
        """In a thread: make the body durable under its final name."""
        os.fsync(self._fd)
        directory = os.path.dirname(body_path)
        os.makedirs(directory, exist_ok=True)
        os.rename(self._tmp_path, body_path)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _commit_failed(self, failure: Failure) -> Failure:
        self._state = "aborted"
        _unlink(self._tmp_path)
        _unlink(self._store._body_path(self._ref))
        return failure

    def _close_fd(self, result: _T) -> _T:
        if self._state == "committing":
            self._state = "committed"
        self._store._writers.discard(self)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        return result

    def abort(self) -> Deferred[None]:
        if self._state in ("open", "full"):
            self._state = "aborted"
            self._close_fd(None)
            _unlink(self._tmp_path)
        return defer.succeed(None)


def _unlink(path: str) -> None:
    """Remove ``path``; one already gone is fine, other errors are logged."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        _log.warn("Cannot remove {path}: {error}", path=path, error=e)


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


@implementer(ICacheStore)
class DiskStore:
    """Cached responses in a directory; use :meth:`open` to make one."""

    def __init__(
        self, path: str, db: sqlite3.Connection, reactor: IReactorThreads
    ) -> None:
        self.path = path
        self._db = db
        self._reactor = reactor
        self._clock = IReactorTime(reactor)
        self._tmp_dir = os.path.join(path, "tmp")
        self._bodies_dir = os.path.join(path, "bodies")
        self._writers: set[_DiskWriter] = set()
        self._pending: set[Deferred[None]] = set()
        self._closing: list[Deferred[None]] | None = None
        self._closed = False

    @classmethod
    def open(cls, path: str, reactor: IReactorThreads | None = None) -> DiskStore:
        """Open (creating if needed) the cache in ``path`` and sweep it.

        @raise CacheDirError: ``path`` holds something else.
        """
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = IReactorThreads(global_reactor)
        os.makedirs(path, exist_ok=True)
        db = _open_index(path)
        store = cls(path, db, reactor)
        try:
            os.makedirs(store._tmp_dir, exist_ok=True)
            os.makedirs(store._bodies_dir, exist_ok=True)
            store._sweep()
        except BaseException:
            db.close()
            raise
        return store

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"the store in {self.path} is closed")

    def _body_path(self, ref: str) -> str:
        return os.path.join(self._bodies_dir, ref)

    def _in_thread(self, f: Callable[[str], None], arg: str) -> Deferred[None]:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, arg)

    def _track(self, d: Deferred[StoredResponse]) -> Deferred[StoredResponse]:
        """Let :meth:`close` wait for ``d``."""
        done: Deferred[None] = Deferred()
        self._pending.add(done)

        def finished(result: object) -> object:
            self._pending.discard(done)
            done.callback(None)
            return result

        return d.addBoth(finished)

    def _sweep(self) -> None:
        """Delete what a crash may have left: temp files, orphans, dead rows."""
        temps = 0
        for item in os.scandir(self._tmp_dir):
            if item.is_file(follow_symlinks=False) or item.is_symlink():
                os.unlink(item.path)
                temps += 1
        on_disk: dict[str, int] = {}
        for shard in os.scandir(self._bodies_dir):
            if shard.is_dir(follow_symlinks=False):
                for item in os.scandir(shard.path):
                    if item.is_file(follow_symlinks=False):
                        on_disk[f"{shard.name}/{item.name}"] = item.stat().st_size
        live: set[str] = set()
        dead: list[tuple[int]] = []
        for rowid, ref, size in self._db.execute(
            "SELECT rowid, body_ref, size FROM entries"
        ):
            if on_disk.get(ref) == size:
                live.add(ref)
            else:
                dead.append((rowid,))
        with _transaction(self._db):
            self._db.executemany("DELETE FROM entries WHERE rowid = ?", dead)
        orphans = [ref for ref in on_disk if ref not in live]
        for ref in orphans:
            _unlink(self._body_path(ref))
        if temps or orphans or dead:
            _log.info(
                "Swept {path}: {temps} temporary files, {orphans} orphan bodies, "
                "{rows} index rows without a complete body",
                path=self.path,
                temps=temps,
                orphans=len(orphans),
                rows=len(dead),
            )

    def _insert(self, entry: StoredResponse) -> StoredResponse:
        """Commit ``entry``'s row, then drop the body it replaced."""
        with _transaction(self._db):
            old = self._db.execute(
                "SELECT body_ref FROM entries WHERE url = ? AND variant = ?",
                (entry.url, entry.variant),
            ).fetchone()
            self._db.execute(_INSERT, _to_params(entry, self._clock.seconds()))
        if old is not None and old[0] != entry.body_ref:
            _unlink(self._body_path(old[0]))
        return entry

    def lookup(self, url: str) -> Deferred[list[StoredResponse]]:
        return defer.execute(self._select, url)

    def _select(self, url: str) -> list[StoredResponse]:
        self._check_open()
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM entries WHERE url = ? ORDER BY variant", (url,)
        )
        return [_to_entry(row) for row in rows]

    def read(
        self,
        entry: StoredResponse,
        consumer: IConsumer,
        start: int = 0,
        end: int | None = None,
    ) -> Deferred[None]:
        span = _read_range(entry, start, end)
        if span is None:
            return defer.fail(ValueError(f"bad range {start}-{end}"))
        if not _BODY_REF.match(entry.body_ref):
            return defer.fail(BodyMissing(f"no body for {entry.url}"))
        try:
            fd = os.open(self._body_path(entry.body_ref), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return defer.fail(BodyMissing(f"the body of {entry.url} is gone"))
        pread = partial(os.pread, fd)
        producer = _RangeProducer(
            consumer, pread, partial(os.close, fd), *span, self._clock
        )
        return producer.start()

    def open_writer(self, url: str) -> Deferred[IBodyWriter]:
        if self._closing is not None:
            return defer.fail(StoreFull("the store is closed"))
        name = secrets.token_hex(16)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(os.path.join(self._tmp_dir, name), flags, 0o600)
        except OSError as e:
            return defer.fail(StoreFull(f"cannot store {url}: {e}"))
        writer = _DiskWriter(self, url, name, fd)
        self._writers.add(writer)
        return defer.succeed(writer)

    def update(self, entry: StoredResponse) -> Deferred[StoredResponse]:
        return defer.execute(self._update, entry)

    def _update(self, entry: StoredResponse) -> StoredResponse:
        self._check_open()
        with _transaction(self._db):
            changed = self._db.execute(
                "UPDATE entries SET vary = :vary, status = :status,"
                " headers = :headers, stored_at = :stored_at,"
                " initial_age = :initial_age, last_used = :last_used"
                " WHERE url = :url AND variant = :variant AND body_ref = :body_ref",
                _to_params(entry, self._clock.seconds()),
            ).rowcount
        if not changed:
            raise BodyMissing(f"{entry.url} is no longer stored")
        return entry

    def remove(self, url: str, variant: str | None = None) -> Deferred[int]:
        return defer.execute(self._delete, url, variant)

    def _delete(self, url: str, variant: str | None) -> int:
        self._check_open()
        where, args = "url = ?", [url]
        if variant is not None:
            where, args = "url = ? AND variant = ?", [url, variant]
        with _transaction(self._db):
            sql = f"DELETE FROM entries WHERE {where} RETURNING body_ref"
            refs = [ref for (ref,) in self._db.execute(sql, args).fetchall()]
        for ref in refs:
            _unlink(self._body_path(ref))
        return len(refs)

    def close(self) -> Deferred[None]:
        """Wait for commits in progress, abort other writers, close the index."""
        if self._closed:
            return defer.succeed(None)
        closed: Deferred[None] = Deferred()
        if self._closing is None:
            self._closing = [closed]
            waits = defer.gatherResults(list(self._pending))
            waits.addCallback(lambda _: self._close_now())
        else:
            self._closing.append(closed)
        return closed

    def _close_now(self) -> None:
        try:
            for writer in list(self._writers):
                writer.abort()
            self._db.close()
        finally:
            self._closed = True
            for waiter in self._closing or ():
                waiter.callback(None)


class _transaction:
    """``with _transaction(db):`` runs the block in BEGIN IMMEDIATE/COMMIT."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, value: object, tb: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")


def _open_index(path: str) -> sqlite3.Connection:
    """Open or create ``index.sqlite`` in ``path``; refuse a foreign directory."""
    index = os.path.join(path, _INDEX)
    if not os.path.exists(index):
        foreign = sorted(set(os.listdir(path)) - _OURS)
        if foreign:
            raise CacheDirError(f"{path} holds {foreign[0]!r} but no cache index")
        for suffix in ("-wal", "-shm"):
            _unlink(index + suffix)  # never replay a log into a new index
    db = sqlite3.connect(index, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        tables = {
            n
            for (n,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
            )
        }
        if not tables:
            with _transaction(db):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT INTO meta VALUES ('format', ?)", (_FORMAT,))
        elif "meta" not in tables:
            raise CacheDirError(f"{index} is not a cachingproxy index")
        else:
            row = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            if row is None or row[0] != _FORMAT:
                raise CacheDirError(
                    f"{index} has format {row and row[0]!r}, not {_FORMAT}"
                )
    except sqlite3.DatabaseError as e:
        db.close()
        raise CacheDirError(f"{index} is not a usable index: {e}") from e
    except BaseException:
        db.close()
        raise
    return db


__all__ = ["CacheDirError", "DiskStore"]
