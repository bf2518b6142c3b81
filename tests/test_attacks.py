"""Hardening against hostile clients and confused deputies (issue 10, D1,
D3, D5, D6, D7, D11): checks at the request head, IPv4 embedded in IPv6,
clients leaving early, the listen backlog, purges relayed by a proxy, method
names, IPv6 clients by /64, one-line option errors.

Loopback and in-memory transports only; the SSRF test that lets the proxy
try its luck with real sockets runs ``twistd`` in a network namespace with
only ``lo`` (skipped where namespaces cannot be made).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import ResponseFailed
from twisted.web.server import NOT_DONE_YET, Request

from cachingproxy.cache.variants import MAX_VARIANTS, normalise
from cachingproxy.fetch.destination import DestinationPolicy, embedded_ipv4
from cachingproxy.front import channel as channel_module
from cachingproxy.front.backlog import LISTEN_BACKLOG, with_backlog
from cachingproxy.front.limits import client_key

from .support import (
    TWISTD,
    Child,
    GuardedReactor,
    NetnsUnavailable,
    add_namespace,
    checkout_env,
    client,
    curl,
    downloads_done,
    fetch,
    header,
    own_page,
    parse_raw_response,
    pause,
    raw_connect,
    raw_exchange,
    raw_get,
    run_process,
    start_origin,
    start_proxy,
    start_proxy_with,
    stored,
    wait_for,
)

SHA_BOB = "{SHA}" + base64.b64encode(hashlib.sha1(b"builder").digest()).decode()


def _upload_head(url: str, length: int, extra: str = "") -> bytes:
    authority = url.split("/", 3)[2]
    return (
        f"POST {url} HTTP/1.1\r\nHost: {authority}\r\n{extra}"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


class HeadGateTests(TestCase):
    """D1: access, credentials and size are checked when the head is complete."""

    def _origin(self) -> tuple[Any, int, list[bytes]]:
        origin, oport = start_origin(self)
        bodies: list[bytes] = []

        def upload(request: Request) -> bytes:
            assert request.content is not None
            bodies.append(request.content.read())
            return b"stored"

        origin.route("/upload", upload)
        return origin, oport, bodies

    async def test_client_outside_allow_client_refused_before_the_body(self) -> None:
        """A client outside --allow-client announcing 200 MiB gets 403 as soon
        as its head is in, without sending a body byte."""
        origin, oport, _ = self._origin()
        _, pport = start_proxy(self, allow_client=(ipaddress.ip_network("10.0.0.0/8"),))
        url = f"http://127.0.0.1:{oport}/upload"
        raw = await raw_exchange(self, pport, _upload_head(url, 200 * 1024**2))
        status, _, body = parse_raw_response(raw)
        self.assertEqual(status, 403)
        self.assertIn(b"client not allowed", body)
        self.assertEqual(origin.count(), 0)

    async def test_absurd_content_length_is_413(self) -> None:
        origin, oport, _ = self._origin()
        _, pport = start_proxy(self)
        url = f"http://127.0.0.1:{oport}/upload"
        raw = await raw_exchange(self, pport, _upload_head(url, 10**15))
        self.assertEqual(parse_raw_response(raw)[0], 413)
        self.assertEqual(origin.count(), 0)

    async def test_chunked_body_past_the_limit_is_413(self) -> None:
        """A chunked body (no declared size) is cut off at the limit."""
        self.patch(channel_module, "MAX_REQUEST_BODY", 10_000)
        origin, oport, _ = self._origin()
        _, pport = start_proxy(self)
        url = f"http://127.0.0.1:{oport}/upload"
        chunk = b"x" * 4096
        data = (
            f"POST {url} HTTP/1.1\r\nHost: 127.0.0.1:{oport}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        ).encode() + (b"1000\r\n" + chunk + b"\r\n") * 4
        raw = await raw_exchange(self, pport, data)
        self.assertEqual(parse_raw_response(raw)[0], 413)
        self.assertEqual(origin.count(), 0)

    async def test_missing_or_wrong_credentials_refused_before_the_body(self) -> None:
        """With --proxy-auth, no credentials or a wrong password (bcrypt,
        checked in a thread) get 407 at the head; the right ones pass and
        the body arrives whole."""
        import bcrypt

        _, oport, bodies = self._origin()
        path = os.path.abspath(self.mktemp())
        alice = bcrypt.hashpw(b"wonderland", bcrypt.gensalt(rounds=4)).decode()
        with open(path, "w") as f:
            f.write(f"alice:{alice}\nbob:{SHA_BOB}\n")
        _, pport = start_proxy(self, proxy_auth=path)
        url = f"http://127.0.0.1:{oport}/upload"
        big = 100 * 1024**2
        for credentials in ("", "alice:wrong", "nobody:x", "bob:wrong"):
            extra = (
                "Proxy-Authorization: Basic "
                + base64.b64encode(credentials.encode()).decode()
                + "\r\n"
                if credentials
                else ""
            )
            raw = await raw_exchange(self, pport, _upload_head(url, big, extra))
            status, headers, _ = parse_raw_response(raw)
            self.assertEqual(status, 407, credentials)
            self.assertIn("proxy-authenticate", headers)
        body = os.urandom(300_000)
        for user in ("alice:wonderland", "bob:builder"):
            token = base64.b64encode(user.encode()).decode()
            head = _upload_head(
                url,
                len(body),
                f"Proxy-Authorization: Basic {token}\r\nConnection: close\r\n",
            )
            raw = await raw_exchange(self, pport, head + body, timeout=10)
            self.assertEqual(parse_raw_response(raw)[0], 200, user)
        self.assertEqual(bodies, [body, body])

    async def test_method_must_be_a_token(self) -> None:
        """D11: a method name with other characters than RFC 9110 token
        characters is a 400 and never reaches the origin."""
        origin, oport = start_origin(self)
        _, pport = start_proxy(self)
        for method in (b"GE(T", b"G\x01T", b"GET,POST", b'G"T'):
            data = (
                method
                + f" http://127.0.0.1:{oport}/ HTTP/1.1\r\nHost: 127.0.0.1:{oport}\r\n\r\n".encode()
            )
            raw = await raw_exchange(self, pport, data)
            self.assertEqual(parse_raw_response(raw)[0], 400, method)
        self.assertEqual(origin.count(), 0)


class EmbeddedIPv4Tests(TestCase):
    """D3: IPv6 addresses that lead to IPv4 ones are checked as those."""

    def test_unwrapping(self) -> None:
        v4 = ipaddress.IPv4Address
        cases = {
            "64:ff9b::a9fe:a9fe": [v4("169.254.169.254")],
            "64:ff9b:1::a9fe:a9fe": [v4("169.254.169.254")],
            "2002:a9fe:a9fe::1": [v4("169.254.169.254")],
            "::169.254.169.254": [v4("169.254.169.254")],
            "::ffff:10.0.0.1": [v4("10.0.0.1")],
            "2001:0:4136:e378:8000:63bf:3fff:fdd2": [
                v4("65.54.227.120"),
                v4("192.0.2.45"),
            ],
            "2606:4700::1111": [],
            "::1": [],
        }
        for address, expected in cases.items():
            self.assertEqual(
                embedded_ipv4(ipaddress.IPv6Address(address)), expected, address
            )

    def test_policy_refuses_embedded_private_addresses(self) -> None:
        policy = DestinationPolicy()
        for address in (
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::7f00:1",
            "64:ff9b::a00:1",
            "64:ff9b:1::c0a8:101",
            "2002:a9fe:a9fe::1",
            "2002:7f00:1::",
            "::169.254.169.254",
            "::127.0.0.1",
        ):
            self.assertIsNotNone(policy.refusal(address, 80), address)
        for address in ("64:ff9b::808:808", "2002:808:808::1", "2606:4700::1111"):
            self.assertIsNone(policy.refusal(address, 80), address)
        allowing = DestinationPolicy(
            allow_upstream=(ipaddress.ip_network("10.0.0.0/8"),)
        )
        self.assertIsNone(allowing.refusal("64:ff9b::a00:1", 8080))

    async def test_nat64_metadata_address_refused_before_connecting(self) -> None:
        """In process, with a reactor that records (and stops) every
        connection: 403, and no connection was even tried."""
        guard = GuardedReactor()
        _, pport = start_proxy_with(self, reactor_=guard)
        for host in ("[64:ff9b::a9fe:a9fe]", "[2002:a9fe:a9fe::1]", "[::a9fe:a9fe]"):
            status, _, body = await raw_get(
                self, pport, f"http://{host}/latest/meta-data/"
            )
            self.assertEqual(status, 403, (host, body))
        self.assertEqual(guard.connects, [])

    def test_nat64_in_a_namespace(self) -> defer.Deferred[None]:
        """A real twistd in a namespace with only ``lo``, asked by curl for
        the metadata service through the NAT64 prefix: 403 (before, the
        proxy tried to connect: 502)."""
        return defer.Deferred.fromCoroutine(self._nat64_in_a_namespace())

    async def _nat64_in_a_namespace(self) -> None:
        try:
            name = await add_namespace(self, "a")
        except NetnsUnavailable as e:
            raise SkipTest(str(e)) from None
        port = 3128
        cwd = _scratch(self)
        proxy = Child(
            self,
            [
                "ip",
                "netns",
                "exec",
                name,
                *TWISTD,
                "-n",
                "--pidfile=",
                "cachingproxy",
                "--workers",
                "1",
                "--cache-dir",
                os.path.abspath(self.mktemp()),
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
            ],
            env=checkout_env(),
            path=cwd,
        )
        await proxy.wait_for_text("cachingproxy listening on")
        codes = []
        for url in ("http://[64:ff9b::a9fe:a9fe]/", "http://[2002:a9fe:a9fe::]/"):
            result = await curl(
                url, proxy=port, out=os.devnull, inside=("ip", "netns", "exec", name)
            )
            codes.append(str(result.status))
        self.assertEqual(codes, ["403", "403"], proxy.text())


class ClientGoneTests(TestCase):
    """D5: a client that hangs up while the proxy waits for the upstream
    head leaves no traceback (trial fails the test on a logged error)."""

    async def test_hang_up_before_the_head(self) -> None:
        origin, oport = start_origin(self)
        gate: defer.Deferred[None] = defer.Deferred()
        held: list[Request] = []

        def slow(request: Request) -> Any:
            held.append(request)

            def answer(_: object) -> None:
                request.setHeader(b"Content-Length", b"5")
                request.write(b"hello")
                request.finish()

            gate.addCallback(answer)
            return NOT_DONE_YET

        origin.route("/slow-1.0.tar.gz", slow)
        service, pport = start_proxy(self)
        url = f"http://127.0.0.1:{oport}/slow-1.0.tar.gz"
        raw = await raw_connect(
            self,
            pport,
            f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1:{oport}\r\n\r\n".encode(),
        )
        await wait_for(lambda: bool(held))
        raw.transport.abortConnection()  # type: ignore[union-attr]
        await raw.lost
        await pause(0.05)
        gate.callback(None)
        await stored(service, url)
        r, body = await fetch(client(self, pport), url)
        self.assertEqual((r.code, body), (200, b"hello"))


class BacklogTests(TestCase):
    """D6: the endpoints the proxy builds listen with a deep queue."""

    def test_with_backlog(self) -> None:
        self.assertEqual(with_backlog("tcp:3128"), f"tcp:3128:backlog={LISTEN_BACKLOG}")
        self.assertEqual(with_backlog("tcp:80:backlog=5"), "tcp:80:backlog=5")
        self.assertEqual(
            with_backlog("unix:/run/cp.sock"),
            f"unix:/run/cp.sock:backlog={LISTEN_BACKLOG}",
        )
        self.assertEqual(
            with_backlog("systemd:domain=INET:index=0"), "systemd:domain=INET:index=0"
        )

    def test_listening_port_backlog(self) -> None:
        service, _ = start_proxy(self)
        self.assertEqual(service.ports[0].backlog, LISTEN_BACKLOG)  # type: ignore[attr-defined]
        own, _ = start_proxy(self, listen=("tcp:0:interface=127.0.0.1:backlog=7",))
        self.assertEqual(own.ports[0].backlog, 7)  # type: ignore[attr-defined]


class RelayedPurgeTests(TestCase):
    """D7: a purge that came through a proxy is not the local operator's."""

    async def test_purge_through_another_proxy_refused(self) -> None:
        """A client that sends DELETE /cache through proxy A (allowed to
        reach 127.0.0.1) to proxy B on the same host cannot empty B: B sees
        A's Via. Forwarded and X-Forwarded-For count too; a direct local
        purge still works."""
        origin, oport = start_origin(self)
        origin.static("/keep-1.0.tar.gz", b"k" * 100)
        target, bport = start_proxy(self)
        url = f"http://127.0.0.1:{oport}/keep-1.0.tar.gz"
        await fetch(client(self, bport), url)
        await stored(target, url)
        _, aport = start_proxy(self, names=("proxy-a.test",))
        purge = "/cache?prefix=http%3A%2F%2F"
        r, body = await fetch(
            client(self, aport), f"http://127.0.0.1:{bport}{purge}", method="DELETE"
        )
        self.assertEqual(r.code, 403, body)
        for relayed in ({"Forwarded": "for=10.0.0.9"}, {"X-Forwarded-For": "10.0.0.9"}):
            r, _ = await own_page(self, bport, purge, "DELETE", relayed)
            self.assertEqual(r.code, 403, relayed)
        store = target.store
        assert store is not None
        self.assertEqual(len(await store.lookup(url)), 1)
        r, body = await own_page(self, bport, purge, "DELETE")
        self.assertEqual((r.code, body), (200, b'{"removed": 1}'))


class IPv6ClientTests(SynchronousTestCase):
    """D11: one IPv6 /64 is one client for --max-client-connections."""

    def test_client_key(self) -> None:
        key = client_key(IPv6Address("TCP", "2001:db8:1:2::5", 1))
        self.assertEqual(key, "2001:db8:1:2::/64")
        self.assertEqual(client_key(IPv6Address("TCP", "2001:db8:1:2:ffff::9", 1)), key)
        self.assertNotEqual(client_key(IPv6Address("TCP", "2001:db8:1:3::5", 1)), key)
        self.assertEqual(client_key(IPv6Address("TCP", "fe80::1%eth0", 1)), "fe80::1")
        self.assertEqual(client_key(IPv4Address("TCP", "10.0.0.1", 1)), "10.0.0.1")
        self.assertEqual(client_key(IPv6Address("TCP", "::1", 1)), "::1")

    def test_cap_counts_the_64(self) -> None:
        """With a cap of 2, a third connection from another address of the
        same /64 is refused with 429; another /64 is not."""
        site = channel_module.ProxySite(None, max_client_connections=2)
        answers = []
        for address in ("2001:db8::1", "2001:db8::2", "2001:db8::3", "2001:db8:0:1::1"):
            transport = StringTransport(peerAddress=IPv6Address("TCP", address, 4000))
            protocol = site.buildProtocol(transport.getPeer())
            protocol.makeConnection(transport)
            answers.append(transport.value()[:12])
            self.addCleanup(protocol.connectionLost, channel_module._DONE)
        self.assertEqual(answers, [b"", b"", b"HTTP/1.1 429", b""])


def _scratch(test: SynchronousTestCase) -> str:
    path = os.path.abspath(test.mktemp())
    os.makedirs(path)
    return path


class OptionErrorTests(SynchronousTestCase):
    """D11: a bad option value is one error line, not the whole usage."""

    async def test_bad_value_is_short(self) -> None:
        result = await run_process(
            [*TWISTD, "-n", "cachingproxy", "--read-timeout", "soon"],
            env=checkout_env(),
            timeout=120,
            path=_scratch(self),
        )
        lines = [line for line in result.output.splitlines() if line]
        self.assertNotEqual(result.code, 0)
        self.assertLessEqual(len(lines), 3, lines)
        self.assertIn("--read-timeout", lines[-1])
        self.assertNotIn("--max-object-size", result.output)


class VariantTests(TestCase):
    """D2: variants per URL are capped, and equivalent values share one."""

    async def test_variants_capped(self) -> None:
        """An origin that varies on a header any client sets: 40 distinct
        values leave at most MAX_VARIANTS entries, the newest kept."""
        origin, oport = start_origin(self)

        def flavoured(request: Request) -> bytes:
            request.setHeader(b"Vary", b"X-Flavour")
            request.setHeader(b"Cache-Control", b"max-age=3600")
            return b"flavour " + (request.getHeader(b"x-flavour") or b"")

        origin.route("/v.json", flavoured)
        service, pport = start_proxy(self)
        http = client(self, pport)
        url = f"http://127.0.0.1:{oport}/v.json"
        for i in range(40):
            r, body = await fetch(http, url, {"X-Flavour": f"f{i}"})
            self.assertEqual(body, b"flavour f%d" % i)
            await stored(service, url, min(i + 1, MAX_VARIANTS))
        store = service.store
        assert store is not None
        for _ in range(1000):  # until the last one is committed (and trimmed)
            entries = await store.lookup(url)
            if any(e.variant.endswith("=f39") for e in entries):
                break
            await pause(0.01)
        await downloads_done(service)
        entries = await store.lookup(url)
        self.assertLessEqual(len(entries), MAX_VARIANTS)
        r, body = await fetch(http, url, {"X-Flavour": "f39"})
        self.assertEqual((header(r, "x-cache"), body), ("HIT", b"flavour f39"))

    async def test_equivalent_accept_encoding_shares_a_variant(self) -> None:
        origin, oport = start_origin(self)
        origin.static(
            "/enc.js",
            b"js" * 100,
            headers=[("Vary", "Accept-Encoding"), ("Cache-Control", "max-age=3600")],
        )
        service, pport = start_proxy(self)
        http = client(self, pport)
        url = f"http://127.0.0.1:{oport}/enc.js"
        await fetch(http, url, {"Accept-Encoding": "gzip, deflate, br"})
        await stored(service, url)
        for same in ("br,gzip,deflate", "GZIP;q=1.0, br, deflate, zstd;q=0"):
            r, _ = await fetch(http, url, {"Accept-Encoding": same})
            self.assertEqual(header(r, "x-cache"), "HIT", same)
        r, _ = await fetch(http, url, {"Accept-Encoding": "identity"})
        self.assertEqual(header(r, "x-cache"), "MISS")
        await stored(service, url, 2)
        self.assertEqual(origin.count(), 2)

    def test_normalise(self) -> None:
        self.assertEqual(
            normalise("accept-encoding", "gzip, br;q=0.5, x;q=0"), "br,gzip"
        )
        self.assertEqual(
            normalise("accept", "Text/HTML; q=0.1 , application/json"),
            "text/html;q=0.1,application/json",
        )
        self.assertEqual(normalise("user-agent", "a   b"), "a b")
        self.assertEqual(normalise("accept", None), "")


class MirrorDigestTests(TestCase):
    """D8: a file stored through the forward path is checked against the
    digest an index published before the mirror serves it."""

    async def test_forward_stored_tampered_file_not_served_by_the_mirror(self) -> None:
        from .test_mirror import WHEEL, demo_mirror

        tampered = WHEEL[:-1] + b"X"
        _origin, base, service, pport = demo_mirror(self, tampered)
        key = f"{base}packages/demo-1.0-py3-none-any.whl"
        _, body = await fetch(client(self, pport), key)  # the forward path
        self.assertEqual(body, tampered)
        await stored(service, key)
        http = client(self)
        local = f"http://127.0.0.1:{pport}"
        await fetch(http, f"{local}/pypi/simple/demo/")
        with self.assertRaises(ResponseFailed):
            await fetch(http, f"{local}/pypi/packages/demo-1.0-py3-none-any.whl")
        assert service.store is not None
        self.assertEqual(await service.store.lookup(key), [])
        self.flushLoggedErrors()

    async def test_forward_stored_good_file_is_a_hit(self) -> None:
        from .test_mirror import WHEEL, demo_mirror

        origin, base, service, pport = demo_mirror(self, WHEEL)
        key = f"{base}packages/demo-1.0-py3-none-any.whl"
        await fetch(client(self, pport), key)
        await stored(service, key)
        http = client(self)
        local = f"http://127.0.0.1:{pport}"
        await fetch(http, f"{local}/pypi/simple/demo/")
        r, body = await fetch(http, f"{local}/pypi/packages/demo-1.0-py3-none-any.whl")
        self.assertEqual((header(r, "x-cache"), body), ("HIT", WHEEL))
        self.assertEqual(origin.count("/packages/demo-1.0-py3-none-any.whl"), 1)
