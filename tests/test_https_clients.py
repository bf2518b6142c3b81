"""HTTPS through the proxy with real clients (SPEC 7): pip and curl through
an intercepting proxy, raw CONNECT tunnels under load, keep-alive inside an
intercepted tunnel.

A test CA plays the public PKI: the HTTPS origins on 127.0.0.1 present a
certificate for "localhost" from it, and the proxy trusts it as its
``upstream_ca``.  Clients trust the proxy's own CA (``ca.pem``, generated in
its cache dir).  Raw clients and origins are Twisted protocols in the test's
reactor; pip, curl and twistd are child processes spawned without blocking
it.  Nothing leaves 127.0.0.0/8.
"""

from __future__ import annotations

import hashlib
import importlib.util
import ipaddress
import os
import stat
import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from cachingproxy.tls.ca import CA_CERT_FILE, CA_KEY_FILE

from .support import (
    TWISTD,
    ChildServer,
    build_wheel,
    checkout_env,
    client_env,
    curl,
    free_port,
    need,
    run,
    run_process,
    start_proxy,
    stored,
    wait_for,
)
from .test_tls import Authority, HTTPSOrigin

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
MiB = 1024 * 1024
_DONE = Failure(ConnectionDone())
CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
"""Variables requests reads for a CA bundle in place of pip's ``--cert``."""


def x_cache(curl_output: str) -> list[str]:
    """The X-Cache values in curl's ``-D -`` header dump."""
    return [
        line.split(":", 1)[1].strip()
        for line in curl_output.splitlines()
        if line.lower().startswith("x-cache:")
    ]


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- raw protocols ---------------------------------------------------------------


class _OriginSide(Protocol):
    """One connection to the raw origin: counts bytes, echoes while the
    origin says so."""

    def __init__(self, origin: RawOrigin) -> None:
        self.origin = origin
        self.received = 0
        self.reason: Failure | None = None
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.origin.connections.append(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += len(data)
        if self.origin.echo:
            self.write(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:  # noqa: N802
        self.reason = reason
        self.lost.callback(None)

    def write(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def close(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]


class RawOrigin:
    """A raw TCP origin on 127.0.0.1 (not HTTP): echoes what it gets while
    ``echo`` is true; every connection is recorded in ``connections``."""

    def __init__(self, test: TestCase) -> None:
        self.echo = True
        self.connections: list[_OriginSide] = []
        factory: Any = ServerFactory.forProtocol(lambda: _OriginSide(self))
        factory.noisy = False
        port: Any = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port: int = port.getHost().port

        async def stop() -> None:
            await port.stopListening()
            for c in self.connections:
                if c.reason is None:
                    c.transport.abortConnection()  # type: ignore[union-attr]
                    await c.lost

        test.addCleanup(lambda: run(stop()))


class TunnelClient(Protocol):
    """A client connection to the proxy that sends ``CONNECT authority`` and
    then speaks raw bytes, or TLS after :meth:`start_tls`."""

    def __init__(self, authority: str) -> None:
        self.authority = authority
        self.received = bytearray()
        self.head: bytes | None = None
        self.reason: Failure | None = None
        self.lost: defer.Deferred[None] = defer.Deferred()

    @classmethod
    async def open(
        cls, test: TestCase, proxy_port: int, authority: str
    ) -> TunnelClient:
        """Connect, CONNECT, and wait for the proxy's answer (must be 200)."""
        protocol = cls(authority)
        factory = ClientFactory.forProtocol(lambda: protocol)
        factory.noisy = False
        await TCP4ClientEndpoint(reactor, "127.0.0.1", proxy_port).connect(factory)

        def close() -> defer.Deferred[None] | None:
            if protocol.reason is not None:
                return None
            protocol.transport.abortConnection()  # type: ignore[union-attr]
            return protocol.lost

        test.addCleanup(close)
        await wait_for(lambda: protocol.head is not None or protocol.closed, 10)
        head = protocol.head or bytes(protocol.received)
        test.assertTrue(
            head.startswith(b"HTTP/1.1 200 "), f"CONNECT {authority} answered {head!r}"
        )
        return protocol

    @property
    def closed(self) -> bool:
        return self.reason is not None

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(  # type: ignore[union-attr]
            f"CONNECT {self.authority} HTTP/1.1\r\n"
            f"Host: {self.authority}\r\n\r\n".encode()
        )

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data
        if self.head is None and b"\r\n\r\n" in self.received:
            head, _, rest = bytes(self.received).partition(b"\r\n\r\n")
            self.head = head
            self.received = bytearray(rest)

    def connectionLost(self, reason: Failure = _DONE) -> None:  # noqa: N802
        self.reason = reason
        self.lost.callback(None)

    def write(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def close(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def start_tls(self, host: str, ca_pem: bytes) -> None:
        """Switch to TLS for ``host``, trusting only ``ca_pem``."""
        options = optionsForClientTLS(host, trustRoot=Certificate.loadPEM(ca_pem))
        self.transport.startTLS(options)  # type: ignore[union-attr]

    async def read(self, size: int, timeout: float = 30.0) -> bytes:
        """Exactly ``size`` bytes (fails if the connection closes first)."""
        await wait_for(lambda: len(self.received) >= size or self.closed, timeout)
        if len(self.received) < size:
            raise AssertionError(
                f"closed after {len(self.received)} of {size} bytes: {self.reason}"
            )
        data = bytes(self.received[:size])
        del self.received[:size]
        return data

    async def read_response(self) -> tuple[int, dict[str, str], bytes]:
        """One HTTP/1.1 response (Content-Length or chunked body)."""
        await wait_for(lambda: b"\r\n\r\n" in self.received or self.closed, 30)
        end = self.received.find(b"\r\n\r\n")
        if end < 0:
            raise AssertionError(f"closed mid-head: {bytes(self.received)!r}")
        lines = bytes(self.received[:end]).decode("latin-1").split("\r\n")
        del self.received[: end + 4]
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            return status, headers, await self.read(int(headers["content-length"]))
        if headers.get("transfer-encoding", "").lower() != "chunked":
            raise AssertionError(f"a response without a length: {headers}")
        body = bytearray()
        while True:
            await wait_for(lambda: b"\r\n" in self.received or self.closed, 30)
            size_end = self.received.find(b"\r\n")
            size = int(bytes(self.received[:size_end]).split(b";")[0], 16)
            del self.received[: size_end + 2]
            chunk = await self.read(size + 2)
            if size == 0:
                return status, headers, bytes(body)
            body += chunk[:-2]


# -- the tests -------------------------------------------------------------------


class _HTTPSTestCase(TestCase):
    """An HTTPS origin for "localhost" from a test "public" CA."""

    def setUp(self) -> None:
        self.public = Authority("test public CA")
        self.public_pem = self.public.write(os.path.abspath(self.mktemp()))
        self.https = HTTPSOrigin(self, self.public.server_options())
        self.origin = self.https.origin

    def intercepting_proxy(self, **overrides: Any) -> tuple[Any, int, str]:
        """An in-process proxy intercepting localhost; with its CA file."""
        values: dict[str, Any] = {
            "intercept": ("localhost",),
            "allow_upstream": (LOOPBACK,),
            "upstream_ca": self.public_pem,
            "connect_ports": frozenset({self.https.port}),
        }
        values.update(overrides)
        service, pport = start_proxy(self, **values)
        return service, pport, os.path.join(service.config.cache_dir, CA_CERT_FILE)


class PipThroughHTTPSProxyTests(_HTTPSTestCase):
    """pip with ``https_proxy`` and ``--cert PROXY_CA`` against an HTTPS index."""

    def setUp(self) -> None:
        if importlib.util.find_spec("pip") is None:
            raise SkipTest(f"pip is not installed for {sys.executable}")
        super().setUp()

    async def pip_download(self, proxy_port: int, proxy_ca: str) -> str:
        dest = os.path.abspath(self.mktemp())
        env = client_env(https_proxy=f"http://127.0.0.1:{proxy_port}")
        # requests lets these override pip's --cert (trust_env): a machine
        # that sets them would make pip distrust the proxy's CA.
        for name in CA_BUNDLE_VARIABLES:
            env.pop(name, None)
        self.assertFalse([k for k in env if k.lower() == "no_proxy"])
        result = await run_process(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-cache-dir",
                "--timeout",
                "15",
                "--retries",
                "0",
                "-d",
                dest,
                "--index-url",
                f"https://localhost:{self.https.port}/simple/",
                "--cert",
                proxy_ca,
                "demo-pkg",
            ],
            env=env,
            timeout=90,
        )
        self.assertEqual(result.code, 0, result.output)
        return dest

    def test_pip_download_through_https_proxy(self) -> defer.Deferred[None]:
        """``pip download`` through ``https_proxy`` (CONNECT, intercepted,
        pip trusting only the proxy's CA via ``--cert``) gets a byte-identical
        wheel from an HTTPS index; a second run gets the wheel from the cache:
        the origin served it once."""
        return run(self._pip())

    async def _pip(self) -> None:
        name, wheel = build_wheel("demo-pkg", "1.0")
        sha256 = hashlib.sha256(wheel).hexdigest()
        html = [("Content-Type", "text/html")]
        self.origin.static(
            "/simple/",
            b'<!DOCTYPE html><html><body><a href="demo-pkg/">demo-pkg</a></body></html>',
            headers=html,
        )
        self.origin.static(
            "/simple/demo-pkg/",
            f'<!DOCTYPE html><html><body><a href="/files/{name}#sha256={sha256}">'
            f"{name}</a></body></html>".encode(),
            headers=html,
        )
        self.origin.static(f"/files/{name}", wheel)
        service, pport, proxy_ca = self.intercepting_proxy()

        first = await self.pip_download(pport, proxy_ca)
        self.assertEqual(os.listdir(first), [name])
        self.assertEqual(read_file(os.path.join(first, name)), wheel)
        self.assertEqual(self.origin.count(f"/files/{name}"), 1)
        # Requests inside the tunnel are cached under the https URL.
        await stored(service, self.https.url(f"/files/{name}"))

        second = await self.pip_download(pport, proxy_ca)
        self.assertEqual(read_file(os.path.join(second, name)), wheel)
        self.assertEqual(self.origin.count(f"/files/{name}"), 1)


class TwistdInterceptionTests(_HTTPSTestCase):
    """A real ``twistd cachingproxy --intercept`` process, with curl."""

    def setUp(self) -> None:
        need("curl")
        super().setUp()

    async def curl(self, pport: int, url: str, cacert: str) -> tuple[str, bytes]:
        result = await curl(url, "--cacert", cacert, proxy=pport, out=self.mktemp())
        self.assertEqual(result.code, 0, result.output)
        return result.output, result.body

    def test_twistd_intercepts_and_prints_its_ca(self) -> defer.Deferred[None]:
        """``twistd cachingproxy --intercept localhost --upstream-ca …``
        serves ``curl --cacert <cache>/ca.pem https://localhost:P/…`` MISS
        then HIT with one origin request; the generated CA key is mode 0600;
        ``cachingproxy-cache ca-cert`` prints exactly the CA file's PEM."""
        return run(self._twistd())

    async def _twistd(self) -> None:
        body = os.urandom(256 * 1024)
        self.origin.static("/file.whl", body)
        cache_dir = os.path.abspath(self.mktemp())
        pport = free_port()
        cwd = self.mktemp()
        os.makedirs(cwd)
        child = ChildServer(
            self,
            [
                *TWISTD,
                "-n",
                "--pidfile=",
                "cachingproxy",
                "--listen",
                f"tcp:{pport}:interface=127.0.0.1",
                "--cache-dir",
                cache_dir,
                "--allow-client",
                "127.0.0.1",
                "--allow-upstream",
                "127.0.0.0/8",
                "--intercept",
                "localhost",
                "--upstream-ca",
                self.public_pem,
                "--connect-ports",
                str(self.https.port),
            ],
            pport,
            env=checkout_env(),
            path=cwd,
        )
        await child.wait_listening()
        ca_file = os.path.join(cache_dir, CA_CERT_FILE)
        url = self.https.url("/file.whl")
        seen = []
        for _ in range(2):
            output, got = await self.curl(pport, url, ca_file)
            self.assertEqual(got, body)
            seen += x_cache(output)
        self.assertEqual(seen, ["MISS", "HIT"], child.log())
        self.assertEqual(self.origin.count("/file.whl"), 1)

        key_mode = stat.S_IMODE(os.stat(os.path.join(cache_dir, CA_KEY_FILE)).st_mode)
        self.assertEqual(oct(key_mode), oct(0o600))
        printed = await run_process(
            [
                *(sys.executable, "-m", "cachingproxy.ops.cachetool"),
                *("--cache-dir", cache_dir, "ca-cert"),
            ],
            env=checkout_env(),
            timeout=30,
        )
        self.assertEqual(printed.code, 0, printed.output)
        pem = read_file(ca_file)
        self.assertIn(b"-----BEGIN CERTIFICATE-----", pem)
        self.assertEqual(printed.out, pem)
        await child.stop()


class RawTunnelTests(TestCase):
    """A CONNECT tunnel (not intercepted) to a raw TCP origin."""

    def setUp(self) -> None:
        self.raw = RawOrigin(self)
        self.log = os.path.abspath(self.mktemp())
        _, self.pport = start_proxy(
            self,
            allow_upstream=(LOOPBACK,),
            connect_ports=frozenset({self.raw.port}),
            access_log=self.log,
        )
        self.authority = f"127.0.0.1:{self.raw.port}"

    def tunnel_lines(self) -> list[list[str]]:
        with open(self.log, encoding="utf-8") as f:
            return [
                fields
                for fields in map(str.split, f)
                if fields[2:4] == ["CONNECT", self.authority]
            ]

    def test_large_transfer_then_client_closes(self) -> defer.Deferred[None]:
        """4 MiB through the tunnel and back (echoed) arrive byte-exact; bytes
        the client sends just before closing all reach the origin, which
        then sees a clean close; the access log line counts both ways."""
        return run(self._client_closes())

    async def _client_closes(self) -> None:
        client = await TunnelClient.open(self, self.pport, self.authority)
        await wait_for(lambda: len(self.raw.connections) == 1)
        origin = self.raw.connections[0]
        data = os.urandom(4 * MiB)
        client.write(data)
        echoed = await client.read(len(data), timeout=30)
        self.assertEqual(hashlib.sha256(echoed).digest(), hashlib.sha256(data).digest())
        self.assertEqual(origin.received, len(data))

        self.raw.echo = False
        tail = os.urandom(1 * MiB)
        client.write(tail)
        client.close()
        await wait_for(lambda: origin.reason is not None, 10)
        assert origin.reason is not None
        self.assertTrue(origin.reason.check(ConnectionDone), origin.reason)
        self.assertEqual(origin.received, len(data) + len(tail))
        await client.lost

        await wait_for(lambda: bool(self.tunnel_lines()), 10)
        [line] = self.tunnel_lines()
        self.assertEqual(
            (line[4], int(line[5]), line[7]),
            ("200", 2 * len(data) + len(tail), "TUNNEL"),
        )

    def test_origin_closes(self) -> defer.Deferred[None]:
        """When the origin sends its last bytes and closes, the client gets
        every one of them and then a clean close."""
        return run(self._origin_closes())

    async def _origin_closes(self) -> None:
        client = await TunnelClient.open(self, self.pport, self.authority)
        client.write(b"hello")
        self.assertEqual(await client.read(5), b"hello")
        [origin] = self.raw.connections
        farewell = os.urandom(2 * MiB)
        origin.write(farewell)
        origin.close()
        await wait_for(lambda: client.closed, 10)
        assert client.reason is not None
        self.assertTrue(client.reason.check(ConnectionDone), client.reason)
        self.assertEqual(len(client.received), len(farewell))
        self.assertEqual(bytes(client.received), farewell)
        await wait_for(lambda: bool(self.tunnel_lines()), 10)


class InterceptedKeepAliveTests(_HTTPSTestCase):
    """Several requests on one TLS connection inside an intercepted tunnel."""

    def test_keep_alive_inside_intercepted_tunnel(self) -> defer.Deferred[None]:
        """One CONNECT, one TLS handshake, seven requests: four one after
        another, then three pipelined in one write, the last with
        ``Connection: close``.  Each is answered in full and in order (MISS
        for a new URL, HIT after), the connection stays open until that
        last answer and then closes; the origin saw each URL once."""
        return run(self._keep_alive())

    async def _keep_alive(self) -> None:
        bodies = {f"/pkg-{i}.whl": os.urandom(100_000 + i) for i in range(2)}
        for path, body in bodies.items():
            self.origin.static(path, body)
        service, pport, proxy_ca = self.intercepting_proxy()
        authority = f"localhost:{self.https.port}"
        client = await TunnelClient.open(self, pport, authority)
        client.start_tls("localhost", read_file(proxy_ca))

        def get(path: str, close: bool = False) -> bytes:
            last = "Connection: close" if close else "Accept: */*"
            return (
                f"GET {path} HTTP/1.1\r\nHost: {authority}\r\n{last}\r\n\r\n".encode()
            )

        async def answer(path: str, cache: str) -> None:
            status, headers, body = await client.read_response()
            self.assertEqual(
                (status, headers.get("x-cache"), len(body), body == bodies[path]),
                (200, cache, len(bodies[path]), True),
            )

        for path, cache in [
            ("/pkg-0.whl", "MISS"),
            ("/pkg-1.whl", "MISS"),
            ("/pkg-0.whl", "HIT"),
            ("/pkg-1.whl", "HIT"),
        ]:
            if cache == "HIT":
                await stored(service, self.https.url(path))
            client.write(get(path))
            await answer(path, cache)
            self.assertFalse(client.closed)

        pipelined = ["/pkg-1.whl", "/pkg-0.whl", "/pkg-1.whl"]
        client.write(
            b"".join(
                get(p, close=n == len(pipelined) - 1) for n, p in enumerate(pipelined)
            )
        )
        for path in pipelined:
            await answer(path, "HIT")
        await wait_for(lambda: client.closed, 10)
        self.assertEqual(client.received, b"")
        self.assertEqual([self.origin.count(p) for p in bodies], [1, 1])
