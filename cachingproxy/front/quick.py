"""The lean front for repeat hits: a lone, plain ``GET`` head recognised
without twisted.web's request machinery.

A client that fetches the same stored files again and again (a CI farm
restoring its wheels) sends heads with nothing in them that a hit depends
on.  :func:`simple_get` recognises exactly those — one complete
``GET … HTTP/1.1`` (or ``HTTP/1.0``) head whose fields are all in
:data:`IGNORED_ON_HIT` or :data:`CONDITIONS` — so the channel can ask the
proxy's :class:`~cachingproxy.interfaces.IQuickHits` for the stored answer,
and :func:`framed` puts it in the request's version with the connection's
fate.  Anything else (a header a hit depends on, a second request in the
same bytes, an odd byte, too many fields) answers None and goes through the
full parser with all of SPEC 8's checks.

:func:`send_now` writes an answer straight to an idle socket, sparing the
reactor a round of write-readiness for a response that fits the socket
buffer.
"""

from __future__ import annotations

import re
from typing import Any

from attrs import frozen
from twisted.internet import tcp
from twisted.internet.interfaces import ISSLTransport

IGNORED_ON_HIT = frozenset(
    {
        b"host",
        b"user-agent",
        b"accept",
        b"accept-encoding",
        b"accept-language",
        b"connection",
        # npm's own fields, sent with every tarball and packument fetch.
        b"npm-command",
        b"npm-session",
        b"npm-scope",
        b"npm-auth-type",
        b"npm-in-ci",
        b"pacote-version",
        b"pacote-req-type",
        b"pacote-pkg-id",
        b"pacote-integrity",
        b"referer",
    }
)
"""Request fields that no decision about a stored response without
``Vary`` reads: a head with only these may be answered from the memo.
(``Accept-Encoding`` selects a variant only through ``Vary``; entries with
``Vary`` are never answered quickly.)"""

CONDITIONS = frozenset({b"if-none-match", b"if-modified-since"})
"""Conditional fields (at most once each) that a hit answers by itself: a
``304`` when the stored entry satisfies them, else the whole body."""

MAX_QUICK_HEAD = 8192
"""Longer heads go through the full parser."""

MAX_QUICK_FIELDS = 100
"""Heads with more fields go through the full parser (which refuses more
than its ``maxHeaders`` with 431; the channel passes its own limit)."""

_TARGET = re.compile(rb"(?:/|http://)[\x21-\x7e]*\Z")
"""An origin-form or plain-http absolute-form target of visible ASCII."""

_FIELD_VALUE = re.compile(rb"[\x20-\x7e\t]*\Z")

_CONNECTION = (b"keep-alive", b"close")


@frozen
class SimpleGet:
    """A plain ``GET`` head, as :func:`simple_get` found it."""

    target: bytes
    host: bytes
    version: bytes
    """``HTTP/1.1`` or ``HTTP/1.0``."""
    keep_alive: bool
    """The connection stays open after the answer: HTTP/1.1 unless
    ``Connection: close``; HTTP/1.0 only with ``Connection: keep-alive``."""
    conditions: tuple[tuple[str, str], ...] = ()
    """The head's :data:`CONDITIONS`, as (name, value)."""


def simple_get(data: bytes, max_fields: int = MAX_QUICK_FIELDS) -> SimpleGet | None:
    """The head in ``data`` when it is exactly one complete HTTP/1.1 or
    HTTP/1.0 ``GET`` head with a single ``Host``, at most ``max_fields``
    fields and none outside :data:`IGNORED_ON_HIT` and :data:`CONDITIONS`
    (``Connection`` at most once, ``keep-alive`` or ``close``); None for
    anything else."""
    if (
        len(data) > MAX_QUICK_HEAD
        or not data.startswith(b"GET ")
        or data.find(b"\r\n\r\n") != len(data) - 4
    ):
        return None
    lines = data[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if (
        len(lines) - 1 > max_fields
        or len(parts) != 3
        or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0")
        or not _TARGET.match(parts[1])
    ):
        return None
    host: bytes | None = None
    connection: bytes | None = None
    conditions: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        lname = name.lower()
        if (
            not sep
            or (lname not in IGNORED_ON_HIT and lname not in CONDITIONS)
            or not _FIELD_VALUE.match(value)
        ):
            return None  # also: a name with spaces, obs-fold, a bare CR or LF
        value = value.strip(b" \t")
        if lname in CONDITIONS:
            if any(n == lname.decode() for n, _ in conditions):
                return None
            conditions.append((lname.decode(), value.decode("latin-1")))
        elif lname == b"host":
            if host is not None or not value:
                return None
            host = value
        elif lname == b"connection":
            if connection is not None or value.lower() not in _CONNECTION:
                return None
            connection = value.lower()
    if host is None:
        return None
    version = parts[2]
    if version == b"HTTP/1.1":
        keep_alive = connection != b"close"
    else:
        keep_alive = connection == b"keep-alive"
    return SimpleGet(parts[1], host, version, keep_alive, tuple(conditions))


def framed(head: bytes, body: bytes, get: SimpleGet) -> bytes:
    """The answer to ``get`` on the wire: ``head`` (an ``HTTP/1.1`` status
    line and fields, each ending in CRLF) in the request's version, with a
    ``Connection`` field saying whether the connection stays open."""
    if get.version != b"HTTP/1.1":
        head = get.version + head[len(b"HTTP/1.1") :]
    if not get.keep_alive:
        head += b"Connection: close\r\n"
    elif get.version == b"HTTP/1.0":
        head += b"Connection: keep-alive\r\n"
    return head + b"\r\n" + body


def plain_tcp(transport: Any) -> bool:
    """Whether ``transport`` is a plain TCP connection (not TLS, not a
    tunnel inside one): the only kind answered quickly and written to with
    :func:`send_now`."""
    return (
        isinstance(transport, tcp.Connection)
        and not getattr(transport, "TLS", False)
        and not ISSLTransport.providedBy(transport)
    )


def send_now(transport: tcp.Connection, data: bytes) -> None:
    """Write ``data``: straight to the socket when the transport holds
    nothing yet (what the socket does not take is queued as usual), else
    through the transport."""
    try:
        held = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        idle = held == 0 and transport.connected and not transport.disconnecting
    except AttributeError:  # a Twisted whose internals differ
        idle = False
    if idle:
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # EAGAIN, or an error the transport will report
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


__all__ = [
    "CONDITIONS",
    "IGNORED_ON_HIT",
    "MAX_QUICK_FIELDS",
    "MAX_QUICK_HEAD",
    "SimpleGet",
    "framed",
    "plain_tcp",
    "send_now",
    "simple_get",
]
