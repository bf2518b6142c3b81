"""Transparent interception for real: network namespaces, nftables, iptables.

Each test makes three network namespaces of its own (``support.Netns``):
``client`` — ``router`` — ``origin``. The router forwards between them and
loads the shipped interception rules (``etc/nftables/transparent.nft`` or
``etc/iptables/transparent.sh``) that redirect the client side's TCP port 80
to a real ``twistd -n cachingproxy`` running in the router namespace. The
origin is ``python -m http.server`` in its namespace, logging every request.
``curl`` in the client namespace, with no proxy configured, fetches from the
origin's address and is answered through the cache. Every address used is
inside these namespaces; all of them, and every process in them, are removed
by cleanups even when a test fails.
"""

from __future__ import annotations

import os
import re
import shutil
import sys

from twisted.internet import defer
from twisted.trial.unittest import SkipTest, TestCase

from .support import (
    TWISTD,
    Child,
    Netns,
    NetnsUnavailable,
    ProcessResult,
    checkout_env,
    curl,
    etc_path,
    make_netns,
    need,
    no_proxy_env,
    run,
    run_process,
    wait_for,
    with_defines,
)

PROXY_PORT = 3128
"""The proxy's port inside the router namespace (no other test can use it)."""

PACKAGE = "/pkg-1.0.tar.gz"
OTHER = "/other-2.0.tar.gz"

_ORIGIN_LOG = re.compile(r'^(\S+) - - \[[^\]]*\] "GET (\S+) HTTP/1\.[01]"', re.M)


class Topology:
    """One test's namespaces with the origin server and the proxy running."""

    def __init__(self, test: TestCase, netns: Netns) -> None:
        self.test = test
        self.netns = netns
        self.bodies = {PACKAGE: os.urandom(200_000), OTHER: os.urandom(50_000)}
        self.access_log = os.path.abspath(test.mktemp())
        self.origin: Child | None = None
        self.proxy: Child | None = None

    async def start(self) -> None:
        """Start the origin's web server and the proxy; wait until both listen."""
        netns = self.netns
        docroot = self.test.mktemp()
        os.makedirs(docroot)
        for path, body in self.bodies.items():
            with open(docroot + path, "wb") as f:
                f.write(body)
        self.origin = Child(
            self.test,
            netns.exec(
                netns.origin,
                sys.executable,
                "-u",
                "-m",
                "http.server",
                "80",
                "--bind",
                "0.0.0.0",
                "--directory",
                docroot,
            ),
        )
        cwd = self.test.mktemp()
        os.makedirs(cwd)
        self.proxy = Child(
            self.test,
            netns.exec(
                netns.router,
                *TWISTD,
                "-n",
                "--pidfile=",
                "cachingproxy",
                "--listen",
                f"tcp:{PROXY_PORT}:interface={netns.ROUTER_LAN_IP}",
                "--cache-dir",
                os.path.abspath(self.test.mktemp()),
                "--allow-upstream",
                netns.UP_NET,
                "--allow-client",
                netns.LAN_NET,
                "--access-log",
                self.access_log,
            ),
            env=checkout_env(),
            path=cwd,
        )
        await self.origin.wait_for_text("Serving HTTP on")
        await self.proxy.wait_for_text("cachingproxy listening on")

    def origin_requests(self) -> list[tuple[str, str]]:
        """(client address, path) of every GET the origin logged."""
        assert self.origin is not None
        return _ORIGIN_LOG.findall(self.origin.text())

    def logged_urls(self) -> list[str]:
        """The URL of every access-log line of the proxy."""
        if not os.path.exists(self.access_log):
            return []
        with open(self.access_log) as f:
            return [line.split()[3] for line in f if len(line.split()) > 3]

    async def curl(
        self, address: str, path: str, *options: str
    ) -> tuple[ProcessResult, int, dict[str, str], bytes]:
        """``curl`` in the client namespace with no proxy configured: the
        result, status, lower-cased headers and body."""
        result = await curl(
            f"http://{address}{path}",
            *options,
            out=self.test.mktemp(),
            max_time=10,
            inside=self.netns.exec(self.netns.client),
        )
        self.test.assertEqual(result.code, 0, result.output + self.logs())
        return result.process, result.status, result.headers, result.body

    def logs(self) -> str:
        """The proxy's and the origin's output, for failure messages."""
        parts = []
        for name, child in (("proxy", self.proxy), ("origin", self.origin)):
            if child is not None:
                parts.append(f"\n--- {name} ---\n{child.text()}")
        return "".join(parts)


async def _topology(test: TestCase, router_hosts: str = "") -> Topology:
    need("curl")
    try:
        netns = await make_netns(test, router_hosts)
    except NetnsUnavailable as e:
        raise SkipTest(str(e)) from None
    return Topology(test, netns)


async def _in_router(topology: Topology, argv: list[str], **env: str) -> ProcessResult:
    netns = topology.netns
    return await run_process(
        netns.exec(netns.router, *argv), env=no_proxy_env(**env), timeout=30
    )


async def _redirect_all(test: TestCase, topology: Topology) -> None:
    """Redirect the client side's port 80 to the proxy in the router: with
    etc/nftables/transparent.nft, or etc/iptables/transparent.sh when nft is
    missing or cannot load it."""
    netns = topology.netns
    failures = []
    if shutil.which("nft") is not None:
        with open(etc_path("nftables", "transparent.nft")) as f:
            rules = with_defines(
                f.read(),
                LAN_IF=f'"{netns.LAN_IF}"',
                PROXY_PORT=str(PROXY_PORT),
                # The proxy runs as root here: its own traffic is root's.
                PROXY_USER='"root"',
            )
        path = os.path.abspath(test.mktemp())
        with open(path, "w") as f:
            f.write(rules)
        result = await _in_router(topology, ["nft", "-f", path])
        if result.code == 0:
            return
        failures.append(result.output)
    if shutil.which("iptables") is not None:
        result = await _in_router(
            topology,
            ["sh", etc_path("iptables", "transparent.sh"), "all"],
            LAN_IF=netns.LAN_IF,
            PROXY_PORT=str(PROXY_PORT),
            PROXY_USER="root",
        )
        if result.code == 0:
            return
        failures.append(result.output)
    if not failures:
        raise SkipTest("neither nft nor iptables is installed (.ci/run installs nft)")
    raise AssertionError("cannot redirect port 80:\n" + "\n".join(failures))


class TransparentInterceptionTests(TestCase):
    """A client with no proxy setting is served through the cache by a router
    that redirects its port-80 traffic, using the rules shipped in etc/."""

    timeout = 60

    def test_nftables_all_port_80(self) -> defer.Deferred[None]:
        """With etc/nftables/transparent.nft (all port-80 traffic; the iptables
        script if nft is missing or fails) loaded in the router: MISS, then HIT with the origin's bytes and one origin request
        (made by the proxy, from the router's address); an HTTP/1.0 request
        without Host reaches its original destination (SO_ORIGINAL_DST); and
        with the origin's server stopped, both files are still served."""
        return run(self._nftables_all())

    async def _nftables_all(self) -> None:
        topology = await _topology(self)
        netns = topology.netns
        await _redirect_all(self, topology)
        await topology.start()
        body = topology.bodies[PACKAGE]

        _, status1, h1, body1 = await topology.curl(netns.ORIGIN_IP, PACKAGE)
        _, status2, h2, body2 = await topology.curl(netns.ORIGIN_IP, PACKAGE)
        self.assertEqual((status1, status2), (200, 200), topology.logs())
        self.assertEqual((h1.get("x-cache"), h2.get("x-cache")), ("MISS", "HIT"))
        self.assertEqual((body1, body2), (body, body))
        self.assertEqual(
            topology.origin_requests(), [(netns.ROUTER_UP_IP, PACKAGE)], topology.logs()
        )

        # No Host header: only the connection's original destination (the
        # second origin address) tells the proxy where the client meant to go.
        no_host = ("--http1.0", "-H", "Host:")
        _, status3, h3, body3 = await topology.curl(netns.ORIGIN_IP2, OTHER, *no_host)
        self.assertEqual(status3, 200, topology.logs())
        self.assertEqual(h3.get("x-cache"), "MISS")
        self.assertEqual(body3, topology.bodies[OTHER])
        self.assertIn((netns.ROUTER_UP_IP, OTHER), topology.origin_requests())
        # The line is written once the response is over: wait for it.
        other = f"http://{netns.ORIGIN_IP2}{OTHER}"
        await wait_for(lambda: other in topology.logged_urls())

        assert topology.origin is not None
        await topology.origin.stop()
        _, status4, h4, body4 = await topology.curl(netns.ORIGIN_IP, PACKAGE)
        _, status5, h5, body5 = await topology.curl(netns.ORIGIN_IP2, OTHER, *no_host)
        _, status6, h6, _ = await topology.curl(netns.ORIGIN_IP, "/missing-1.0.tar.gz")
        self.assertEqual((status4, status5), (200, 200), topology.logs())
        self.assertEqual((h4.get("x-cache"), h5.get("x-cache")), ("HIT", "HIT"))
        self.assertEqual((body4, body5), (body, topology.bodies[OTHER]))
        # Nothing else answers: an uncached file now fails at the proxy.
        self.assertGreaterEqual(status6, 500)
        self.assertIn("via", h6)

    def test_iptables_listed_mirrors(self) -> defer.Deferred[None]:
        """With etc/iptables/transparent.sh in its mirrors variant for one host
        name (resolved from the router's hosts file when loaded): requests to
        that host's address are cached (MISS, then HIT, one origin request from
        the router), while the origin's other address is not intercepted and
        is reached directly, forwarded by the router from the client."""
        return run(self._iptables_mirrors())

    async def _iptables_mirrors(self) -> None:
        if shutil.which("iptables") is None:
            raise SkipTest("iptables is not installed")
        topology = await _topology(
            self, router_hosts=f"{Netns.ORIGIN_IP} mirror.test\n"
        )
        netns = topology.netns
        loaded = await _in_router(
            topology,
            ["sh", etc_path("iptables", "transparent.sh"), "mirrors", "mirror.test"],
            LAN_IF=netns.LAN_IF,
            PROXY_PORT=str(PROXY_PORT),
            PROXY_USER="root",
        )
        self.assertEqual(loaded.code, 0, loaded.output)
        await topology.start()
        body = topology.bodies[PACKAGE]

        _, status1, h1, body1 = await topology.curl(netns.ORIGIN_IP, PACKAGE)
        _, status2, h2, body2 = await topology.curl(netns.ORIGIN_IP, PACKAGE)
        _, status3, h3, body3 = await topology.curl(netns.ORIGIN_IP2, PACKAGE)
        self.assertEqual((status1, status2, status3), (200, 200, 200), topology.logs())
        self.assertEqual((h1.get("x-cache"), h2.get("x-cache")), ("MISS", "HIT"))
        self.assertNotIn("x-cache", h3)
        self.assertEqual((body1, body2, body3), (body, body, body))
        self.assertEqual(
            topology.origin_requests(),
            [(netns.ROUTER_UP_IP, PACKAGE), (netns.CLIENT_IP, PACKAGE)],
            topology.logs(),
        )
