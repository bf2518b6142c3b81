"""Access control and hostile input (SPEC 8): SSRF refusals, client ACLs,
loops, malformed requests.

Proxies here run on a ``GuardedReactor``: every outgoing connection is
recorded and nothing outside 127.0.0.0/8 can be reached even if the
destination policy broke.  Names resolve through a fake resolver.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers

from cachingproxy.errors import DestinationRefused, UpstreamTimeout
from cachingproxy.fetch.upstream import DestinationPolicy, DNSLookupFailed, Upstream

from .support import (
    GuardedReactor,
    Origin,
    client,
    fake_resolver,
    fetch,
    header,
    parse_raw_response,
    raw_exchange,
    run,
    start_origin,
    start_proxy_with,
)

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
PRIVATE_10 = ipaddress.ip_network("10.0.0.0/8")


async def forward(test: TestCase, proxy_port: int, url: str) -> tuple[int, bytes]:
    """A raw absolute-form GET (treq cannot send IPv6 literals); status, body."""
    authority = url.split("/", 3)[2]
    raw = await raw_exchange(
        test, proxy_port, f"GET {url} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    )
    status, _, body = parse_raw_response(raw)
    return status, body


class DestinationPolicyTests(TestCase):
    def test_default_refusals(self) -> None:
        """With no --allow-upstream, loopback, link-local (cloud metadata),
        private, shared, unspecified and multicast addresses are refused on
        every port, IPv4-mapped IPv6 included; public addresses only on the
        upstream ports."""
        default = DestinationPolicy()
        refused = [
            ("127.0.0.1", 22),
            ("127.0.0.1", 80),
            ("127.1.2.3", 443),
            ("169.254.169.254", 80),
            ("10.0.0.1", 80),
            ("172.16.5.4", 443),
            ("192.168.1.1", 80),
            ("100.64.0.1", 80),
            ("0.0.0.0", 80),
            ("224.0.0.1", 80),
            ("255.255.255.255", 80),
            ("::1", 80),
            ("::", 80),
            ("fe80::1", 80),
            ("fc00::1", 443),
            ("fd00:ec2::254", 80),
            ("::ffff:127.0.0.1", 80),
            ("::ffff:169.254.169.254", 80),
            ("8.8.8.8", 8080),
            ("8.8.8.8", 22),
            ("2001:4860:4860::8888", 25),
        ]
        for address, port in refused:
            self.assertIsNotNone(default.refusal(address, port), (address, port))
        allowed = [
            ("8.8.8.8", 80),
            ("8.8.8.8", 443),
            ("2001:4860:4860::8888", 443),
            ("::ffff:8.8.8.8", 80),
        ]
        for address, port in allowed:
            self.assertIsNone(default.refusal(address, port), (address, port))

    def test_reasons(self) -> None:
        """The refusal says what is wrong: a non-public address or a port."""
        default = DestinationPolicy()
        self.assertIn("not a public address", default.refusal("10.0.0.1", 80) or "")
        self.assertIn("port 8080", default.refusal("8.8.8.8", 8080) or "")

    def test_mirrors_may_use_any_port(self) -> None:
        """Operator-configured mirrors may use any port on public addresses,
        but still not private ones."""
        default = DestinationPolicy()
        self.assertIsNone(default.refusal("8.8.8.8", 8080, mirrored=True))
        self.assertIsNotNone(default.refusal("10.0.0.1", 8080, mirrored=True))

    def test_allow_upstream(self) -> None:
        """--allow-upstream makes listed ranges reachable on any port; others
        stay refused."""
        allowing = DestinationPolicy(allow_upstream=(LOOPBACK, PRIVATE_10))
        self.assertIsNone(allowing.refusal("127.0.0.1", 22))
        self.assertIsNone(allowing.refusal("10.1.2.3", 6379))
        self.assertIsNone(allowing.refusal("::ffff:127.0.0.1", 22))
        self.assertIsNotNone(allowing.refusal("169.254.169.254", 80))
        self.assertIsNotNone(allowing.refusal("192.168.0.1", 80))

    def test_upstream_ports(self) -> None:
        """--upstream-ports replaces the allowed public ports."""
        ports = DestinationPolicy(upstream_ports=frozenset({8080}))
        self.assertIsNone(ports.refusal("8.8.8.8", 8080))
        self.assertIsNotNone(ports.refusal("8.8.8.8", 80))

    def test_own_addresses(self) -> None:
        """The proxy's own addresses are refused even when public."""
        own = DestinationPolicy(own_addresses=frozenset({"8.8.4.4"}))
        self.assertIsNotNone(own.refusal("8.8.4.4", 80))
        self.assertIsNone(own.refusal("8.8.8.8", 80))


class CheckedConnectTests(TestCase):
    """The policy is applied to resolved addresses before any connection is
    attempted, and the connection goes to exactly the checked address."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.names: dict[str, list[str]] = {
            "evil.example": ["10.0.0.1", "127.0.0.1"],
            "mixed.example": ["169.254.169.254", "8.8.4.4"],
        }
        self.pending: dict[str, defer.Deferred[list[str]]] = {}

    def upstream(self, policy: DestinationPolicy | None = None) -> Upstream:
        def resolve(host: str, port: int) -> defer.Deferred[list[str]]:
            if host == "slow.example":
                d: defer.Deferred[list[str]] = defer.Deferred()
                self.pending[host] = d
                return d
            return fake_resolver(self.names)(host, port)

        return Upstream(
            self.reactor,
            policy or DestinationPolicy(),
            connect_timeout=5,
            read_timeout=5,
            resolve=resolve,
        )

    def get(self, upstream: Upstream, url: str, mirrored: bool = False) -> Any:
        return upstream.request(b"GET", url.encode(), Headers(), mirrored=mirrored)

    def test_public_literal_on_other_port_refused_before_connect(self) -> None:
        """http://8.8.8.8:8080/ fails with DestinationRefused at once and no
        TCP connection is even attempted."""
        d = self.get(self.upstream(), "http://8.8.8.8:8080/")
        failure = self.failureResultOf(d, DestinationRefused)
        self.assertIn("8080", failure.getErrorMessage())
        self.assertEqual(self.reactor.tcpClients, [])

    def test_private_literals_refused_before_connect(self) -> None:
        """Loopback and metadata literals are refused without connecting."""
        upstream = self.upstream()
        for url in [
            "http://127.0.0.1:22/",
            "http://169.254.169.254/latest/meta-data/",
            "https://[::1]/",
            "http://[::ffff:10.0.0.1]/",
        ]:
            self.failureResultOf(self.get(upstream, url), DestinationRefused)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_name_resolving_to_private_refused(self) -> None:
        """A name whose every address is private is refused after resolution,
        before connecting; the message names the host."""
        d = self.get(self.upstream(), "http://evil.example/")
        failure = self.failureResultOf(d, DestinationRefused)
        self.assertIn("evil.example", failure.getErrorMessage())
        self.assertEqual(self.reactor.tcpClients, [])

    def test_connects_to_the_checked_address(self) -> None:
        """Of a name's addresses the first allowed one is dialled directly
        (no second resolution), on the URL's port."""
        self.get(self.upstream(), "http://mixed.example/")
        self.assertEqual(
            [(host, port) for host, port, *_ in self.reactor.tcpClients],
            [("8.8.4.4", 80)],
        )

    def test_allowed_literals_connect(self) -> None:
        """Public addresses on an upstream port, and mirrors on any port, are
        dialled; --allow-upstream ranges on any port."""
        self.get(self.upstream(), "http://8.8.8.8/")
        self.get(self.upstream(), "http://8.8.8.8:8080/", mirrored=True)
        self.get(
            self.upstream(DestinationPolicy(allow_upstream=(LOOPBACK,))),
            "http://127.0.0.1:22/",
        )
        self.assertEqual(
            [(host, port) for host, port, *_ in self.reactor.tcpClients],
            [("8.8.8.8", 80), ("8.8.8.8", 8080), ("127.0.0.1", 22)],
        )

    def test_ipv6_literal_connects(self) -> None:
        """A public IPv6 literal is dialled over IPv6 on the default port."""
        self.get(self.upstream(), "http://[2001:4860:4860::8888]/")
        self.assertEqual(
            [(host, port) for host, port, *_ in self.reactor.tcpClients],
            [("2001:4860:4860::8888", 80)],
        )

    def test_next_allowed_address_after_connect_error(self) -> None:
        """When the first allowed address refuses the connection, the next
        allowed one is tried; refused addresses are never dialled."""
        self.names["multi.example"] = ["10.0.0.1", "8.8.4.4", "8.8.8.8"]
        d = self.get(self.upstream(), "http://multi.example/")
        [(host, _, factory, *_)] = self.reactor.tcpClients
        self.assertEqual(host, "8.8.4.4")
        factory.clientConnectionFailed(
            self.reactor.connectors[-1], Failure(ConnectionRefusedError())
        )
        self.assertEqual(
            [(host, port) for host, port, *_ in self.reactor.tcpClients],
            [("8.8.4.4", 80), ("8.8.8.8", 80)],
        )
        self.assertNoResult(d)
        factory = self.reactor.tcpClients[1][2]
        factory.clientConnectionFailed(
            self.reactor.connectors[-1], Failure(ConnectionRefusedError())
        )
        self.failureResultOf(d, ConnectionRefusedError)

    def test_unknown_name(self) -> None:
        """A name that does not resolve is DNSLookupFailed, not a crash."""
        d = self.get(self.upstream(), "http://nowhere.example/")
        self.failureResultOf(d, DNSLookupFailed)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_slow_resolver_times_out(self) -> None:
        """A resolver that never answers is cancelled after the connect
        timeout: UpstreamTimeout."""
        d = self.get(self.upstream(), "http://slow.example/")
        self.assertNoResult(d)
        self.reactor.advance(5)
        self.failureResultOf(d, UpstreamTimeout)
        self.assertEqual(self.reactor.tcpClients, [])


class SSRFTests(TestCase):
    """Forward and transparent requests with the default (empty)
    --allow-upstream never reach private or local addresses."""

    def proxy(self, **overrides: Any) -> tuple[GuardedReactor, int]:
        guard = GuardedReactor()
        resolve = fake_resolver(
            {
                "evil.example": ["10.0.0.1"],
                "local.example": ["127.0.0.1"],
                "localhost": ["127.0.0.1", "::1"],
                "loop.example": ["127.0.0.1"],
                "dual.example": ["::1", "127.0.0.1"],
            }
        )
        overrides.setdefault("allow_upstream", ())
        _, port = start_proxy_with(self, reactor_=guard, resolve=resolve, **overrides)
        return guard, port

    def test_refused_destinations(self) -> defer.Deferred[None]:
        """Loopback, cloud metadata, a live local origin and names resolving
        to private addresses are 403 with no connection attempted; the local
        origin sees nothing."""
        return run(self._refused_destinations())

    async def _refused_destinations(self) -> None:
        origin, oport = start_origin(self)
        origin.static("/pkg-1.0.whl", b"secret")
        guard, pport = self.proxy()
        for url in [
            "http://127.0.0.1:22/",
            "http://169.254.169.254/latest/meta-data/",
            f"http://127.0.0.1:{oport}/pkg-1.0.whl",
            f"http://localhost:{oport}/pkg-1.0.whl",
            "http://evil.example/pkg-1.0.whl",
            f"http://local.example:{oport}/pkg-1.0.whl",
            f"http://[::1]:{oport}/pkg-1.0.whl",
            f"http://[::ffff:127.0.0.1]:{oport}/pkg-1.0.whl",
        ]:
            status, body = await forward(self, pport, url)
            self.assertEqual(status, 403, url)
            self.assertIn(b"destination refused", body, url)
        self.assertEqual(origin.count(), 0)
        self.assertEqual(guard.connects, [])

    def test_public_ip_on_other_port(self) -> defer.Deferred[None]:
        """http://8.8.8.8:8080/ is refused by policy (403) before any connect."""
        return run(self._public_ip_on_other_port())

    async def _public_ip_on_other_port(self) -> None:
        guard, pport = self.proxy()
        response, body = await fetch(client(self, pport), "http://8.8.8.8:8080/x.whl")
        self.assertEqual(response.code, 403)
        self.assertIn(b"8080", body)
        self.assertEqual(guard.connects, [])

    def test_guard_sees_allowed_public_connects(self) -> defer.Deferred[None]:
        """With 8080 among --upstream-ports the same request is let through
        to a connect attempt (refused by the test guard: 502), which shows the
        403 above comes from the destination policy."""
        return run(self._guard_sees_allowed_public_connects())

    async def _guard_sees_allowed_public_connects(self) -> None:
        guard, pport = self.proxy(upstream_ports=frozenset({8080}))
        response, _ = await fetch(client(self, pport), "http://8.8.8.8:8080/x.whl")
        self.assertEqual(response.code, 502)
        self.assertEqual(guard.connects, [("8.8.8.8", 8080)])

    def test_transparent_request_to_local_origin(self) -> defer.Deferred[None]:
        """Origin-form with a Host naming a local origin is refused too."""
        return run(self._transparent_request_to_local_origin())

    async def _transparent_request_to_local_origin(self) -> None:
        origin, oport = start_origin(self)
        origin.static("/pkg-1.0.whl", b"secret")
        guard, pport = self.proxy()
        raw = await raw_exchange(
            self,
            pport,
            f"GET /pkg-1.0.whl HTTP/1.1\r\nHost: 127.0.0.1:{oport}\r\n\r\n".encode(),
        )
        status, _, body = parse_raw_response(raw)
        self.assertEqual(status, 403)
        self.assertNotIn(b"secret", body)
        self.assertEqual(origin.count(), 0)
        self.assertEqual(guard.connects, [])

    def test_allow_upstream_reaches_local_origin(self) -> defer.Deferred[None]:
        """With --allow-upstream covering 127.0.0.0/8 the same local origin is
        reachable, also through a name resolved by the injected resolver."""
        return run(self._allow_upstream_reaches_local_origin())

    async def _allow_upstream_reaches_local_origin(self) -> None:
        origin, oport = start_origin(self)
        origin.static("/pkg-1.0.whl", b"wheel")
        guard, pport = self.proxy(allow_upstream=(LOOPBACK,))
        http = client(self, pport)
        r1, b1 = await fetch(http, f"http://127.0.0.1:{oport}/pkg-1.0.whl")
        r2, b2 = await fetch(http, f"http://local.example:{oport}/pkg-1.0.whl")
        self.assertEqual((r1.code, b1), (200, b"wheel"))
        self.assertEqual((r2.code, b2), (200, b"wheel"))
        self.assertEqual(origin.count("/pkg-1.0.whl"), 2)
        self.assertEqual(guard.connects[0], ("127.0.0.1", oport))
        # 10.0.0.0/8 is still refused.
        r3, _ = await fetch(http, "http://evil.example/pkg-1.0.whl")
        self.assertEqual(r3.code, 403)

    def test_dual_stack_name_falls_back(self) -> defer.Deferred[None]:
        """A name resolving to an IPv6 address nobody listens on and then to
        the IPv4 address of the origin is fetched over IPv4."""
        return run(self._dual_stack_name_falls_back())

    async def _dual_stack_name_falls_back(self) -> None:
        origin, oport = start_origin(self)
        origin.static("/pkg-1.0.whl", b"wheel")
        guard, pport = self.proxy(
            allow_upstream=(LOOPBACK, ipaddress.ip_network("::1/128"))
        )
        response, body = await fetch(
            client(self, pport), f"http://dual.example:{oport}/pkg-1.0.whl"
        )
        self.assertEqual((response.code, body), (200, b"wheel"))
        self.assertEqual(guard.connects, [("::1", oport), ("127.0.0.1", oport)])

    def test_loop_through_a_name_is_stopped(self) -> defer.Deferred[None]:
        """A name that resolves to the proxy's own listening address is refused
        (403) without connecting, even when --allow-upstream covers it: the
        proxy never connects to itself."""
        return run(self._loop_through_a_name_is_stopped())

    async def _loop_through_a_name_is_stopped(self) -> None:
        guard, pport = self.proxy(allow_upstream=(LOOPBACK,))
        response, body = await fetch(
            client(self, pport), f"http://loop.example:{pport}/pkg-1.0.whl"
        )
        self.assertEqual(response.code, 403)
        self.assertIn(b"the proxy itself", body)
        self.assertEqual(guard.connects, [])


class ClientAccessTests(TestCase):
    def test_client_outside_allow_client(self) -> defer.Deferred[None]:
        """A client outside --allow-client gets 403 and the origin sees
        nothing: for forward requests, the proxy's own pages, ``OPTIONS *``
        and malformed Host alike."""
        return run(self._client_outside_allow_client())

    async def _client_outside_allow_client(self) -> None:
        origin, oport = start_origin(self)
        origin.static("/pkg-1.0.whl", b"wheel")
        _, pport = start_proxy_with(
            self, allow_client=(PRIVATE_10,), allow_upstream=(LOOPBACK,)
        )
        http = client(self, pport)
        for url in [
            f"http://127.0.0.1:{oport}/pkg-1.0.whl",
            f"http://localhost:{pport}/",
        ]:
            response, body = await fetch(http, url)
            self.assertEqual(response.code, 403, url)
            self.assertNotIn(b"wheel", body)
        for data in [
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /pkg-1.0.whl HTTP/1.1\r\nHost: a b\r\n\r\n",
        ]:
            status, _, _ = parse_raw_response(await raw_exchange(self, pport, data))
            self.assertEqual(status, 403, data)
        self.assertEqual(origin.count(), 0)


class RequestCheckTests(TestCase):
    """Loops and CONNECT on a proxy whose upstream is reachable."""

    def setUp(self) -> None:
        self.origin, self.oport = start_origin(self)
        self.origin.static("/pkg-1.0.whl", b"wheel")
        _, self.pport = start_proxy_with(self, allow_upstream=(LOOPBACK,))

    def test_own_via_is_a_loop(self) -> defer.Deferred[None]:
        """A request carrying the proxy's own Via token is 508 and not fetched;
        another proxy's Via is fine."""
        return run(self._own_via_is_a_loop())

    async def _own_via_is_a_loop(self) -> None:
        http = client(self, self.pport)
        url = f"http://127.0.0.1:{self.oport}/pkg-1.0.whl"
        looped, _ = await fetch(
            http, url, {"Via": "1.0 squid, 1.1 localhost (cachingproxy/0.1)"}
        )
        self.assertEqual((looped.code, looped.phrase), (508, b"Loop Detected"))
        self.assertEqual(self.origin.count(), 0)
        fine, body = await fetch(http, url, {"Via": "1.1 squid.example"})
        self.assertEqual((fine.code, body), (200, b"wheel"))
        self.assertIn("localhost", header(fine, "via") or "")

    def test_connect_refused(self) -> defer.Deferred[None]:
        """CONNECT to a port outside --connect-ports is refused (403) and
        nothing is tunnelled."""
        return run(self._connect_refused())

    async def _connect_refused(self) -> None:
        raw = await raw_exchange(
            self,
            self.pport,
            f"CONNECT 127.0.0.1:{self.oport} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{self.oport}\r\n\r\n".encode(),
        )
        status, _, _ = parse_raw_response(raw)
        self.assertEqual(status, 403)
        self.assertEqual(self.origin.count(), 0)


class MalformedInputTests(TestCase):
    """Malformed requests over raw TCP get a 4xx, reach no upstream, and
    leave the proxy working."""

    def setUp(self) -> None:
        self.origin: Origin
        self.origin, self.oport = start_origin(self)
        self.body = bytes(range(256)) * 64
        self.origin.static("/pkg-1.0.whl", self.body)
        _, self.pport = start_proxy_with(self, allow_upstream=(LOOPBACK,))

    def malformed(self) -> list[tuple[str, bytes]]:
        target = f"http://127.0.0.1:{self.oport}/pkg-1.0.whl"
        host = f"127.0.0.1:{self.oport}"
        many = "".join(f"X-H{i}: v\r\n" for i in range(510))
        wide = "".join(f"X-W{i}: {'w' * 1000}\r\n" for i in range(20))
        return [
            ("garbage request line", b"GARBAGE\r\n\r\n"),
            (
                "binary request line",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
            ),
            ("HTTP/2.0 request line", f"GET {target} HTTP/2.0\r\n\r\n".encode()),
            ("no Host", b"GET /pkg-1.0.whl HTTP/1.1\r\n\r\n"),
            ("Host a b", b"GET /pkg-1.0.whl HTTP/1.1\r\nHost: a b\r\n\r\n"),
            ("Host x:99999", b"GET /pkg-1.0.whl HTTP/1.1\r\nHost: x:99999\r\n\r\n"),
            ("Host [zz]", b"GET /pkg-1.0.whl HTTP/1.1\r\nHost: [zz]\r\n\r\n"),
            (
                "two Host headers",
                f"GET /pkg-1.0.whl HTTP/1.1\r\nHost: {host}\r\nHost: {host}\r\n\r\n".encode(),
            ),
            (
                "header over 16 KiB",
                f"GET {target} HTTP/1.1\r\nHost: {host}\r\nX-Big: {'a' * 17000}\r\n\r\n".encode(),
            ),
            (
                "headers over 16 KiB in all",
                f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{wide}\r\n".encode(),
            ),
            (
                "too many headers",
                f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{many}\r\n".encode(),
            ),
            (
                "request line over 16 KiB",
                f"GET {target}?{'q' * 17000} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(),
            ),
            ("bad IPv6 literal", b"GET http://[zz]/ HTTP/1.1\r\nHost: x\r\n\r\n"),
            (
                "user info",
                f"GET http://user:pw@{host}/pkg-1.0.whl HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(),
            ),
            (
                "bad port",
                f"GET http://127.0.0.1:99999/pkg-1.0.whl HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(),
            ),
            ("OPTIONS *", f"OPTIONS * HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()),
            ("GET *", f"GET * HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()),
            (
                "NUL in a header",
                f"GET {target} HTTP/1.1\r\nHost: {host}\r\nX-A: a\x00b\r\n\r\n".encode(),
            ),
            (
                "space in a header name",
                f"GET {target} HTTP/1.1\r\nHost: {host}\r\nBad Name: x\r\n\r\n".encode(),
            ),
            (
                "two different Content-Lengths",
                f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\n"
                f"Content-Length: 4\r\n\r\nabcd".encode(),
            ),
            (
                "two equal Content-Lengths",
                f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\n"
                f"Content-Length: 4\r\n\r\nabcd".encode(),
            ),
            (
                "Content-Length with chunked",
                f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n"
                f"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode(),
            ),
            (
                "chunked with Content-Length",
                f"GET {target} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
                f"Content-Length: 5\r\n\r\n0\r\n\r\n".encode(),
            ),
            (
                "bad Content-Length",
                f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: -1\r\n\r\n".encode(),
            ),
            (
                "unknown Transfer-Encoding",
                f"POST {target} HTTP/1.1\r\nHost: {host}\r\n"
                f"Transfer-Encoding: gzip\r\n\r\n".encode(),
            ),
        ]

    def test_malformed_requests(self) -> defer.Deferred[None]:
        """Each malformed request gets a 4xx status line; the origin sees none
        of them; afterwards the same proxy still serves MISS then HIT with
        the right bytes."""
        return run(self._malformed_requests())

    async def _malformed_requests(self) -> None:
        for name, data in self.malformed():
            raw = await raw_exchange(self, self.pport, data)
            self.assertTrue(raw.startswith(b"HTTP/1.1 4"), f"{name}: {raw[:200]!r}")
            self.assertEqual(self.origin.count(), 0, name)
        http = client(self, self.pport)
        url = f"http://127.0.0.1:{self.oport}/pkg-1.0.whl"
        r1, b1 = await fetch(http, url)
        r2, b2 = await fetch(http, url)
        self.assertEqual((r1.code, header(r1, "x-cache"), b1), (200, "MISS", self.body))
        self.assertEqual((r2.code, header(r2, "x-cache"), b2), (200, "HIT", self.body))
        self.assertEqual(self.origin.count(), 1)

    def test_path_tricks_on_own_pages(self) -> defer.Deferred[None]:
        """Dot segments addressed to the proxy itself are a 404 of its own
        pages, never a file."""
        return run(self._path_tricks_on_own_pages())

    async def _path_tricks_on_own_pages(self) -> None:
        for path in [
            "/../../../../etc/passwd",
            "/%2e%2e/%2e%2e/etc/passwd",
            "//etc/passwd",
        ]:
            raw = await raw_exchange(
                self,
                self.pport,
                f"GET {path} HTTP/1.1\r\nHost: localhost:{self.pport}\r\n\r\n".encode(),
            )
            status, _, body = parse_raw_response(raw)
            self.assertEqual(status, 404, path)
            self.assertNotIn(b"root:", body)
        self.assertEqual(self.origin.count(), 0)

    def test_hostile_host_name_does_not_stall(self) -> defer.Deferred[None]:
        """A long invalid host name in an absolute-form target is answered 400
        (that the host pattern cannot backtrack exponentially, so does not
        stall the reactor, is pinned in test_policy)."""
        return run(self._hostile_host_name_does_not_stall())

    async def _hostile_host_name_does_not_stall(self) -> None:
        raw = await raw_exchange(
            self,
            self.pport,
            b"GET http://" + b"a" * 26 + b"!/ HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        self.assertTrue(raw.startswith(b"HTTP/1.1 400"), raw[:100])
        self.assertEqual(self.origin.count(), 0)
