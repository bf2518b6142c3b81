"""Request heads around the lean hit path's boundary, and the harness that
feeds them to a real proxy with and without its memo
(``tests/test_quick_diff.py``).

The heads are built from templates naming a stored URL (``{O}`` is the
origin's port, ``{P}`` the proxy's), then varied: case, spacing, duplicate
and foreign fields, obs-fold, bare CR or LF, other versions, absolute-form
targets, long lines, too many fields, pipelined pairs and cuts across
packets.  Most variations keep the head one that the request path answers
with a hit, so that the memo is asked often.
"""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import strategies as st
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from cachingproxy.front.channel import ProxySite
from cachingproxy.front.quick import CONDITIONS, IGNORED_ON_HIT

_SOMETIMES = st.sampled_from([False] * 5 + [True])
"""Odd one time in six (and plain when shrunk)."""

KEYS = [
    ("http://127.0.0.1:{O}/f.whl", "127.0.0.1:{O}"),  # forward
    ("http://127.0.0.1:{O}/g.whl", "localhost:{P}"),
    ("/f.whl", "127.0.0.1:{O}"),  # transparent
    ("/m/f.whl", "localhost:{P}"),  # mirrored
    ("/m/g.whl", "127.0.0.1:{P}"),
    ("/m/f.whl", "cachingproxy.test:{P}"),
    ("/nothing", "localhost:{P}"),  # the proxy's own 404
]
"""Targets and Hosts of stored hits (and of one own page)."""
HOSTS = sorted({host for _, host in KEYS})
_TARGET_ODDITIES = [
    "#frag",
    "?",
    "?a=1",
    "%41",
    "/",
    "/.",
    "//",
    " ",
    "\t",
    "\x7f",
    "\xff",
    "\x00",
    "\\",
    "x" * 9000,
]
_HOST_ODDITIES = [
    "LOCALHOST:{P}",
    "127.0.0.1:{O} ",
    " 127.0.0.1:{O}",
    "127.0.0.1:{O}.",
    "127.0.0.1:{O}\x7f",
    "127.0.0.1:{O}\xff",
    "127.0.0.1:{O}\x00",
    "user@127.0.0.1:{O}",
    "127.0.0.1:{O}, localhost:{P}",
    "localhost:{P}:{P}",
    "",
]
FIELDS = sorted(n.decode() for n in IGNORED_ON_HIT | CONDITIONS if n != b"host")
_FOREIGN = [
    "Range",
    "If-Match",
    "If-Range",
    "Cache-Control",
    "Pragma",
    "Via",
    "Content-Length",
    "Transfer-Encoding",
    "Expect",
    "Proxy-Authorization",
    "Authorization",
    "Cookie",
    "X-Foo",
    "Upgrade",
    "TE",
    "Hostx",
    "Host ",
    " Host",
    "Ho st",
    "Accept\x00",
]
_VALUES = [
    '"v1"',
    'W/"v1", "v0"',
    "*",
    "Fri, 01 Jan 2100 00:00:00 GMT",
    "Thu, 01 Jan 1970 00:00:00 GMT",
    "*/*",
    "gzip, deflate",
    "pip/24.0",
    "keep-alive",
    "Keep-Alive",
    "close",
    "keep-alive, close",
    "Upgrade",
    "0",
    "chunked",
    "bytes=0-1",
    "no-cache",
    "1.1 localhost (cachingproxy/0.1.0)",
    "",
    " padded ",
    "tab\there",
    "\x7f",
    "\xff\xfe",
    "\x00",
    "a\rb",
    "v" * 9000,
]
_VERSIONS = ["HTTP/1.0", "HTTP/1.2", "http/1.1", "HTTP/1.1 ", "HTTP/2.0", ""]
_METHODS = ["HEAD", "get", "POST", "OPTIONS", "GET\t", "GE", "GET GET"]
_ENDS = ["\n", "\r", "\r\r\n", " \r\n", "\n\r"]


def _case(draw: st.DrawFn, name: str) -> str:
    how = draw(st.sampled_from(["same", "same", "lower", "upper", "swap"]))
    return {
        "same": name,
        "lower": name.lower(),
        "upper": name.upper(),
        "swap": name.swapcase(),
    }[how]


@st.composite
def heads(draw: st.DrawFn) -> str:
    """One request head (a template: ``{O}`` and ``{P}`` are filled in)."""

    def odd() -> bool:
        return draw(_SOMETIMES)

    method = draw(st.sampled_from(_METHODS)) if odd() else "GET"
    target, host = draw(st.sampled_from(KEYS))
    if odd():
        oddity = draw(st.sampled_from(_TARGET_ODDITIES))
        target = draw(st.sampled_from([target + oddity, oddity + target]))
    if odd() and target.startswith("http://"):
        target = "HTTP://" + target[len("http://") :]
    version = draw(st.sampled_from(_VERSIONS)) if odd() else "HTTP/1.1"
    lines = [f"{method} {target} {version}"]
    fields: list[str] = []
    if odd():
        host = draw(st.sampled_from(_HOST_ODDITIES))
    sep = draw(st.sampled_from([": ", ":", ":\t", ":  ", " : "])) if odd() else ": "
    if not (odd() and odd()):
        fields.append(f"{_case(draw, 'Host')}{sep}{host}")
    if odd() and odd():
        fields.append(f"Host: {draw(st.sampled_from(HOSTS))}")  # a second Host
    for _ in range(draw(st.integers(0, 5))):
        name = (
            draw(st.sampled_from(_FOREIGN)) if odd() else draw(st.sampled_from(FIELDS))
        )
        value = draw(st.sampled_from(_VALUES)) if odd() else "x"
        if name.lower() == "connection" and not odd():
            value = "keep-alive"
        fields.append(f"{_case(draw, name)}: {value}")
        if odd() and odd():
            fields.append(draw(st.sampled_from([" folded", "\tfolded", " "])))
    if odd():
        # About the field limit (100) of the request path.
        count = draw(st.integers(95, 110))
        fields += [f"{draw(st.sampled_from(FIELDS))}: a"] * count
    draw(st.randoms()).shuffle(fields)
    lines += fields
    ends = ["\r\n"] * (len(lines) + 1)
    if odd() and odd():
        ends[draw(st.integers(0, len(ends) - 1))] = draw(st.sampled_from(_ENDS))
    head = "".join(line + end for line, end in zip(lines, ends, strict=False))
    return head + ends[-1]


@st.composite
def conversations(draw: st.DrawFn) -> list[str]:
    """Packets on one connection (templates): heads, each sent whole most
    of the time; sometimes two in one packet, a head cut in two, or an
    empty line before a head."""
    packets: list[str] = []
    for head in draw(st.lists(heads(), min_size=1, max_size=4)):
        how = draw(
            st.sampled_from(["whole"] * 4 + ["cut", "join", "crlf", "crlf", "trailing"])
        )
        if how == "cut" and len(head) > 1:
            at = draw(st.integers(1, len(head) - 1))
            packets += [head[:at], head[at:]]
        elif how == "join" and packets:
            packets[-1] += head
        elif how == "crlf":
            packets += ["\r\n", head]
        elif how == "trailing":
            packets.append(head + "\r\n")
        else:
            packets.append(head)
    return packets


# -- the harness ----------------------------------------------------------------


class PlainTCP(StringTransport, tcp.Connection):
    """A StringTransport that the proxy takes for a plain TCP connection
    (what the lean hit path serves), without a socket: writes are kept."""

    socket = None
    connected = 0  # send_now writes through the transport

    def setTcpNoDelay(self, enabled: bool) -> None:  # noqa: N802
        pass


@attrs.frozen
class Outcome:
    """What one connection got: the bytes (``Age`` and ``Date`` lines
    dropped), whether it was closed, the timers left and the records."""

    output: bytes
    closed: bool
    timers: tuple[tuple[float, str], ...]
    records: tuple[tuple[Any, ...], ...]


def without_clock_fields(raw: bytes) -> bytes:
    """``raw`` without ``Age:`` and ``Date:`` lines (they depend on when)."""
    lines = raw.split(b"\r\n")
    return b"\r\n".join(
        line for line in lines if not line.lower().startswith((b"age: ", b"date: "))
    )


def converse(
    site: ProxySite,
    packets: list[bytes],
    local: tuple[str, int],
    records: list[tuple[Any, ...]],
) -> Outcome:
    """Send ``packets`` (one ``dataReceived`` each) on a fresh connection
    from 127.0.0.1 to ``site``; what came of it."""
    clock = Clock()
    transport = PlainTCP(
        hostAddress=IPv4Address("TCP", *local),
        peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
    )
    channel: Any = site.buildProtocol(transport.getPeer())
    channel.callLater = clock.callLater
    del records[:]
    channel.makeConnection(transport)
    for packet in packets:
        if transport.disconnecting:
            break
        channel.dataReceived(packet)
    timers = tuple(
        sorted(
            (c.getTime(), getattr(c.func, "__name__", repr(c.func)))
            for c in clock.getDelayedCalls()
        )
    )
    closed = bool(transport.disconnecting)
    output = transport.value()
    channel.connectionLost(Failure(ConnectionDone()))
    return Outcome(without_clock_fields(output), closed, timers, tuple(records))


# -- what twisted.web makes of a head -------------------------------------------


class Recorder(Resource):
    """Records each request it gets and answers 200."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]]]] = []

    def render(self, request: Request) -> bytes:
        fields = [
            (name, value)
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        ]
        self.seen.append((request.method, request.uri, request.clientproto, fields))
        return b""


def parsed(data: bytes) -> tuple[Recorder, bytes, bool]:
    """Feed ``data`` to a real Channel of a ProxySite whose resource
    records requests: the recorder, the output and whether the channel
    closed."""
    recorder = Recorder()
    site = ProxySite(recorder)
    clock = Clock()
    site.reactor = clock  # type: ignore[assignment]
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 3128),
        peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
    )
    channel: Any = site.buildProtocol(transport.getPeer())
    channel.callLater = clock.callLater
    channel.makeConnection(transport)
    channel.dataReceived(data)
    closed = bool(transport.disconnecting)
    output = transport.value()
    channel.connectionLost(Failure(ConnectionDone()))
    return recorder, output, closed


def fill(template: str, origin: int, proxy: int) -> bytes:
    return (
        template.replace("{O}", str(origin))
        .replace("{P}", str(proxy))
        .encode("latin-1")
    )


__all__ = [
    "Outcome",
    "PlainTCP",
    "Recorder",
    "conversations",
    "converse",
    "fill",
    "heads",
    "parsed",
    "without_clock_fields",
]
