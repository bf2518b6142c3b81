"""Hostile-input generators and the harness that feeds them to the real
parser and router (``tests/test_fuzz.py``, ``bench/fuzz.py``).

``feed`` runs bytes through a real ``channel.Channel`` of a ``ProxySite``
whose resource is the real ``Proxy``, on a ``StringTransport`` and a
``task.Clock``; the upstream is a recorder that refuses every request, so
"forwarded" means "the proxy asked its upstream", whatever came of it.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from typing import Any

import attrs
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from cachingproxy.cache.policy import normalize_url
from cachingproxy.cache.store.memory import MemoryStore
from cachingproxy.config import ProxyConfig
from cachingproxy.errors import DestinationRefused
from cachingproxy.front.channel import ProxySite as _QuietSite
from cachingproxy.front.routing import BadRequest, Listener, RouteKind, classify
from cachingproxy.interfaces import IUpstream
from cachingproxy.proxy import Proxy, ProxyResource

PROXY_PORT = 3128
NAMES = ("localhost", "proxy.test")
LISTENER = Listener("127.0.0.1", PROXY_PORT, frozenset(NAMES))

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9]) [^\r\n]*\r\n")


@implementer(IUpstream)
class RecordingUpstream:
    """Records what the proxy asks of its upstream and refuses it all."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def request(
        self,
        method: bytes,
        url: bytes,
        headers: Any,
        body: Any = None,
        *,
        mirrored: bool = False,
    ) -> defer.Deferred[Any]:
        self.calls.append((method.decode("latin-1"), url.decode("latin-1")))
        return defer.fail(DestinationRefused("fuzzing: no upstream"))

    def connect_tcp(
        self, host: str, port: int, factory: Any, ports: frozenset[int]
    ) -> defer.Deferred[Any]:
        self.calls.append(("CONNECT", f"{host}:{port}"))
        return defer.fail(DestinationRefused("fuzzing: no upstream"))


@attrs.frozen
class Fed:
    """What came of feeding one input to the proxy."""

    output: bytes
    forwarded: tuple[tuple[str, str], ...]
    failures: tuple[str, ...]
    """Exceptions logged while it ran (the proxy's 500s log one)."""

    def statuses(self) -> list[int]:
        """Status codes of the responses, in order (1xx included)."""
        found: list[int] = []
        rest = self.output
        while rest:
            m = _STATUS_LINE.match(rest)
            head_end = rest.find(b"\r\n\r\n")
            if m is None or head_end < 0:
                break
            status = int(m.group(1))
            found.append(status)
            head, rest = rest[:head_end], rest[head_end + 4 :]
            if status < 200:
                continue
            length = re.search(rb"(?im)^content-length: *([0-9]+)$", head)
            if length is None:
                break
            rest = rest[int(length.group(1)) :]
        return found

    def problems(self) -> list[str]:
        """Why this outcome is a crash: a logged exception, a 5xx from the
        parser or router (the recorder's refusals are 403s; 508, a loop seen
        in Via, is a deliberate answer), or output that does not start with
        a well-formed status line."""
        found = [f"exception: {f}" for f in self.failures]
        if self.output and not _STATUS_LINE.match(self.output):
            found.append(f"malformed response: {self.output[:120]!r}")
        found += [f"status {s}" for s in self.statuses() if s >= 500 and s != 508]
        return found


def _config() -> ProxyConfig:
    return ProxyConfig(
        listen=(),
        allow_client=(ipaddress.ip_network("127.0.0.0/8"),),
        names=NAMES,
    )


def feed(chunks: list[bytes], *, settle: float = 61.0) -> Fed:
    """Send ``chunks`` (one ``dataReceived`` each) from 127.0.0.1 to a fresh
    proxy, let ``settle`` seconds of its clock pass (the head deadline and
    the idle timeout), then drop the connection."""
    clock = Clock()
    upstream = RecordingUpstream()
    proxy = Proxy(_config(), MemoryStore(), upstream, clock)
    site = _QuietSite(ProxyResource(proxy))
    site.reactor = clock  # type: ignore[assignment]
    failures: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None:
            failure = event["log_failure"]
            failures.append(f"{formatEvent(event)}: {failure.getTraceback()}")

    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", PROXY_PORT),
        peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
    )
    globalLogPublisher.addObserver(observe)
    try:
        channel: Any = site.buildProtocol(transport.getPeer())
        channel.callLater = clock.callLater
        channel.makeConnection(transport)
        for chunk in chunks:
            if transport.disconnecting:
                break
            channel.dataReceived(chunk)
        for _ in range(int(settle)):
            clock.advance(1)
        channel.connectionLost(Failure(ConnectionDone()))
        for _ in range(5):
            clock.advance(60)
    except Exception:
        failures.append(Failure().getTraceback())
    finally:
        globalLogPublisher.removeObserver(observe)
    return Fed(transport.value(), tuple(upstream.calls), tuple(failures))


# -- generators ---------------------------------------------------------------

_TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LATIN1 = st.characters(min_codepoint=0, max_codepoint=255)
_PRINTABLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)

_SOMETIMES = st.sampled_from([False, False, False, False, True])
"""Hostile one time in five (and plain when shrunk)."""
_COMMON_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "CONNECT"]
tokens = st.text(alphabet=_TCHAR, min_size=1, max_size=12)
methods = st.sampled_from(
    ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "CONNECT", "TRACE", "get"]
) | st.text(alphabet=_LATIN1, max_size=8)
hosts = st.sampled_from(
    [
        "origin.test",
        "ORIGIN.test.",
        "127.0.0.1",
        "10.0.0.1",
        "169.254.169.254",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "[zz]",
        "localhost",
        "proxy.test",
        "xn--bcher-kva.test",
        "a..b",
        "-x",
        "",
        "user:pw@origin.test",
        "%2e%2e",
        "a" * 300,
    ]
) | st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True)
ports = st.sampled_from(["", ":80", ":443", ":3128", ":0", ":99999", ":", ":8080"])
paths = st.lists(
    st.sampled_from([*"abc/.%?#&=;~-_09", "%2e", "%00", "%2F", "..", "//", "\\"]),
    max_size=20,
).map(lambda parts: "/" + "".join(parts))
urls = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
    st.sampled_from(["http", "https", "HTTP", "ftp", "http:", "htTp"]),
    hosts,
    ports,
    paths | st.just(""),
)
targets = st.one_of(
    urls,
    paths,
    st.sampled_from(["*", "//x", "http://", "origin.test:443", "[::1]:443", "?"]),
    st.text(alphabet=_LATIN1, max_size=30),
)
versions = st.sampled_from(
    ["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "http/1.1", "HTTP/1.1 ", ""]
)
header_names = (
    st.sampled_from(
        [
            "Host",
            "Content-Length",
            "Transfer-Encoding",
            "Connection",
            "Via",
            "Range",
            "If-None-Match",
            "If-Range",
            "Accept-Encoding",
            "Expect",
            "Proxy-Authorization",
            "Cache-Control",
            "Pragma",
        ]
    )
    | tokens
    | st.text(alphabet=_LATIN1, max_size=10)
)
_GOOD_HOSTS = st.sampled_from(
    ["origin.test", "127.0.0.1", "10.0.0.1", "[::1]", "localhost", "proxy.test"]
)
_GOOD_PORTS = st.sampled_from(["", ":80", ":8080", ":3128", ":443"])
_COMMON_HEADERS = st.sampled_from(
    ["Accept", "Accept-Encoding", "Range", "If-None-Match", "Cache-Control", "Via"]
)
_COMMON_VALUES = st.sampled_from(["*/*", "gzip", "bytes=0-1", '"x"', "no-cache"]) | (
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)
)
header_values = st.sampled_from(
    [
        "origin.test",
        "0",
        "4",
        "-1",
        "chunked",
        "identity",
        "gzip, chunked",
        "close",
        "keep-alive",
        "bytes=0-1",
        "bytes=5-1",
        "100-continue",
        "no-cache",
        "1.1 localhost (cachingproxy/0)",
    ]
) | st.text(alphabet=_LATIN1, max_size=30)
line_ends = st.sampled_from(["\r\n"] * 6 + ["\n", "\r", "\r\r\n", " \r\n"])


@st.composite
def requests(draw: st.DrawFn) -> list[bytes]:
    """Arbitrary request heads (and bodies), cut into chunks at random."""

    def weird() -> bool:
        return draw(_SOMETIMES)

    method = draw(methods if weird() else st.sampled_from(_COMMON_METHODS))
    authority = draw(_GOOD_HOSTS) + draw(_GOOD_PORTS)
    if weird():
        target = draw(targets)
    elif draw(st.booleans()):
        target = (
            f"{draw(st.sampled_from(['http', 'https']))}://{authority}{draw(paths)}"
        )
    else:
        target = draw(paths)
    version = draw(versions) if weird() else "HTTP/1.1"
    end = draw(line_ends) if weird() else "\r\n"
    lines = [f"{method} {target} {version}"]
    if weird():
        lines.append(f"Host: {draw(hosts)}{draw(ports)}")
    elif not weird():
        lines.append(f"Host: {authority}")
    for _ in range(draw(st.integers(0, 8))):
        if weird():
            name, value = draw(header_names), draw(header_values)
        else:
            name, value = draw(_COMMON_HEADERS), draw(_COMMON_VALUES)
        lines.append(f"{name}: {value}")
        if weird() and weird():
            lines.append(draw(st.sampled_from([" folded", "\tfolded", " "])))
    data = (end.join(lines) + end + end).encode("latin-1")
    data += draw(st.binary(max_size=40))
    if draw(st.booleans()):
        data += draw(
            st.sampled_from(
                [b"GET /smuggled HTTP/1.1\r\nHost: origin.test\r\n\r\n", b"0\r\n\r\n"]
            )
        )
    return _chunks(draw, data)


def _chunks(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=4))))
    points = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


_OTHER_HOSTS = ["other.test", "origin.test:81", "127.0.0.2", "proxy.test:3128"]

SHAPES = (
    "two different Content-Lengths",
    "two equal Content-Lengths",
    "Content-Length then Transfer-Encoding",
    "Transfer-Encoding then Content-Length",
    "Transfer-Encoding other than chunked",
    "obs-fold",
    "bare LF",
    "absolute-form with another Host",
    "header line over 16 KiB",
    "head over 16 KiB",
    "too many headers",
    "control character in a value",
)


@st.composite
def smuggling(draw: st.DrawFn) -> tuple[str | None, list[bytes]]:
    """A valid request to http://origin.test/ with one smuggling shape worked
    in (or none: the control case that must be forwarded)."""
    shape = draw(st.sampled_from([None, *SHAPES]))
    method = draw(st.sampled_from(["GET", "POST"]))
    path = draw(st.sampled_from(["/pkg-1.0.whl", "/simple/x/", "/a?b=1"]))
    headers = [("Host", "origin.test")]
    extra = draw(
        st.lists(
            st.tuples(st.sampled_from(["Accept", "User-Agent", "X-A"]), tokens),
            max_size=3,
        )
    )
    headers += extra
    body = b""
    if method == "POST":
        body = b"abcd"
        headers.append(("Content-Length", "4"))
    if shape == "two different Content-Lengths":
        headers += [("Content-Length", "4"), ("Content-Length", "5")]
        body = body or b"abcd"
    elif shape == "two equal Content-Lengths":
        if method == "POST":
            headers.append(("Content-Length", "4"))
        else:
            headers += [("Content-Length", "4"), ("Content-Length", "4")]
            body = b"abcd"
    elif shape == "Content-Length then Transfer-Encoding":
        if method != "POST":
            headers.append(("Content-Length", "5"))
        headers.append(("Transfer-Encoding", "chunked"))
        body = b"0\r\n\r\n"
    elif shape == "Transfer-Encoding then Content-Length":
        headers = [h for h in headers if h[0] != "Content-Length"]
        headers += [("Transfer-Encoding", "chunked"), ("Content-Length", "5")]
        body = b"0\r\n\r\n"
    elif shape == "Transfer-Encoding other than chunked":
        headers = [h for h in headers if h[0] != "Content-Length"]
        coding = draw(
            st.sampled_from(
                [
                    "identity",
                    "gzip",
                    "chunked, identity",
                    "gzip, chunked",
                    "chunked;x=1",
                    "xchunked",
                ]
            )
            | tokens.filter(lambda t: t.lower() != "chunked")
        )
        headers.append(("Transfer-Encoding", coding))
        body = b""
    elif shape == "obs-fold":
        at = draw(st.integers(1, len(headers)))
        headers.insert(at, ("", draw(st.sampled_from([" x", "\tx", " chunked"]))))
    elif shape == "absolute-form with another Host":
        headers[0] = ("Host", draw(st.sampled_from(_OTHER_HOSTS)))
    elif shape == "header line over 16 KiB":
        headers.append(("X-Big", "b" * draw(st.integers(16400, 17000))))
    elif shape == "head over 16 KiB":
        headers += [(f"X-W{i}", "w" * 1000) for i in range(17)]
    elif shape == "too many headers":
        headers += [(f"X-N{i}", "n") for i in range(draw(st.integers(100, 120)))]
    elif shape == "control character in a value":
        char = draw(st.sampled_from(["\x00", "\r", "\n"]))
        headers.append(("X-C", f"a{char}b"))
    lines = [f"{method} http://origin.test{path} HTTP/1.1"]
    lines += [f"{k}: {v}" if k else v for k, v in headers]
    head = "\r\n".join(lines) + "\r\n\r\n"
    if shape == "bare LF":
        ends = [m.start() for m in re.finditer("\r\n", head)]
        at = draw(st.sampled_from(ends))
        head = head[:at] + head[at + 1 :]
    data = head.encode("latin-1") + body
    data += b"GET http://origin.test/smuggled HTTP/1.1\r\nHost: origin.test\r\n\r\n"
    return shape, _chunks(draw, data)


# -- properties (a list of what is wrong; empty when all is well) -------------


def check_request(chunks: list[bytes]) -> list[str]:
    """Any input: no exception, no 5xx, only well-formed status lines."""
    return feed(chunks).problems()


def check_smuggling(case: tuple[str | None, list[bytes]]) -> list[str]:
    """A smuggling shape is one 4xx (400, 414, 431) and nothing forwarded,
    not even the request behind it; without a shape, both requests are
    forwarded (403 from the refusing recorder)."""
    shape, chunks = case
    fed = feed(chunks)
    found = fed.problems()
    final = [s for s in fed.statuses() if s >= 200]
    if shape is None:
        if len(fed.forwarded) != 2 or final != [403, 403]:
            found.append(f"control case: forwarded {fed.forwarded}, answered {final}")
        return found
    if fed.forwarded:
        found.append(f"{shape}: forwarded {fed.forwarded}")
    if final[:1] not in ([400], [414], [431]) or len(final) != 1:
        found.append(f"{shape}: answered {final} instead of one 4xx")
    return found


def check_router(
    case: tuple[str, str, str | None, tuple[str, int] | None],
) -> list[str]:
    """``routing.classify`` routes or raises BadRequest, nothing else;
    forward and transparent URLs are normalised http(s) URLs (normalising
    again changes nothing), own-page paths start with /."""
    method, target, host, original = case
    try:
        route = classify(method, target, host, LISTENER, original)
    except BadRequest:
        return []
    except Exception as e:
        return [f"classify raised {e!r}"]
    if route.kind in (RouteKind.FORWARD, RouteKind.TRANSPARENT):
        if not route.url.startswith(("http://", "https://")):
            return [f"not an http(s) URL: {route}"]
        try:
            again = normalize_url(route.url)
        except Exception as e:
            return [f"normalize_url({route.url!r}) raised {e!r}"]
        if again != route.url:
            return [f"normalising again: {route.url!r} -> {again!r}"]
    elif route.kind is RouteKind.SELF and not route.path.startswith("/"):
        return [f"own-page path without /: {route}"]
    elif route.kind is RouteKind.CONNECT and method != "CONNECT":
        return [f"CONNECT route for {method!r}"]
    return []


router_inputs = st.tuples(
    methods,
    targets,
    st.none() | st.builds(lambda h, p: h + p, hosts, ports) | header_values,
    st.none()
    | st.tuples(
        st.sampled_from(["127.0.0.1", "10.0.0.1", "::1"]), st.integers(1, 65535)
    ),
)


__all__ = [
    "LISTENER",
    "SHAPES",
    "Fed",
    "RecordingUpstream",
    "check_request",
    "check_router",
    "check_smuggling",
    "feed",
    "requests",
    "router_inputs",
    "smuggling",
]
