"""The writer of :class:`~cachingproxy.cache.store.disk.DiskStore`: a body in ``tmp/``.

The writer never sees the store: it is handed an :class:`IBodyCommitter`,
the few things it needs to make a body part of the cache.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from cachingproxy.cache.entry import StoredResponse
from cachingproxy.cache.store.index import unlink_quietly
from cachingproxy.errors import StoreFull
from cachingproxy.interfaces import IBodyWriter, IPartialReader

_T = TypeVar("_T")


class IBodyCommitter(Interface):
    """What a :class:`DiskWriter` needs of its store."""

    max_size = Attribute("int | None: the most body bytes the store may hold.")

    def closing() -> bool:
        """The store is closing: writes and commits fail with ``StoreFull``."""

    def commit(
        entry: StoredResponse,
        move: Callable[[str], None],
        settle: Callable[[object], object],
    ) -> Deferred[StoredResponse]:
        """
        Make ``entry`` part of the cache: run ``move(path)`` in a thread (it
        puts the body at ``path``, the final place for ``entry.body_ref``),
        then record ``entry`` in the index, evicting what the budget needs.
        If either fails, the body at ``path`` is removed.  ``settle`` is
        added to the result (it must pass it on); the store's ``close`` waits
        until it ran.
        """

    def forget(writer: DiskWriter) -> None:
        """``writer`` is committed or aborted: the store's ``close`` need not
        abort it."""


@implementer(IPartialReader)
class FileReader:
    """Reads what a writer has written through a duplicate of its fd."""

    def __init__(self, writer: DiskWriter, fd: int) -> None:
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
class DiskWriter:
    """A body being written to ``tmp/``; moved into ``bodies/`` on commit."""

    def __init__(
        self, committer: IBodyCommitter, url: str, tmp_dir: str, name: str, fd: int
    ) -> None:
        self.bytes_written = 0
        self._committer = committer
        self._url = url
        self._name = name
        self.name = name
        """The body file's name in ``tmp/`` (and, once committed, in
        ``bodies/XX/``): worker processes follow it there (SPEC 11)."""
        self._tmp_path = os.path.join(tmp_dir, name)
        self._fd = fd
        self._hash = hashlib.sha256()
        self._state = "open"  # -> full | committing -> committed | aborted

    @property
    def _ref(self) -> str:
        return f"{self._name[:2]}/{self._name}"

    def write(self, data: bytes) -> None:
        if self._state != "open":
            if self._state == "full" or self._committer.closing():
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
        return FileReader(self, os.dup(self._fd))

    def commit(self, entry: StoredResponse) -> Deferred[StoredResponse]:
        closing = self._committer.closing()
        if self._state != "open" or closing:
            full = self._state == "full" or closing
            error = StoreFull if full else ValueError
            return defer.fail(
                error(f"cannot commit {self._url}: writer is {self._state}")
            )
        max_size = self._committer.max_size
        if max_size is not None and self.bytes_written > max_size:
            self.abort()
            return defer.fail(
                StoreFull(
                    f"cannot store {self._url}: {self.bytes_written} bytes"
                    f" exceed the store's max_size of {max_size}"
                )
            )
        self._state = "committing"
        stored = entry.replace(
            size=self.bytes_written, digest=self._hash.hexdigest(), body_ref=self._ref
        )
        return self._committer.commit(stored, self._sync_and_move, self._settle)

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

    def _settle(self, result: _T) -> _T:
        if isinstance(result, Failure):
            self._state = "aborted"
            unlink_quietly(self._tmp_path)
        return self._close_fd(result)

    def _close_fd(self, result: _T) -> _T:
        if self._state == "committing":
            self._state = "committed"
        self._committer.forget(self)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        return result

    def abort(self) -> Deferred[None]:
        if self._state in ("open", "full"):
            self._state = "aborted"
            self._close_fd(None)
            unlink_quietly(self._tmp_path)
        return defer.succeed(None)


__all__ = ["DiskWriter", "FileReader", "IBodyCommitter"]
