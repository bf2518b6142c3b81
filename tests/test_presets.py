"""Mirror presets and their protocols (SPEC 6), and ``--index-refresh``.

Pure tables for what each preset mounts and how each protocol classifies
its files; the crates ``config.json`` rewriting; the refresh decision; and
the proxy itself over a ``Clock``, a memory store and a fake upstream,
driven through its real HTTP channel, for "a fresh index at most once per
interval, coalesced, stale on error".
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from cachingproxy.cache import policy
from cachingproxy.cache.entry import StoredResponse
from cachingproxy.cache.store import MemoryStore
from cachingproxy.config import FOREVER, Mirror, ProxyConfig
from cachingproxy.mirror.mirrors import (
    PRESETS,
    MirrorTable,
    combine,
    parse_mirror,
    parse_mirror_table,
)
from cachingproxy.mirror.protocols import PROTOCOLS, protocol_named
from cachingproxy.mirror.rewrite import rewrite_crates_config
from cachingproxy.options import make_config
from cachingproxy.proxy import Proxy, ProxyResource

from .test_download_unit import FakeResponse, FakeUpstream

SPEC_TABLE = {
    "pypi": {
        "/pypi/": "https://pypi.org/",
        "/pypi-files/": "https://files.pythonhosted.org/",
    },
    "npm": {"/npm/": "https://registry.npmjs.org/"},
    "go": {"/go/": "https://proxy.golang.org/"},
    "crates": {
        "/crates/": "https://index.crates.io/",
        "/crates-dl/": "https://static.crates.io/crates/",
    },
    "rubygems": {"/rubygems/": "https://rubygems.org/"},
    "maven": {"/maven2/": "https://repo1.maven.org/maven2/"},
    "debian": {
        "/debian/": "http://deb.debian.org/debian/",
        "/debian-security/": "http://deb.debian.org/debian-security/",
    },
    "ubuntu": {"/ubuntu/": "http://archive.ubuntu.com/ubuntu/"},
    "alpine": {"/alpine/": "https://dl-cdn.alpinelinux.org/alpine/"},
}
"""SPEC 6's preset table."""


class PresetTests(TestCase):
    """What each preset mounts, and overriding one."""

    def test_spec_table(self) -> None:
        """Every preset mounts exactly the prefixes and upstreams of SPEC 6's
        table, each with a protocol that exists; ``packages`` is all of them."""
        for name, routes in SPEC_TABLE.items():
            mirrors = parse_mirror(name)
            self.assertEqual({m.prefix: m.upstreams[0] for m in mirrors}, routes)
            for mirror in mirrors:
                self.assertIn(mirror.protocol, PROTOCOLS)
        every = {p: u for routes in SPEC_TABLE.values() for p, u in routes.items()}
        packages = parse_mirror("packages")
        self.assertEqual({m.prefix: m.upstreams[0] for m in packages}, every)
        self.assertEqual(set(PRESETS), {*SPEC_TABLE, "packages"})

    def test_override_keeps_protocol(self) -> None:
        """``--mirror go --mirror /go/=URL`` swaps the upstream and keeps the
        Go protocol; a plain mirror elsewhere has none; on the command line
        too."""
        mirrors = combine(
            [*parse_mirror("go"), *parse_mirror("/go/=https://goproxy.corp.example/")]
        )
        (go,) = mirrors
        self.assertEqual(go.upstreams, ("https://goproxy.corp.example/",))
        self.assertEqual(go.protocol, "go")
        (plain,) = combine(parse_mirror("/x/=https://x.example/"))
        self.assertEqual(plain.protocol, "")
        config = make_config(
            {"mirror": ["crates", "/crates-dl/=https://dl.corp.example/crates/"]},
            create_cache_dir=False,
        )
        by_prefix = {m.prefix: m for m in config.mirrors}
        self.assertEqual(by_prefix["/crates-dl/"].protocol, "crates-dl")
        self.assertEqual(
            by_prefix["/crates-dl/"].upstreams, ("https://dl.corp.example/crates/",)
        )

    def test_table_protocol(self) -> None:
        """A ``[[mirror]]`` table may name a protocol; an unknown one is an
        error naming the key."""
        mirror = parse_mirror_table(
            {
                "prefix": "/m2/",
                "upstreams": ["https://nexus.example/"],
                "protocol": "maven",
            }
        )
        self.assertEqual(mirror.protocol, "maven")
        with self.assertRaisesRegex(ValueError, "key 'protocol'"):
            parse_mirror_table(
                {"prefix": "/x/", "url": "https://x/", "protocol": "cpan"}
            )


_CASES: list[tuple[str, str, str]] = [
    # protocol, upstream URL, expected class
    ("go", "https://proxy.golang.org/example.com/m/@v/list", "metadata"),
    ("go", "https://proxy.golang.org/example.com/m/@latest", "metadata"),
    ("go", "https://proxy.golang.org/example.com/m/@v/v1.2.3.info", "forever"),
    ("go", "https://proxy.golang.org/example.com/m/@v/v1.2.3.mod", "forever"),
    ("go", "https://proxy.golang.org/example.com/m/@v/v1.2.3.zip", "forever"),
    ("go", "https://proxy.golang.org/sumdb/sum.golang.org/supported", "metadata"),
    ("go", "https://proxy.golang.org/sumdb/sum.golang.org/latest", "metadata"),
    (
        "go",
        "https://proxy.golang.org/sumdb/sum.golang.org/lookup/a.b/c@v1.0.0",
        "forever",
    ),
    (
        "go",
        "https://proxy.golang.org/sumdb/sum.golang.org/tile/8/0/x001/234.p/5",
        "forever",
    ),
    ("crates", "https://index.crates.io/config.json", "metadata"),
    ("crates", "https://index.crates.io/se/rd/serde", "metadata"),
    ("crates", "https://index.crates.io/3/t/tar", "metadata"),
    ("crates-dl", "https://static.crates.io/crates/serde/1.0.0/download", "forever"),
    ("crates-dl", "https://static.crates.io/crates/serde/serde-1.0.0.crate", "forever"),
    ("rubygems", "https://rubygems.org/versions", "metadata"),
    ("rubygems", "https://rubygems.org/info/rails", "metadata"),
    ("rubygems", "https://rubygems.org/names", "metadata"),
    ("rubygems", "https://rubygems.org/specs.4.8.gz", "metadata"),
    ("rubygems", "https://rubygems.org/latest_specs.4.8.gz", "metadata"),
    ("rubygems", "https://rubygems.org/api/v1/dependencies?gems=rake", "metadata"),
    ("rubygems", "https://rubygems.org/gems/rake-13.0.0.gem", "forever"),
    (
        "rubygems",
        "https://rubygems.org/quick/Marshal.4.8/rake-13.0.0.gemspec.rz",
        "forever",
    ),
    ("maven", "https://repo1.maven.org/maven2/g/a/1.0/a-1.0.jar", "forever"),
    ("maven", "https://repo1.maven.org/maven2/g/a/1.0/a-1.0.pom", "forever"),
    ("maven", "https://repo1.maven.org/maven2/g/a/1.0/a-1.0.jar.sha1", "forever"),
    ("maven", "https://repo1.maven.org/maven2/g/a/maven-metadata.xml", "metadata"),
    ("maven", "https://repo1.maven.org/maven2/g/a/maven-metadata.xml.sha1", "metadata"),
    (
        "maven",
        "https://repo1.maven.org/maven2/g/a/1.0-SNAPSHOT/a-1.0-1.jar",
        "metadata",
    ),
    ("apt", "http://deb.debian.org/debian/dists/stable/InRelease", "metadata"),
    (
        "apt",
        "http://deb.debian.org/debian/dists/stable/main/binary-amd64/Packages.xz",
        "metadata",
    ),
    (
        "apt",
        "http://deb.debian.org/debian/dists/stable/main/binary-amd64/by-hash/SHA256/ab12",
        "forever",
    ),
    (
        "apt",
        "http://deb.debian.org/debian/pool/main/c/curl/curl_8.0_amd64.deb",
        "forever",
    ),
    (
        "alpine",
        "https://dl-cdn.alpinelinux.org/alpine/v3.20/main/x86_64/APKINDEX.tar.gz",
        "metadata",
    ),
    (
        "alpine",
        "https://dl-cdn.alpinelinux.org/alpine/v3.20/main/x86_64/curl-8.0-r0.apk",
        "forever",
    ),
    (
        "pypi",
        "https://files.pythonhosted.org/packages/ab/cd/x-1.0-py3-none-any.whl",
        "forever",
    ),
    ("pypi", "https://pypi.org/simple/x/", "metadata"),
]


def _class_of(protocol: str, url: str) -> str:
    """How the proxy classifies ``url`` under a mirror of ``protocol``."""
    rules = protocol_named(protocol).rules(300.0) + policy.default_rules(300.0)
    rule = policy.select_rule(rules, url)
    if rule.ttl == FOREVER:
        return "forever"
    # Under a mirror an "origin" URL is metadata too.
    return "metadata"


class ProtocolRuleTests(TestCase):
    """Each protocol's immutable files and metadata, by table."""

    def test_table(self) -> None:
        """Every row classifies as the table says (a wrong row names itself)."""
        wrong = [
            (protocol, url, expected, _class_of(protocol, url))
            for protocol, url, expected in _CASES
            if _class_of(protocol, url) != expected
        ]
        self.assertEqual(wrong, [])

    def test_metadata_wins_over_extension(self) -> None:
        """``APKINDEX.tar.gz`` and a SNAPSHOT ``.jar`` would be package files
        by their extension alone; their protocols make them metadata."""
        for url in (
            "https://x/alpine/v3.20/main/x86_64/APKINDEX.tar.gz",
            "https://x/maven2/g/a/1.0-SNAPSHOT/a-1.0-SNAPSHOT.jar",
        ):
            self.assertEqual(
                policy.select_rule(policy.default_rules(300.0), url).ttl, FOREVER
            )
        self.assertEqual(_class_of("alpine", "https://x/APKINDEX.tar.gz"), "metadata")


class CratesConfigTests(TestCase):
    """The sparse index's ``config.json`` leads cargo into the cache."""

    def test_dl_and_api(self) -> None:
        """``dl`` without a trailing slash (cargo appends
        ``/{crate}/{version}/download``) becomes the cache's ``/crates-dl``
        with none; a ``dl`` with markers keeps them; an ``api`` on a
        mirrored upstream is made local, one elsewhere is left alone; other
        keys stay."""
        table = MirrorTable(PRESETS["crates"])
        root = "http://cache.example:3128"
        doc_url = "https://index.crates.io/config.json"
        for dl, expected in (
            ("https://static.crates.io/crates", f"{root}/crates-dl"),
            ("https://static.crates.io/crates/", f"{root}/crates-dl/"),
            (
                "https://static.crates.io/crates/{crate}/{crate}-{version}.crate",
                f"{root}/crates-dl/{{crate}}/{{crate}}-{{version}}.crate",
            ),
        ):
            body = json.dumps({"dl": dl, "api": "https://crates.io", "x": 1}).encode()
            out = json.loads(rewrite_crates_config(body, doc_url, table, root))
            self.assertEqual(out, {"dl": expected, "api": "https://crates.io", "x": 1})
        body = (
            b'{"dl":"https://static.crates.io/crates","api":"https://index.crates.io"}'
        )
        out = json.loads(rewrite_crates_config(body, doc_url, table, root))
        self.assertEqual(out["api"], f"{root}/crates")
        self.assertEqual(
            rewrite_crates_config(b"nonsense", doc_url, table, root), b"nonsense"
        )


def _entry(stored_at: float, initial_age: float = 0.0) -> StoredResponse:
    return StoredResponse(
        url="https://pypi.org/simple/x/",
        variant="",
        vary=(),
        status=200,
        headers=(),
        stored_at=stored_at,
        initial_age=initial_age,
    )


class IndexRefreshPolicyTests(TestCase):
    """``policy.index_refresh_due``: a fresh index on request, rationed."""

    def test_table(self) -> None:
        """Rows: (rule, seconds since the entry was stored, request headers,
        interval) → revalidate now?"""
        immutable, metadata, origin = policy.default_rules(300.0)
        no_cache = [("Cache-Control", "no-cache")]
        max_age_0 = [("Cache-Control", "max-age=0")]
        rows: list[tuple[Any, float, list[tuple[str, str]], float, bool]] = [
            (metadata, 31, max_age_0, 30, True),
            (metadata, 31, no_cache, 30, True),
            (metadata, 31, [("Pragma", "no-cache")], 30, True),
            (metadata, 31, [("Cache-Control", "max-age=60")], 30, False),
            (metadata, 61, [("Cache-Control", "max-age=60")], 30, True),
            (metadata, 31, [], 30, False),
            (metadata, 29, max_age_0, 30, False),
            (metadata, 29, no_cache, 30, False),
            (metadata, 30, max_age_0, 30, True),
            (metadata, 1, max_age_0, 0, True),
            (immutable, 10**6, no_cache, 30, False),
            (origin, 10**6, no_cache, 30, False),
        ]
        now = 10_000.0
        for rule, since, headers, interval, expected in rows:
            got = policy.index_refresh_due(
                rule, _entry(now - since), headers, now, interval
            )
            self.assertEqual(got, expected, (rule.name, since, headers, interval))

    def test_upstream_age_does_not_count(self) -> None:
        """The interval counts from when this cache last heard from upstream,
        not from the upstream's ``Age``: an entry stored 5 s ago with
        ``Age: 3600`` is not revalidated again."""
        _, metadata, _ = policy.default_rules(300.0)
        entry = _entry(9_995.0, initial_age=3600.0)
        self.assertFalse(
            policy.index_refresh_due(
                metadata, entry, [("Cache-Control", "max-age=0")], 10_000.0, 30
            )
        )
        self.assertTrue(math.isfinite(metadata.ttl or 0))


# -- the proxy over a Clock ---------------------------------------------------

PAGE = "/pypi/simple/demo/"
UPSTREAM = "http://origin.test/"


class _QuietSite(Site):
    def log(self, request: Any) -> None:
        pass


class _Client:
    """One HTTP/1.1 connection to the proxy over a StringTransport."""

    def __init__(self, site: Site, clock: Clock) -> None:
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 3128),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
        )
        self.channel: Any = site.buildProtocol(self.transport.getPeer())
        self.channel.callLater = clock.callLater
        self.channel.makeConnection(self.transport)

    def get(self, path: str, *headers: tuple[str, str]) -> None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
        self.channel.dataReceived(
            f"GET {path} HTTP/1.1\r\nHost: proxy.test:3128\r\n{extra}\r\n".encode()
        )

    def response(self) -> tuple[int, dict[str, str], bytes]:
        raw = self.transport.value()
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", len(body)))
        return int(lines[0].split()[1]), headers, body[:length]

    def close(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.channel.connectionLost(Failure(ConnectionDone()))


class IndexRefreshProxyTests(TestCase):
    """``--index-refresh`` in the cached path, time driven by a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.upstream = FakeUpstream()
        config = ProxyConfig(
            listen=(),
            allow_client=(ipaddress.ip_network("127.0.0.0/8"),),
            names=("proxy.test",),
            index_ttl=300.0,
            index_refresh=30.0,
            mirrors=(Mirror("/pypi/", (UPSTREAM,), protocol="pypi"),),
        )
        self.proxy = Proxy(config, MemoryStore(), self.upstream, self.clock)
        self.site = _QuietSite(ProxyResource(self.proxy))
        self.site.reactor = self.clock  # type: ignore[assignment]
        self.clients: list[_Client] = []

    def tearDown(self) -> None:
        for c in self.clients:
            c.close()
        self.clock.advance(120)

    def ask(self, *headers: tuple[str, str]) -> _Client:
        c = _Client(self.site, self.clock)
        self.clients.append(c)
        c.get(PAGE, *headers)
        return c

    def answer(self, body: bytes, etag: str) -> None:
        response = FakeResponse(
            200,
            [("Content-Type", "text/html"), ("ETag", etag)],
            len(body),
        )
        self.upstream.answer(response)
        response.push(body)
        response.end()

    def test_fresh_release_within_interval_once(self) -> None:
        """A page cached with demo 1.0; demo 2.0 is published.  Within the
        interval, five clients asking for a fresh page (``max-age=0``) are
        HITs and upstream hears nothing; once the interval has passed, five
        such clients at once cause exactly one conditional request upstream
        and all get the page with 2.0; the next ones are HITs again; a
        client that does not ask for a fresh copy never causes one; and
        when upstream then fails, the page is served STALE."""
        v1 = b'<a href="/packages/demo-1.0.tar.gz">demo-1.0.tar.gz</a>'
        v2 = v1 + b'<a href="/packages/demo-2.0.tar.gz">demo-2.0.tar.gz</a>'
        first = self.ask()
        self.assertEqual(len(self.upstream.requests), 1)
        self.answer(v1, '"v1"')
        status, headers, body = first.response()
        self.assertEqual((status, headers["x-cache"]), (200, "MISS"))
        self.assertIn(b"demo-1.0", body)

        self.clock.advance(20)
        for c in [self.ask(("Cache-Control", "max-age=0")) for _ in range(5)]:
            status, headers, body = c.response()
            self.assertEqual(headers["x-cache"], "HIT")
            self.assertNotIn(b"demo-2.0", body)
        self.assertEqual(len(self.upstream.requests), 1)

        self.clock.advance(11)  # 31 s since the page was fetched
        waiting = [self.ask(("Cache-Control", "max-age=0")) for _ in range(5)]
        self.assertEqual(len(self.upstream.requests), 2)
        _method, url, sent, _ = self.upstream.requests[1]
        self.assertEqual(url, b"http://origin.test/simple/demo/")
        self.assertEqual(sent.getRawHeaders(b"if-none-match"), [b'"v1"'])
        self.answer(v2, '"v2"')
        for c in waiting:
            status, headers, body = c.response()
            self.assertEqual(status, 200)
            self.assertIn(b"demo-2.0", body)

        self.clock.advance(29)
        for c in (self.ask(("Cache-Control", "no-cache")), self.ask()):
            self.assertEqual(c.response()[1]["x-cache"], "HIT")
            self.assertIn(b"demo-2.0", c.response()[2])
        self.clock.advance(100)  # well past the interval, inside --index-ttl
        self.assertEqual(self.ask().response()[1]["x-cache"], "HIT")
        self.assertEqual(len(self.upstream.requests), 2)

        failing = self.ask(("Cache-Control", "max-age=0"))
        self.assertEqual(len(self.upstream.requests), 3)
        self.upstream.requests[2][3].errback(ConnectionRefusedError())
        status, headers, body = failing.response()
        self.assertEqual((status, headers["x-cache"]), (200, "STALE"))
        self.assertIn(b"demo-2.0", body)
        self.assertTrue(re.search(rb"/pypi/packages/demo-2\.0", body), body)
