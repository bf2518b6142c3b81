"""Repeat hits from memory: the lean hit path (issue 11).

When the request path has served a small stored body whole as a ``HIT`` to
a plain ``GET`` (one that :func:`cachingproxy.front.quick.simple_get`
recognises), :meth:`QuickHits.offer` keeps the response it sent — status
line, fields and body — under the request's target, ``Host`` and local
address and port.  The next such head on any plain-TCP connection is answered from that
memo by :meth:`QuickHits.answer`, without a twisted.web ``Request``, the
router or the cached path, but only after the checks that decide a hit are
made again on the same values:

- the client is allowed (``--allow-client``);
- no purge of the URL is in progress;
- the store still answers the lookup with the very entry that was served
  (:class:`~cachingproxy.interfaces.IKnownLookups`: any write, purge or
  eviction, by this process or another worker, replaces it);
- the entry is still reusable under its rule at this moment (the cached
  path's own :meth:`~cachingproxy.handler.cached.CachedPath.reusable`);
- for a mirror, the digest its index publishes is still the one the body
  was checked against.

``Age`` (and ``Date`` where the stored response has none) is made for each
answer, and ``If-None-Match``/``If-Modified-Since`` get the request path's
``304`` when the entry satisfies them; the access log and the statistics get
the same record as from the request path.  Anything else — a ``Vary``, a
range, another conditional, a body over :data:`QUICK_MAX_BODY` — is never
kept or answered here, so it is always served by the request path.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.http import datetimeToString
from twisted.web.server import Request
from zope.interface import implementer

from cachingproxy.cache.age import current_age
from cachingproxy.cache.entry import StoredResponse
from cachingproxy.cache.policy import not_modified
from cachingproxy.cache.status import CacheStatus
from cachingproxy.config import Rule
from cachingproxy.front.exchange import Exchange
from cachingproxy.interfaces import ICacheStore, IKnownLookups, IQuickHits
from cachingproxy.mirror.documents import read_entry

QUICK_MAX_BODY = 64 * 1024
"""Bodies up to this size are kept (a larger one goes out with sendfile)."""

QUICK_MAX_BYTES = 16 * 1024 * 1024
"""All kept responses together (the oldest are dropped first)."""

Key = tuple[bytes, bytes, str, int]
"""A request target, its ``Host`` and the local address and port it came
in on (which the router reads)."""


@frozen
class Prepared:
    """One response kept for repeat hits."""

    url: str
    upstream: str
    rule: Rule
    entry: StoredResponse
    mirror: bool
    expected: tuple[str, str] | None
    head: bytes
    """The status line and every field but ``Age`` (and a made ``Date``)."""
    head304: bytes
    """The same for a ``304`` (no ``Content-Length``), as the request path
    answers a satisfied conditional."""
    dated: bool
    """The stored response has no ``Date``: one is made per answer."""
    body: bytes

    @property
    def size(self) -> int:
        return len(self.head) + len(self.head304) + len(self.body)


Record = Callable[[str | None, Prepared, float, int, int], None]
"""Logs and counts one answer: client address, what was answered, when,
the status and the body bytes sent."""


@implementer(IQuickHits)
class QuickHits:
    """The memo of repeat hits of one proxy (see the module's text)."""

    def __init__(
        self,
        store: ICacheStore,
        clock: IReactorTime,
        *,
        reusable: Callable[[Rule, StoredResponse, float], bool],
        allowed: Callable[[str], bool],
        purging: Callable[[str], bool],
        expected: Callable[[str], tuple[str, str] | None],
        record: Record,
        max_bytes: int = QUICK_MAX_BYTES,
    ) -> None:
        self._store = store
        self._known = IKnownLookups(store)
        self._clock = clock
        self._reusable = reusable
        self._allowed = allowed
        self._purging = purging
        self._expected = expected
        self._record = record
        self._max_bytes = max_bytes
        self._memo: dict[Key, Prepared] = {}
        self._bytes = 0
        self.answered = 0
        """Answers given (tests and the curious)."""

    # -- the channel's side ---------------------------------------------------

    def answer(
        self,
        target: bytes,
        host: bytes,
        client: str | None,
        local: tuple[str, int],
        conditions: tuple[tuple[str, str], ...] = (),
    ) -> tuple[bytes, bytes] | None:
        key = (target, host, *local)
        ready = self._memo.get(key)
        if ready is None:
            return None
        if client is not None and not self._allowed(client):
            return None
        url, entry = ready.url, ready.entry
        if self._purging(url):
            return None
        known = self._known.known(url)
        if known is None:
            return None
        if len(known) != 1 or known[0] is not entry:
            self._drop(key)  # replaced, purged or evicted
            return None
        now = self._clock.seconds()
        if not self._reusable(ready.rule, entry, now):
            return None
        if ready.mirror and self._expected(url) != ready.expected:
            return None
        self._store.touch(entry)
        if conditions and not_modified(entry, conditions):
            status, head, body = 304, ready.head304, b""
        else:
            status, head, body = 200, ready.head, ready.body
        head += b"Age: %d\r\n" % int(current_age(entry, now))
        if ready.dated:
            head += b"Date: %s\r\n" % datetimeToString()
        self.answered += 1
        self._record(client, ready, now, status, len(body))
        return head, body

    # -- the request path's side ---------------------------------------------

    def offer(self, request: Request, info: Exchange) -> None:
        """Keep what ``request`` was answered, if a plain ``GET`` that asks
        the same may get it from memory."""
        entry = info.served
        if (
            entry is None
            or info.rule is None
            or info.cache != CacheStatus.HIT
            or entry.vary
            or entry.size > QUICK_MAX_BODY
            or request.code != 200
            or request.method != b"GET"
            or request.clientproto not in (b"HTTP/1.1", b"HTTP/1.0")
            or request.sentLength != entry.size
        ):
            return
        key = _key(request)
        kept = None if key is None else self._memo.get(key)
        if key is None or (
            kept is not None
            and kept.entry is entry
            and kept.expected == info.expected  # an index may publish one later
        ):
            return
        dated = entry.header("date") is None
        fields = _fields(request, dated)
        if fields is None:
            return
        head = b"HTTP/1.1 200 %s\r\n%s" % (
            request.code_message,
            b"".join(line for _, line in fields),
        )
        head304 = b"HTTP/1.1 304 Not Modified\r\n" + b"".join(
            line for name, line in fields if name != b"content-length"
        )
        rule = info.rule

        def keep(body: bytes) -> None:
            self._keep(
                key,
                Prepared(
                    url=info.url,
                    upstream=info.upstream,
                    rule=rule,
                    entry=entry,
                    mirror=info.mirror,
                    expected=info.expected,
                    head=head,
                    head304=head304,
                    dated=dated,
                    body=body,
                ),
            )

        d = Deferred.fromCoroutine(read_entry(self._store, entry, QUICK_MAX_BODY))
        d.addCallback(keep)
        d.addErrback(lambda _: None)  # not kept: the request path serves it

    def clear(self) -> None:
        """Forget everything (the configuration changed)."""
        self._memo.clear()
        self._bytes = 0

    # -- internals -------------------------------------------------------------

    def _keep(self, key: Key, ready: Prepared) -> None:
        if len(ready.body) != ready.entry.size or _cost(key, ready) > self._max_bytes:
            return
        self._drop(key)
        self._memo[key] = ready
        self._bytes += _cost(key, ready)
        while self._bytes > self._max_bytes:
            self._drop(next(iter(self._memo)))

    def _drop(self, key: Key) -> None:
        ready = self._memo.pop(key, None)
        if ready is not None:
            self._bytes -= _cost(key, ready)


_ITEM_OVERHEAD = 512
"""Bytes counted for each kept response beside its head, body and key (the
Python objects that hold them)."""


def _cost(key: Key, ready: Prepared) -> int:
    """What keeping ``ready`` under ``key`` takes: its head and body, and the
    key, whose target and ``Host`` may be long (a fragment makes a new key
    for the same stored URL on every request)."""
    return ready.size + len(key[0]) + len(key[1]) + _ITEM_OVERHEAD


def _key(request: Request) -> Key | None:
    """The memo key of a request whose head the channel read as a plain
    GET (``ProxyRequest.plain_get``); None for any other."""
    get = getattr(request, "plain_get", None)
    if get is None:
        return None
    local = request.getHost()
    return get.target, get.host, getattr(local, "host", ""), getattr(local, "port", 0)


def _fields(request: Request, dated: bool) -> list[tuple[bytes, bytes]] | None:
    """The response's fields as sent, but those made per answer (``Age``,
    and ``Date`` when ``dated``): (lower-cased name, line)."""
    lines: list[tuple[bytes, bytes]] = []
    for name, values in request.responseHeaders.getAllRawHeaders():
        lname = name.lower()
        if lname in (b"transfer-encoding", b"set-cookie"):
            return None  # not a plain answer with a length
        if lname in (b"age", b"connection") or (dated and lname == b"date"):
            continue
        lines.extend((lname, b"%s: %s\r\n" % (name, value)) for value in values)
    return lines


__all__ = ["QUICK_MAX_BODY", "Prepared", "QuickHits"]
