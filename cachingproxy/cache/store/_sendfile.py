"""Serving a large stored body straight to a plain TCP socket.

A client on a plain TCP connection gets a stored body without the bytes
passing through Python objects, one of two ways:

- ``os.sendfile`` (every peer that is not on this host): the kernel copies
  the file from the page cache into the socket -- zero-copy on a real NIC;
- mapped windows (a loopback peer, :func:`way_for`): ``os.write`` from an
  ``mmap`` of a window of the file (:data:`WINDOW` bytes at a time, unmapped
  as soon as it is sent).  On loopback the receiver copies the bytes anyway,
  and a plain write from mapped pages measured nearly twice as fast as
  ``sendfile`` (about 4.5 against 2-3.5 GB/s for one ``curl``).  Mapped
  pages count in the process's resident memory, so at most
  :data:`MAPPED_STREAMS` responses per process hold a window; the others
  use ``sendfile``.  The file's size is checked before each window is
  mapped: touching a mapped page past its end would be a ``SIGBUS``.

Either way the socket is non-blocking; the sender watches a duplicate of its
descriptor for writability (its own registration with the reactor, separate
from the transport's), and sends only once the transport has flushed what
it holds (the response head), so bytes stay in order.

TLS (and anything that is not a plain ``tcp.Connection``) keeps the
producer path: :func:`socket_of` answers None for it.
"""

from __future__ import annotations

import errno
import ipaddress
import mmap
import os
from collections.abc import Callable
from typing import Any, Literal

from twisted.internet import tcp
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IPushProducer,
    IReactorFDSet,
    ISSLTransport,
    IWriteDescriptor,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from cachingproxy.errors import BodyMissing

SENDFILE_MIN = 128 * 1024
"""Bodies (or ranges) smaller than this are read and written in one piece."""

SEND_PER_CALL = 8 * 1024 * 1024
"""At most about this many bytes per writable event (one reactor turn)."""

WINDOW = 2 * 1024 * 1024
"""Bytes of the body file mapped at a time for a loopback peer (measured on
loopback with one ``curl``: 1 MiB windows ~4.0, 2 MiB ~4.6, 4 MiB ~4.3 GB/s;
``MAP_POPULATE`` made it slower)."""

MAPPED_STREAMS = 4
"""At most this many responses per process send from mapped windows at once
(at most ``MAPPED_STREAMS * WINDOW`` bytes mapped); the others use sendfile."""

SENDFILE: Literal["sendfile"] = "sendfile"
MAPPED: Literal["mapped"] = "mapped"
Way = Literal["sendfile", "mapped"]


def way_for(host: str) -> Way:
    """How to send a body to the peer at ``host`` (its IP address as text):
    :data:`MAPPED` for a loopback peer (127.0.0.0/8, ``::1``,
    ``::ffff:127.x.y.z``), where the receiver copies anyway; :data:`SENDFILE`
    for every other peer (and anything that is not an IP address)."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return SENDFILE
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return MAPPED if ip.is_loopback else SENDFILE


class _Slots:
    """How many responses of this process hold mapped windows."""

    def __init__(self) -> None:
        self.used = 0

    def take(self) -> bool:
        if self.used >= MAPPED_STREAMS:
            return False
        self.used += 1
        return True

    def give(self) -> None:
        self.used -= 1


MAPPED_NOW = _Slots()
"""The process's mapped streams (one event loop: no lock)."""


class _Windows:
    """Mapped windows over the bytes before ``end`` of the file ``body``,
    one at a time, each mapped when first needed and unmapped by
    :meth:`close` (the sender closes each as soon as it is sent)."""

    def __init__(self, body: int, end: int) -> None:
        self._body = body
        self._end = end
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._base = 0
        self.mapped = 0
        """How many windows were mapped (tests count them)."""

    def part(self, offset: int) -> memoryview:
        """The mapped bytes from ``offset`` to the end of its window (the
        caller releases the view).  Raises ``BodyMissing`` where the file is
        shorter than the window, OSError where it cannot be mapped."""
        if self._view is None or offset >= self.stop:
            self.close()
            self._open(offset)
        assert self._view is not None
        return self._view[offset - self._base :]

    @property
    def stop(self) -> int:
        """Where the mapped window ends (its start where none is mapped)."""
        return self._base + (0 if self._view is None else len(self._view))

    def _open(self, offset: int) -> None:
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        length = min(WINDOW, self._end - base)
        # Before mapping: a page past the end of the file is a SIGBUS.
        if os.fstat(self._body).st_size < base + length:
            raise BodyMissing("body is truncated")
        self._map = mmap.mmap(self._body, length, prot=mmap.PROT_READ, offset=base)
        self._view = memoryview(self._map)
        self._base = base
        self.mapped += 1

    def close(self) -> None:
        """Unmap the window (its view first: a view holds the mapping)."""
        if self._view is not None:
            self._base += len(self._view)
            self._view.release()
            self._view = None
        if self._map is not None:
            self._map.close()
            self._map = None


def socket_of(consumer: object) -> tcp.Connection | None:
    """The plain TCP transport under ``consumer`` (a twisted.web request that
    has not written yet and has a ``Content-Length``, so its body goes out
    as is, not chunked), or None where sendfile cannot be used."""
    channel = getattr(consumer, "channel", None)
    transport = getattr(channel, "transport", None)
    headers = getattr(consumer, "responseHeaders", None)
    if (
        not isinstance(transport, tcp.Connection)
        or getattr(transport, "TLS", False)
        or ISSLTransport.providedBy(transport)
        or getattr(consumer, "startedWriting", True)
        or headers is None
        or not headers.hasHeader(b"content-length")
        or not transport.connected
        or transport.disconnecting
        or _pending(transport) is None
    ):
        return None
    return transport


@implementer(IPushProducer)
class _Whole:
    """The producer of a body written in one piece: it only hears a stop."""

    stopped = False

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        self.stopped = True


def write_whole(consumer: IConsumer, data: bytes) -> Deferred[None]:
    """Write a small body in one ``write`` (with a producer registered
    around it, as the store's ``read`` promises)."""
    producer = _Whole()
    consumer.registerProducer(producer, True)
    consumer.write(data)
    if producer.stopped:
        return fail(ConnectionDone("the consumer stopped reading"))
    consumer.unregisterProducer()
    return succeed(None)


def _pending(transport: Any) -> int | None:
    """Bytes the transport still holds in user space (None: cannot tell)."""
    try:
        held = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    except (AttributeError, TypeError):
        return None
    return held if isinstance(held, int) else None


@implementer(IPushProducer, IWriteDescriptor)
class Sendfile:
    """Sends ``[start, end)`` of the file ``body`` to ``consumer``'s socket.

    ``consumer`` is a twisted.web request whose head is set; this registers
    as its (push) producer, writes the head, then sends the range whenever
    the socket is writable, honouring pauses: with ``os.sendfile``, or from
    mapped windows of the file for a loopback peer (:func:`way_for`, while
    the process has a free slot).  ``release`` is called once at the end.
    :meth:`start` fires when the range was sent, or fails with
    ``BodyMissing`` (the file is shorter) or ``ConnectionDone``.
    """

    def __init__(
        self,
        reactor: IReactorFDSet,
        consumer: IConsumer,
        transport: tcp.Connection,
        body: int,
        release: Callable[[], None],
        start: int,
        end: int,
    ) -> None:
        self._reactor = reactor
        self._consumer = consumer
        self._transport = transport
        self._body = body
        self._release = release
        self._offset = start
        self._end = end
        self._fd = -1
        self._writing = False
        self._paused = False
        self._done = False
        self._windows: _Windows | None = None
        self._deferred: Deferred[None] = Deferred()

    @property
    def way(self) -> Way:
        """How the rest of the body goes out."""
        return SENDFILE if self._windows is None else MAPPED

    def start(self) -> Deferred[None]:
        peer = getattr(self._transport.getPeer(), "host", "")
        if way_for(peer) == MAPPED and MAPPED_NOW.take():
            self._windows = _Windows(self._body, self._end)
        try:
            self._fd = os.dup(self._transport.fileno())
        except OSError as e:  # EMFILE: give back what was taken
            self._finish(e, unregister=False)
            return self._deferred
        self._consumer.registerProducer(self, True)
        self._consumer.write(b"")  # the response head, through the transport
        if not self._done:
            self._watch(True)
        return self._deferred

    # -- IPushProducer ---------------------------------------------------------

    def pauseProducing(self) -> None:  # noqa: N802
        self._paused = True
        self._watch(False)

    def resumeProducing(self) -> None:  # noqa: N802
        self._paused = False
        self._watch(True)

    def stopProducing(self) -> None:  # noqa: N802
        self._finish(ConnectionDone("the client went away"), unregister=False)

    # -- IWriteDescriptor ------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:  # noqa: N802
        return "Sendfile"

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        # The reactor gave up on our descriptor (an error, or its shutdown).
        self._writing = False
        self._finish(ConnectionDone(str(reason.value)), unregister=True)

    def doWrite(self) -> None:  # noqa: N802
        if self._done or self._paused:
            return
        if _pending(self._transport):
            return  # the head first: the transport sends it in this turn
        try:
            if self._windows is None:
                self._send_file()
            else:
                self._send_mapped(self._windows)
        except BlockingIOError:
            return  # the socket is full: the next writable event goes on
        except BodyMissing as e:
            self._finish(e, unregister=True)
            return
        except OSError as e:
            self._finish(ConnectionDone(f"{self.way}: {e}"), unregister=True)
            return
        if self._offset >= self._end:
            self._finish(None, unregister=True)

    # -- internals -------------------------------------------------------------

    def _send_file(self) -> None:
        count = min(self._end - self._offset, SEND_PER_CALL)
        sent = os.sendfile(self._fd, self._body, self._offset, count)
        if sent == 0:
            raise BodyMissing("body is truncated")
        self._count(sent)

    def _send_mapped(self, windows: _Windows) -> None:
        """Write from mapped windows as much as the socket takes (up to
        about ``SEND_PER_CALL``), unmapping each window once it is sent."""
        budget = SEND_PER_CALL
        while budget > 0 and self._offset < self._end:
            try:
                part = windows.part(self._offset)
            except OSError:
                # Cannot map (address space, a file that does not map):
                # sendfile sends the rest.
                self._unmap()
                return self._send_file()
            with part:
                try:
                    sent = os.write(self._fd, part)
                except OSError as e:
                    if e.errno == errno.EFAULT:
                        # The file was cut under the window: the kernel
                        # cannot read its pages past the end (no SIGBUS in
                        # a system call), as sendfile would send nothing.
                        raise BodyMissing("body is truncated") from None
                    raise
                wanted = len(part)
            self._count(sent)
            budget -= sent
            if self._offset >= windows.stop:
                windows.close()
            if sent < wanted:
                return  # the socket took what it could

    def _count(self, sent: int) -> None:
        self._offset += sent
        # What the access log counts (twisted.web's request.write does it).
        request: Any = self._consumer
        request.sentLength = getattr(request, "sentLength", 0) + sent

    def _unmap(self) -> None:
        if self._windows is not None:
            self._windows.close()
            self._windows = None
            MAPPED_NOW.give()

    def _watch(self, on: bool) -> None:
        if on and not self._writing and not self._done:
            self._reactor.addWriter(self)
            self._writing = True
        elif not on and self._writing:
            self._reactor.removeWriter(self)
            self._writing = False

    def _finish(self, error: Exception | None, unregister: bool) -> None:
        if self._done:
            return
        self._done = True
        self._watch(False)
        self._unmap()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._release()
        if unregister:
            self._consumer.unregisterProducer()
        if error is None:
            self._deferred.callback(None)
        else:
            self._deferred.errback(error)


__all__ = [
    "MAPPED",
    "MAPPED_NOW",
    "MAPPED_STREAMS",
    "SENDFILE",
    "SENDFILE_MIN",
    "SEND_PER_CALL",
    "WINDOW",
    "Sendfile",
    "socket_of",
    "way_for",
    "write_whole",
]
