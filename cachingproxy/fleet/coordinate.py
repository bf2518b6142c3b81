"""The upstream that shared downloads use in a fleet: one upstream GET per
URL across the nodes (SPEC 12).

Before a node sends a GET upstream it takes the URL's lease.  If another
node holds it, this node streams the bytes live from that node's
``--advertise`` URL (or, when it has none or cannot be reached, waits for the
object to appear in the shared tier, or for the lease to expire, and then
takes it).  Either way the Download above sees an ordinary response, which it
streams to its clients and stores in the local tier; such copies are not
uploaded again.  The lease is dropped once the body is over and its upload
is done, so a node that waits for the object finds it.

Conditional requests (revalidations) and anything but GET go straight
upstream: they cost the origin little, and a stale entry must be served if
upstream fails.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from cachingproxy.cache import policy
from cachingproxy.cache.entry import StoredResponse
from cachingproxy.fetch.upstream import headers_from_pairs, pairs_from_headers
from cachingproxy.fleet.lease import Holder, Lease, Leases
from cachingproxy.fleet.peer import PeerClient
from cachingproxy.fleet.s3 import S3Error
from cachingproxy.fleet.tiered import TieredStore
from cachingproxy.interfaces import IUpstream

_log = Logger()

POLL = 0.5
"""Seconds between looks at the lease and the shared tier while waiting."""

_CONDITIONAL = (b"if-none-match", b"if-modified-since", b"range", b"if-range")


@implementer(IUpstream)
class FleetUpstream:
    """``inner`` for everything, with leases around shared GETs."""

    def __init__(
        self,
        inner: IUpstream,
        leases: Leases,
        store: TieredStore,
        peers: PeerClient,
        clock: Any,
    ) -> None:
        self._inner = inner
        self._leases = leases
        self._store = store
        self._peers = peers
        self._clock = clock
        self._copies: dict[str, int] = {}
        """URLs whose bodies came from the fleet (no upload), with a count."""
        store.should_upload = lambda url: url not in self._copies
        self.origin_requests = 0

    def connect_tcp(self, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return self._inner.connect_tcp(*args, **kwargs)

    def request(
        self,
        method: bytes,
        url: bytes,
        headers: Headers,
        body: IBodyProducer | None = None,
        *,
        mirrored: bool = False,
    ) -> defer.Deferred[IResponse]:
        if (
            method != b"GET"
            or body is not None
            or any(headers.hasHeader(h) for h in _CONDITIONAL)
        ):
            return self._inner.request(method, url, headers, body, mirrored=mirrored)
        return defer.Deferred.fromCoroutine(self._get(url, headers, mirrored))

    async def _get(self, raw_url: bytes, headers: Headers, mirrored: bool) -> IResponse:
        url = raw_url.decode("ascii")
        pairs = pairs_from_headers(headers)
        seen = self._store.seen(url)
        announced = False
        while True:
            if not self._store.shared.available:
                return await self._inner.request(
                    b"GET", raw_url, headers, mirrored=mirrored
                )
            got = await self._leases.acquire(url)
            if got is None or (
                isinstance(got, Holder) and got.node == self._leases.node
            ):
                return await self._inner.request(
                    b"GET", raw_url, headers, mirrored=mirrored
                )
            if isinstance(got, Lease):
                # Another node may have stored it since this node looked.
                shared = await self._from_shared(url, pairs, seen)
                if shared is not None:
                    got.release()
                    return shared
                return await self._upstream(got, raw_url, headers, mirrored)
            if got.advertise is not None:
                response = await self._peers.fetch(got.advertise, url, pairs)
                if response is not None:
                    _log.info(
                        "{url}: streaming from {peer}", url=url, peer=got.advertise
                    )
                    return self._copy(url, response)
            if not announced:
                announced = True
                _log.info(
                    "{url}: node {node} is downloading it; waiting",
                    url=url,
                    node=got.node,
                )
            shared = await self._from_shared(url, pairs, seen)
            if shared is not None:
                return shared
            await task.deferLater(self._clock, POLL)

    async def _upstream(
        self, lease: Lease, raw_url: bytes, headers: Headers, mirrored: bool
    ) -> IResponse:
        self.origin_requests += 1
        try:
            response = await self._inner.request(
                b"GET", raw_url, headers, mirrored=mirrored
            )
        except BaseException:
            lease.release()
            raise

        def over() -> None:
            d = self._store.settled(lease.url)
            d.addBoth(lambda _: lease.release())

        return _Watched(response, over)

    async def _from_shared(
        self, url: str, pairs: list[Any], seen: float
    ) -> IResponse | None:
        """The shared tier's object for this client, as a response, if it was
        stored after ``seen`` (what this node had when it decided to fetch:
        the same entry again would be no answer)."""
        entry = policy.select_variant(await self._store.shared.lookup(url), pairs)
        if entry is None or entry.status != 200 or entry.stored_at <= seen:
            return None
        try:
            response = await self._store.shared.body(entry, 0, entry.size)
        except S3Error:
            return None
        return self._copy(url, _Relabelled(response, entry, self._clock.seconds()))

    def _copy(self, url: str, response: IResponse) -> IResponse:
        """``response`` came from the fleet: its local copy is not uploaded."""
        self._copies[url] = self._copies.get(url, 0) + 1

        def over() -> None:
            d = self._store.settled(url)

            def forget(_: object) -> None:
                self._copies[url] -= 1
                if not self._copies[url]:
                    del self._copies[url]

            d.addBoth(forget)

        return _Watched(response, over)


@implementer(IResponse)
class _Watched:
    """A response that calls ``over`` once its body ended (however it ended)."""

    def __init__(self, response: IResponse, over: Any) -> None:
        self._response = response
        self._over = over
        self.code = response.code
        self.phrase = response.phrase
        self.headers = response.headers
        self.length = response.length
        self.version = response.version
        self.request = response.request
        self.previousResponse = response.previousResponse

    def deliverBody(self, protocol: Protocol) -> None:  # noqa: N802
        self._response.deliverBody(_Tap(protocol, self._over))

    def setPreviousResponse(self, response: IResponse) -> None:  # noqa: N802
        self.previousResponse = response


class _Tap(Protocol):
    def __init__(self, inner: Protocol, over: Any) -> None:
        self._inner = inner
        self._over = over

    def makeConnection(self, transport: Any) -> None:  # noqa: N802
        self.transport = transport
        self._inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self._inner.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]  # noqa: N802
        try:
            self._inner.connectionLost(reason)
        finally:
            self._ended()

    def _ended(self) -> None:
        over, self._over = self._over, None
        if over is not None:
            over()


@implementer(IResponse)
class _Relabelled:
    """A shared object's body as if the origin had answered with its entry."""

    def __init__(self, response: IResponse, entry: StoredResponse, now: float) -> None:
        self._response = response
        self.code = entry.status
        self.phrase = b"OK"
        age = policy.current_age(entry, now)
        pairs = [(k, v) for k, v in entry.headers if k.lower() != "age"]
        pairs.append(("Age", str(int(age))))
        self.headers = headers_from_pairs(pairs)
        self.length = entry.size
        self.version = response.version
        self.request = response.request
        self.previousResponse: IResponse | None = None

    def deliverBody(self, protocol: Protocol) -> None:  # noqa: N802
        self._response.deliverBody(protocol)

    def setPreviousResponse(self, response: IResponse) -> None:  # noqa: N802
        self.previousResponse = response


__all__ = ["POLL", "FleetUpstream"]
