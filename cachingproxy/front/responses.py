"""Writing responses to clients: headers, errors, passthrough bodies."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import lru_cache
from http import HTTPStatus

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.http import RESPONSES, datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.server import Request
from zope.interface import implementer

from cachingproxy.cache import headers as H
from cachingproxy.cache.entry import Header
from cachingproxy.cache.status import CacheStatus, header_value
from cachingproxy.errors import UpstreamTimeout
from cachingproxy.ops.stats import upstream_error_kind

_OWN = frozenset({"content-length", "age", "x-cache", "via"})


_REMEMBERED_HEAD = 8192
"""Upstream heads up to this many bytes of names and values are remembered."""


def _forwarded(
    headers: tuple[Header, ...], via: str
) -> tuple[dict[bytes, list[bytes]], bool]:
    """The upstream's end-to-end headers as sent to the client (without the
    proxy's own, with ``via`` appended to ``Via``), and whether they have a
    ``Date``.  Remembered for small heads: a stored entry's headers are sent
    on every hit."""
    if sum(len(k) + len(v) for k, v in headers) <= _REMEMBERED_HEAD:
        return _remembered(headers, via)
    return _encode(headers, via)


def _encode(
    headers: tuple[Header, ...], via: str
) -> tuple[dict[bytes, list[bytes]], bool]:
    raw: dict[bytes, list[bytes]] = {}
    vias = []
    has_date = False
    for name, value in H.end_to_end(headers):
        lname = name.lower()
        if lname == "via":
            vias.append(value)
        elif lname not in _OWN:
            has_date = has_date or lname == "date"
            raw.setdefault(name.encode("latin-1"), []).append(value.encode("latin-1"))
    vias.append(via)
    raw[b"Via"] = [", ".join(vias).encode("latin-1")]
    return raw, has_date


_remembered = lru_cache(maxsize=1024)(_encode)


def set_head(
    request: Request,
    status: int,
    upstream_headers: Iterable[Header],
    *,
    cache: CacheStatus = CacheStatus.NONE,
    via: str,
    age: float | None = None,
    length: int | None = None,
    phrase: str | None = None,
    upstream: str | None = None,
) -> None:
    """Status and headers for the client: the upstream's end-to-end headers
    plus ``Content-Length``, ``Age``, ``Via`` and ``X-Cache``."""
    if not phrase and status not in RESPONSES:
        phrase = _standard_phrase(status)
    request.setResponseCode(status, phrase.encode("latin-1") if phrase else None)
    items = (
        upstream_headers
        if isinstance(upstream_headers, tuple)
        else tuple(upstream_headers)
    )
    raw, has_date = _forwarded(items, via)
    out = Headers(raw)
    if not has_date:
        out.setRawHeaders(b"Date", [datetimeToString()])
    out.setRawHeaders(b"X-Cache", [header_value(cache).encode("ascii")])
    if upstream is not None:
        out.setRawHeaders(b"X-Cache-Upstream", [upstream.encode("latin-1")])
    if age is not None:
        out.setRawHeaders(b"Age", [b"%d" % int(age)])
    if length is not None:
        out.setRawHeaders(b"Content-Length", [b"%d" % length])
    if request.responseHeaders.getRawHeaders(b"connection") == [b"close"]:
        # twisted.web's answer to a client's "Connection: close" (RFC 9112
        # 9.6: the last response says so too).
        out.setRawHeaders(b"Connection", [b"close"])
    request.responseHeaders = out
    # A stored response without Content-Type must not get twisted's default.
    request.defaultContentType = None


def _standard_phrase(status: int) -> str | None:
    """RFC 9110's reason phrase where Twisted has none (``508 Loop
    Detected``, ``421``, ``429`` ...), not "Unknown Status"."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return None


def client_gone(request: Request) -> bool:
    """Whether the client of ``request`` has gone away (its connection was
    lost): the one place that reads Twisted's private request state."""
    return bool(request._disconnected)


def send_error(
    request: Request,
    status: int,
    message: str,
    *,
    cache: CacheStatus = CacheStatus.NONE,
    via: str,
) -> None:
    """A short plain-text error page."""
    body = f"{status} {message}\n".encode("utf-8", "replace")
    set_head(
        request,
        status,
        [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")],
        cache=cache,
        via=via,
        length=len(body),
    )
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


def abort(request: Request) -> None:
    """Cut the client's connection so a truncated body is seen as an error."""
    transport = request.channel.transport if request.channel else None
    if transport is None:
        return
    abort_connection = getattr(transport, "abortConnection", None)
    if abort_connection is not None:
        abort_connection()
    else:
        transport.loseConnection()


class PassThrough(Protocol):
    """Streams an unstored upstream body to one client, with backpressure.

    With a ``clock`` and ``read_timeout``, an upstream silent for that long
    while the client is ready for more is cut off (SPEC 5: the read timeout
    counts between body bytes); while the client holds the body back, the
    silence is ours and does not count.
    """

    def __init__(
        self,
        request: Request,
        response: IResponse,
        *,
        on_data: Callable[[int], None] = lambda n: None,
        on_error: Callable[[str], None] = lambda kind: None,
        on_done: Callable[[], None] = lambda: None,
        clock: IReactorTime | None = None,
        read_timeout: float | None = None,
    ) -> None:
        self._clock = clock
        self._read_timeout = read_timeout
        self._timer: IDelayedCall | None = None
        self._timed_out = False
        self._on_done = on_done
        self._on_data = on_data
        self._on_error = on_error
        self._request = request
        self._length = response.length if isinstance(response.length, int) else None
        self.received = 0
        self.finished = False
        self._client_gone = False
        request.notifyFinish().addErrback(self._client_lost)

    def _client_lost(self, _: Failure) -> None:
        self._client_gone = True
        if self.transport is not None and not self.finished:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionMade(self) -> None:  # noqa: N802
        if self._client_gone:
            self.transport.stopProducing()  # type: ignore[union-attr]
            return
        self._request.registerProducer(_Paced(self), True)
        self._arm()

    def _arm(self) -> None:
        """(Re)start the silence timer."""
        self._disarm()
        if self._clock is not None and self._read_timeout is not None:
            self._timer = self._clock.callLater(self._read_timeout, self._silent)

    def _disarm(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _silent(self) -> None:
        self._timer = None
        self._timed_out = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._timer is not None:
            self._arm()
        self.received += len(data)
        self._on_data(len(data))
        if not self._client_gone:
            self._request.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: N802,B008
        self.finished = True
        self._disarm()
        if self._timed_out:
            reason = Failure(UpstreamTimeout("upstream silent mid-body"))
        self._on_done()
        if self._client_gone:
            return
        self._request.unregisterProducer()
        complete = reason.check(ResponseDone) or (
            reason.check(PotentialDataLoss) and self._length is None
        )
        if complete:
            self._request.finish()
        else:
            self._on_error(upstream_error_kind(reason))
            abort(self._request)


@implementer(IPushProducer)
class _Paced:
    """The upstream transport as the client's producer: while the client
    holds the body back, the silence timer waits."""

    def __init__(self, owner: PassThrough) -> None:
        self._owner = owner

    def pauseProducing(self) -> None:  # noqa: N802
        self._owner._disarm()
        self._owner.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:  # noqa: N802
        self._owner._arm()
        self._owner.transport.resumeProducing()  # type: ignore[union-attr]

    def stopProducing(self) -> None:  # noqa: N802
        self._owner._disarm()
        self._owner.transport.stopProducing()  # type: ignore[union-attr]


__all__ = ["PassThrough", "abort", "client_gone", "send_error", "set_head"]
