"""One node of a fleet: the parts of SPEC 12 put together for the service.

Built by the service when ``--shared-store`` is given; a lone node has none
of this (the proxy's ``fleet`` is None and nothing changes).
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.web.server import Request
from zope.interface import implementer

from cachingproxy.config import ProxyConfig
from cachingproxy.fleet.coordinate import FleetUpstream
from cachingproxy.fleet.health import Health
from cachingproxy.fleet.layout import parse_location
from cachingproxy.fleet.lease import Leases
from cachingproxy.fleet.peer import Endpoint, PeerClient
from cachingproxy.fleet.purge import PurgeLog
from cachingproxy.fleet.s3 import S3Client
from cachingproxy.fleet.shared import SharedTier
from cachingproxy.fleet.tiered import TieredStore
from cachingproxy.interfaces import ICacheStore, IFleet, IUpstream

if TYPE_CHECKING:
    from cachingproxy.proxy import Proxy


def read_secret(path: str | None) -> bytes:
    if path is None:
        return b""
    with open(path, "rb") as f:
        return f.read().strip()


@implementer(IFleet)
class Fleet:
    """The shared tier, leases, peers and the purge log of this node."""

    def __init__(self, config: ProxyConfig, reactor: Any, local: ICacheStore) -> None:
        assert config.shared_store is not None
        location = parse_location(config.shared_store)
        self.node = secrets.token_hex(6)
        self.advertise = config.advertise
        self.client = S3Client(reactor, location.bucket, config.s3_endpoint)
        self.health = Health(reactor, str(location))
        self.store = TieredStore(
            local, SharedTier(self.client, location, self.health), reactor
        )
        self.leases = Leases(
            self.client,
            location.prefix,
            self.health,
            reactor,
            self.node,
            config.advertise,
        )
        self.secret = read_secret(config.fleet_secret)
        self.peers = PeerClient(reactor, self.secret, config.read_timeout)
        self.purges = PurgeLog(
            self.client, location.prefix, self.health, reactor, self.node, self._apply
        )
        self.store.on_remove = self.purges.publish
        self.health.on_recovered = self.store.store_back
        self._reactor = reactor
        self._endpoint: Endpoint | None = None
        self._upstream: FleetUpstream | None = None

    def _apply(self, record: dict[str, str]) -> defer.Deferred[Any]:
        """Another node's purge: drop the same from the local tier."""
        self.store.purged(record)
        if "url" in record:
            return self.store.local.remove(str(record["url"]))
        if "prefix" in record:
            return self.store.local.remove_prefix(str(record["prefix"]))
        return defer.succeed(0)

    # -- IFleet ----------------------------------------------------------------

    def upstream(self, inner: IUpstream) -> IUpstream:
        self._upstream = FleetUpstream(
            inner, self.leases, self.store, self.peers, self._reactor
        )
        return self._upstream

    def internal(
        self, request: Request, path: str, proxy: Proxy
    ) -> defer.Deferred[None]:
        if self._endpoint is None:
            self._endpoint = Endpoint(proxy, self.secret)
        return defer.Deferred.fromCoroutine(self._endpoint.render(request, path))

    def status(self) -> dict[str, Any]:
        status = self.health.snapshot()
        status["node"] = self.node
        status["advertise"] = self.advertise
        status["uploads"] = len(self.store.uploads)
        status["leases"] = len(self.leases.held)
        status["origin_requests"] = (
            self._upstream.origin_requests if self._upstream else 0
        )
        return status

    def start(self) -> None:
        self.purges.start()

    async def _stop(self) -> None:
        self.purges.stop()
        await self.leases.release_all()
        await self.peers.close()

    def stop(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._stop())


__all__ = ["Fleet", "read_secret"]
