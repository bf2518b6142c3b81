"""A cache store on a local directory: an SQLite index plus one file per body.

The layout and the SQL are in :mod:`cachingproxy.cache.store.index`.  A body is
fsynced and renamed into ``bodies/`` before its index row is committed, and an
old body is unlinked only after the row replacing it is committed, so after a
crash no row points at a partial body; whatever a crash leaves behind is swept
by :meth:`DiskStore.open`.

Uses of entries (:meth:`DiskStore.touch`) are kept in memory and written in
one statement every :data:`FLUSH_INTERVAL` seconds, before an eviction and on
close, so a hit costs no write.  With ``max_size``, a commit that would take
the bodies past it first evicts the least recently used entries down to
:data:`LOW_WATER` of it, sparing bodies that are being read; when only those
could have made room, the budget is restored as soon as the last of their
reads ends.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections import Counter
from collections.abc import Callable
from functools import partial

from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IReactorFDSet,
    IReactorThreads,
    IReactorTime,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cachingproxy.cache.entry import StoredResponse, Usage
from cachingproxy.cache.store._diskwriter import DiskWriter, IBodyCommitter
from cachingproxy.cache.store._producer import produce, read_range
from cachingproxy.cache.store._recent import RecentLookups
from cachingproxy.cache.store._sendfile import (
    SENDFILE_MIN,
    Sendfile,
    socket_of,
    write_whole,
)
from cachingproxy.cache.store.index import (
    BODY_REF,
    Body,
    CacheDirError,
    Candidate,
    Index,
    unlink_quietly,
)
from cachingproxy.errors import BodyMissing, StoreFull
from cachingproxy.interfaces import IBodyWriter, ICacheStore, IKnownLookups

_log = Logger()

FLUSH_INTERVAL = 5.0
"""Seconds between writes of batched uses (and re-reads of the totals)."""

LOW_WATER = 0.9
"""Eviction frees bodies until they take at most this share of ``max_size``."""


@implementer(ICacheStore, IKnownLookups)
class DiskStore:
    """Cached responses in a directory; use :meth:`open` to make one."""

    def __init__(
        self, index: Index, reactor: IReactorThreads, max_size: int | None = None
    ) -> None:
        self.path = index.path
        self.max_size = max_size
        self._index = index
        self._reactor = reactor
        self._clock = IReactorTime(reactor)
        self._tmp_dir = os.path.join(self.path, "tmp")
        self._writers: set[DiskWriter] = set()
        self._pending: set[Deferred[None]] = set()
        self._closing: list[Deferred[None]] | None = None
        self._closed = False
        self._readers: Counter[str] = Counter()
        """Producers reading each body_ref now; eviction spares those bodies."""
        self._uses: dict[tuple[str, str], float] = {}
        """The latest use of each (url, variant) not yet written to the index."""
        self._bytes = 0
        self._entries = 0
        self._data_version = 0
        self._recent = RecentLookups(index.data_version)
        self._flusher = task.LoopingCall(self._flush)
        self._flusher.clock = self._clock
        self._committer = _Committer(self)

    @classmethod
    def open(
        cls,
        path: str,
        reactor: IReactorThreads | None = None,
        *,
        max_size: int | None = None,
        sweep: bool = True,
    ) -> DiskStore:
        """Open (creating if needed) the cache in ``path`` and sweep it.

        ``max_size`` bounds the bytes of stored bodies (None: no bound).
        Without ``sweep`` nothing is deleted: other processes (workers) may
        be writing bodies in ``tmp/``.

        @raise CacheDirError: ``path`` holds something else.
        """
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = IReactorThreads(global_reactor)
        index = Index.open(path)
        store = cls(index, reactor, max_size)
        try:
            os.makedirs(store._tmp_dir, exist_ok=True)
            os.makedirs(index.bodies_dir, exist_ok=True)
            if sweep:
                store._sweep()
            store._reread_totals()
        except BaseException:
            index.close()
            raise
        store._flusher.start(FLUSH_INTERVAL, now=False).addErrback(
            lambda f: _log.failure("the index flusher stopped", f)
        )
        return store

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"the store in {self.path} is closed")

    def _body_path(self, ref: str) -> str:
        return self._index.body_path(ref)

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
        for shard in os.scandir(self._index.bodies_dir):
            if shard.is_dir(follow_symlinks=False):
                for item in os.scandir(shard.path):
                    if item.is_file(follow_symlinks=False):
                        on_disk[f"{shard.name}/{item.name}"] = item.stat().st_size
        live: set[str] = set()
        dead: list[int] = []
        for rowid, body in self._index.rows():
            if on_disk.get(body.ref) == body.size:
                live.add(body.ref)
            else:
                dead.append(rowid)
        self._index.delete_rowids(dead)
        orphans = [ref for ref in on_disk if ref not in live]
        for ref in orphans:
            unlink_quietly(os.path.join(self._index.bodies_dir, ref))
        if temps or orphans or dead:
            _log.info(
                "Swept {path}: {temps} temporary files, {orphans} orphan bodies, "
                "{rows} index rows without a complete body",
                path=self.path,
                temps=temps,
                orphans=len(orphans),
                rows=len(dead),
            )

    # -- usage and eviction ----------------------------------------------------

    def usage(self) -> Usage:
        return Usage(bytes=self._bytes, entries=self._entries, max_size=self.max_size)

    def touch(self, entry: StoredResponse) -> None:
        if not self._closed:
            self._uses[(entry.url, entry.variant)] = self._clock.seconds()

    def _reread_totals(self) -> None:
        """Take the counters from the index (which another process may change)."""
        self._data_version = self._index.data_version()
        self._entries, self._bytes = self._index.counts()

    def _write_uses(self) -> None:
        """Write the batched uses in one statement."""
        if self._uses:
            self._index.touch(
                (t, url, variant) for (url, variant), t in self._uses.items()
            )
            self._uses.clear()

    def _flush(self) -> None:
        """Periodically: write uses, re-read the totals, evict if over budget."""
        try:
            self._write_uses()
            if self._index.data_version() != self._data_version:
                self._reread_totals()
            self._evict_if_over()
        except sqlite3.Error as e:
            _log.warn("Cannot update the index of {path}: {e}", path=self.path, e=e)

    def _evict_if_over(self) -> None:
        """Evict down to :data:`LOW_WATER` if the bodies are over ``max_size``
        (a commit may pass it while the only bodies that could make room are
        being read)."""
        if self.max_size is not None and self._bytes > self.max_size:
            with self._index.transaction():
                victims = self._choose_victims(None)
            self._evicted(victims)

    def _read_ended(self) -> None:
        """The last reader of a body is done: restore the budget now rather
        than at the next flush, so it holds whenever nothing is being read."""
        if self._closed or self.max_size is None or self._bytes <= self.max_size:
            return
        try:
            self._evict_if_over()
        except sqlite3.Error as e:
            _log.warn("Cannot evict from {path}: {e}", path=self.path, e=e)

    def _choose_victims(self, incoming: StoredResponse | None) -> list[Candidate]:
        """Within a transaction: drop LRU rows so ``incoming`` fits under max_size.

        Leaves the bodies to :meth:`_evicted`.  Rows of bodies being read, and
        the row ``incoming`` replaces, are spared.
        """
        assert self.max_size is not None
        self._write_uses()
        self._reread_totals()
        used, key = self._bytes, None
        if incoming is not None:
            key = (incoming.url, incoming.variant)
            used += incoming.size - sum(
                e.size
                for e in self._index.lookup(incoming.url)
                if e.variant == incoming.variant
            )
        if used <= self.max_size:
            return []
        target = int(self.max_size * LOW_WATER)
        victims: list[Candidate] = []
        for candidate in self._index.least_recently_used():
            if used <= target:
                break
            if (candidate.url, candidate.variant) == key or self._readers[
                candidate.body.ref
            ]:
                continue
            victims.append(candidate)
            used -= candidate.body.size
        self._index.delete_rowids(c.rowid for c in victims)
        return victims

    def _evicted(self, victims: list[Candidate]) -> None:
        """After the commit: count and unlink the bodies of evicted rows."""
        if not victims:
            return
        self._recent.clear()
        freed = sum(c.body.size for c in victims)
        self._entries -= len(victims)
        self._bytes -= freed
        self._index.unlink_bodies(c.body for c in victims)
        _log.info(
            "Evicted {count} entries ({bytes} bytes) from {path} to stay within"
            " {max_size} bytes",
            count=len(victims),
            bytes=freed,
            path=self.path,
            max_size=self.max_size,
        )

    def _removed(self, bodies: list[Body]) -> int:
        """Count and unlink the bodies of removed rows."""
        self._recent.clear()
        self._entries -= len(bodies)
        self._bytes -= sum(b.size for b in bodies)
        self._index.unlink_bodies(bodies)
        return len(bodies)

    # -- ICacheStore -----------------------------------------------------------

    def _insert(self, entry: StoredResponse) -> StoredResponse:
        """Commit ``entry``'s row (evicting if needed), then drop replaced bodies."""
        self._recent.forget(entry.url)
        victims: list[Candidate] = []
        with self._index.transaction():
            if self._index.data_version() != self._data_version:
                self._reread_totals()  # another process (worker) committed
            over = self.max_size is not None and (
                self._bytes + entry.size > self.max_size
            )
            if over:
                victims = self._choose_victims(entry)
            old = self._index.insert(entry, self._clock.seconds())
        self._bytes += entry.size
        if old is None:
            self._entries += 1
        else:
            self._bytes -= old.size
            if old.ref != entry.body_ref:
                self._index.unlink_bodies([old])
        self._evicted(victims)
        return entry

    def lookup(self, url: str) -> Deferred[list[StoredResponse]]:
        return defer.execute(self._select, url)

    def _select(self, url: str) -> list[StoredResponse]:
        self._check_open()
        entries = self._recent.get(url)
        if entries is None:
            entries = self._index.lookup(url)
            self._recent.put(url, entries)
        return entries

    def known(self, url: str) -> list[StoredResponse] | None:
        if self._closed:
            return None
        return self._recent.get(url)

    def read(
        self,
        entry: StoredResponse,
        consumer: IConsumer,
        start: int = 0,
        end: int | None = None,
    ) -> Deferred[None]:
        span = read_range(entry, start, end)
        if span is None:
            return defer.fail(ValueError(f"bad range {start}-{end}"))
        ref = entry.body_ref
        if not BODY_REF.match(ref):
            return defer.fail(BodyMissing(f"no body for {entry.url}"))
        try:
            fd = os.open(self._body_path(ref), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return defer.fail(BodyMissing(f"the body of {entry.url} is gone"))
        first, stop = span
        if stop - first < SENDFILE_MIN:
            # Small: one read and one write, no producer to set up.
            try:
                data = os.pread(fd, stop - first, first)
            except OSError as e:
                return defer.fail(BodyMissing(f"cannot read body: {e}"))
            finally:
                os.close(fd)
            if len(data) != stop - first:
                return defer.fail(BodyMissing("body is truncated"))
            return write_whole(consumer, data)
        self._readers[ref] += 1

        def release() -> None:
            os.close(fd)
            self._readers[ref] -= 1
            if not self._readers[ref]:
                del self._readers[ref]
                self._read_ended()

        transport = socket_of(consumer)
        if transport is not None and IReactorFDSet.providedBy(self._reactor):
            fdset = IReactorFDSet(self._reactor)
            return Sendfile(fdset, consumer, transport, fd, release, *span).start()
        return produce(consumer, partial(os.pread, fd), release, *span, self._clock)

    def open_writer(self, url: str) -> Deferred[IBodyWriter]:
        if self._closing is not None:
            return defer.fail(StoreFull("the store is closed"))
        name = secrets.token_hex(16)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(os.path.join(self._tmp_dir, name), flags, 0o600)
        except OSError as e:
            return defer.fail(StoreFull(f"cannot store {url}: {e}"))
        writer = DiskWriter(self._committer, url, self._tmp_dir, name, fd)
        self._writers.add(writer)
        return defer.succeed(writer)

    def update(self, entry: StoredResponse) -> Deferred[StoredResponse]:
        return defer.execute(self._update, entry)

    def _update(self, entry: StoredResponse) -> StoredResponse:
        self._check_open()
        self._recent.forget(entry.url)
        if not self._index.update(entry, self._clock.seconds()):
            raise BodyMissing(f"{entry.url} is no longer stored")
        return entry

    def remove(self, url: str, variant: str | None = None) -> Deferred[int]:
        return defer.execute(self._delete, url, variant)

    def _delete(self, url: str, variant: str | None) -> int:
        self._check_open()
        return self._removed(self._index.delete(url, variant))

    def remove_prefix(self, prefix: str) -> Deferred[int]:
        return defer.execute(self._delete_prefix, prefix)

    def _delete_prefix(self, prefix: str) -> int:
        self._check_open()
        return self._removed(self._index.delete_prefix(prefix))

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
            if self._flusher.running:
                self._flusher.stop()
            for writer in list(self._writers):
                writer.abort()
            try:
                self._write_uses()
            except sqlite3.Error as e:
                _log.warn("Cannot record uses in {path}: {e}", path=self.path, e=e)
            self._index.close()
        finally:
            self._closed = True
            for waiter in self._closing or ():
                waiter.callback(None)


@implementer(IBodyCommitter)
class _Committer:
    """What the store's writers may do to it: commit bodies, nothing else."""

    def __init__(self, store: DiskStore) -> None:
        self._store = store

    @property
    def max_size(self) -> int | None:
        return self._store.max_size

    def closing(self) -> bool:
        return self._store._closing is not None

    def commit(
        self,
        entry: StoredResponse,
        move: Callable[[str], None],
        settle: Callable[[object], object],
    ) -> Deferred[StoredResponse]:
        store = self._store
        path = store._body_path(entry.body_ref)

        def failed(failure: Failure) -> Failure:
            unlink_quietly(path)
            return failure

        moved = store._in_thread(move, path)
        d = moved.addCallback(lambda _: store._insert(entry))
        d.addErrback(failed)
        d.addBoth(settle)
        return store._track(d)

    def forget(self, writer: DiskWriter) -> None:
        self._store._writers.discard(writer)


__all__ = ["FLUSH_INTERVAL", "LOW_WATER", "CacheDirError", "DiskStore"]
