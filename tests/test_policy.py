"""Table tests of the pure caching policy (cachingproxy.cache.policy, cachingproxy.cache.headers)."""

from __future__ import annotations

import math
import re
import time
from email.utils import formatdate
from typing import Any

from twisted.trial.unittest import TestCase

from cachingproxy.cache import headers as H
from cachingproxy.cache import policy
from cachingproxy.cache.entry import Header, StoredResponse
from cachingproxy.cache.policy import BadURL, Bypass, ByteRange, Unsatisfiable
from cachingproxy.config import FOREVER, Rule

INDEX_TTL = 300.0
NEGATIVE_TTL = 60.0
IMMUTABLE, METADATA, ORIGIN = policy.default_rules(INDEX_TTL)
NOW = 1_700_000_000.0


def http_date(ts: float) -> str:
    return formatdate(ts, usegmt=True)


def entry(
    headers: tuple[Header, ...] = (),
    status: int = 200,
    stored_at: float = NOW,
    initial_age: float = 0.0,
    **kwargs: Any,
) -> StoredResponse:
    values: dict[str, Any] = {
        "url": "http://example.com/x",
        "variant": "",
        "vary": (),
        "status": status,
        "headers": headers,
        "stored_at": stored_at,
        "initial_age": initial_age,
        "size": 1000,
        "digest": "d" * 64,
        "body_ref": "ref-1",
    }
    values.update(kwargs)
    return StoredResponse(**values)


class NormalizeURLTests(TestCase):
    def test_normal_forms(self) -> None:
        """Scheme and host are lower-cased, the default port and the fragment
        dropped, an empty path becomes "/", and path/query case is kept."""
        cases = [
            ("HTTP://Example.COM/a/B?Q=1", "http://example.com/a/B?Q=1"),
            ("http://example.com:80/x", "http://example.com/x"),
            ("https://example.com:443/x", "https://example.com/x"),
            ("http://example.com:443/x", "http://example.com:443/x"),
            ("https://example.com:80/x", "https://example.com:80/x"),
            ("http://example.com:8080/x", "http://example.com:8080/x"),
            ("http://example.com/x#frag", "http://example.com/x"),
            ("http://example.com/x?a=1#frag", "http://example.com/x?a=1"),
            ("http://example.com", "http://example.com/"),
            ("http://example.com?q=1", "http://example.com/?q=1"),
            ("http://example.com/%7Efoo/a%20b", "http://example.com/%7Efoo/a%20b"),
            ("http://[::1]:8080/x", "http://[::1]:8080/x"),
            ("http://[::FFFF:1.2.3.4]/", "http://[::ffff:1.2.3.4]/"),
            ("http://10.0.0.1/x", "http://10.0.0.1/x"),
            ("http://a-b.c_d.example/x", "http://a-b.c_d.example/x"),
        ]
        for url, expected in cases:
            self.assertEqual(policy.normalize_url(url), expected, url)

    def test_refused(self) -> None:
        """User info, other schemes, bad hosts and bad ports are BadURL."""
        bad = [
            "http://user@example.com/",
            "http://user:pw@example.com/",
            "http://:@example.com/",
            "ftp://example.com/",
            "example.com/x",
            "/x",
            "http:///x",
            "http://a b/",
            "http://exa!mple.com/",
            "http://-a.com/",
            "http://a-.com/",
            "http://a..b/",
            "http://.a/",
            "http://example.com:0/",
            "http://example.com:99999/",
            "http://example.com:x/",
            "http://[zz]/",
            "http://[::1/",
        ]
        for url in bad:
            self.assertRaises(BadURL, policy.normalize_url, url)

    def test_control_characters(self) -> None:
        """Control characters, spaces and non-ASCII anywhere are refused, even
        those urlsplit would silently remove (tab, newline, leading space)."""
        bad = [
            "http://example.com/a\tb",
            "http://example.com/a\nb",
            "http://exa\nmple.com/",
            "http://example.com/a\rb",
            " http://example.com/",
            "http://example.com/a b",
            "http://example.com/?a=b c",
            "http://example.com/\x00",
            "http://example.com/\x7f",
            "http://example.com/\x1b[0m",
            "http://example.com/\xe4",
        ]
        for url in bad:
            self.assertRaises(BadURL, policy.normalize_url, url)

    def test_long_bad_host_is_fast(self) -> None:
        """A long invalid host name is refused at once (the host pattern must
        not backtrack exponentially: hostile input must not stall the reactor)."""
        # 26 characters keep a regression measurable (seconds, not years).
        started = time.perf_counter()
        self.assertRaises(BadURL, policy.normalize_url, "http://" + "a" * 26 + "!/")
        self.assertLess(time.perf_counter() - started, 0.5)
        self.assertEqual(
            policy.normalize_url("http://" + "ab." * 1000 + "example/"),
            "http://" + "ab." * 1000 + "example/",
        )


class RuleTests(TestCase):
    def test_default_rule_classes(self) -> None:
        """Each SPEC 4 example falls under its default rule class."""
        cases = [
            (
                "https://files.pythonhosted.org/packages/ab/cd/pkg-1.0-py3-none-any.whl",
                "immutable",
            ),
            (
                "https://files.pythonhosted.org/packages/ab/pkg-1.0-py3-none-any.whl.metadata",
                "immutable",
            ),
            ("https://files.pythonhosted.org/packages/ab/pkg-1.0.tar.gz", "immutable"),
            ("http://example.com/pkg-1.0.tar.gz?download=1", "immutable"),
            (
                "http://deb.debian.org/debian/pool/main/c/curl/curl_8.0_amd64.deb",
                "immutable",
            ),
            (
                "http://deb.debian.org/debian/dists/bookworm/main/binary-amd64/by-hash/SHA256/ab12",
                "immutable",
            ),
            ("https://registry.npmjs.org/lodash/-/lodash-4.17.21.tgz", "immutable"),
            ("https://registry.example/@scope/x/-/x-1.0.0.tgz", "immutable"),
            ("http://example.com/x/-/x-1.0.0.tgz", "immutable"),
            ("https://repo1.maven.org/maven2/org/x/x/1.0/x-1.0.jar", "immutable"),
            ("https://static.crates.io/crates/x/x-1.0.crate", "immutable"),
            ("https://rubygems.org/gems/x-1.0.gem", "immutable"),
            ("https://example.com/linux.iso", "immutable"),
            ("https://pypi.org/simple/", "metadata"),
            ("https://pypi.org/simple/requests/", "metadata"),
            ("https://pypi.org/pypi/requests/json", "metadata"),
            ("https://pypi.org/pypi/requests/2.31.0/json", "metadata"),
            ("http://deb.debian.org/debian/dists/bookworm/InRelease", "metadata"),
            ("http://deb.debian.org/debian/dists/bookworm/Release", "metadata"),
            ("http://deb.debian.org/debian/dists/bookworm/Release.gpg", "metadata"),
            (
                "http://deb.debian.org/debian/dists/bookworm/main/binary-amd64/Packages.xz",
                "metadata",
            ),
            ("http://example.com/flat-repo/Packages.gz", "metadata"),
            ("http://example.com/flat-repo/Sources.xz", "metadata"),
            ("http://mirror.example/fedora/39/x86_64/repodata/repomd.xml", "metadata"),
            (
                "https://repo1.maven.org/maven2/org/x/x/maven-metadata.xml",
                "metadata",
            ),
            (
                "https://repo1.maven.org/maven2/org/x/x/maven-metadata.xml.sha1",
                "metadata",
            ),
            ("https://registry.npmjs.org/lodash", "metadata"),
            ("https://registry.npmjs.org/@types%2fnode", "metadata"),
            ("http://example.com/", "origin"),
            ("http://example.com/index.html", "origin"),
            ("http://example.com/style.css?v=3", "origin"),
            ("http://example.com/Packages.html", "origin"),
            ("http://example.com/pkg.whl.html", "origin"),
        ]
        rules = policy.default_rules(INDEX_TTL)
        for url, name in cases:
            self.assertEqual(policy.select_rule(rules, url).name, name, url)

    def test_default_ttls(self) -> None:
        """Immutable is forever, metadata has the index TTL, origin defers to
        RFC 9111 (ttl None); all three store."""
        self.assertEqual(IMMUTABLE.ttl, FOREVER)
        self.assertEqual(METADATA.ttl, INDEX_TTL)
        self.assertIsNone(ORIGIN.ttl)
        self.assertTrue(IMMUTABLE.store and METADATA.store and ORIGIN.store)

    def test_first_match_wins(self) -> None:
        """Operator rules placed before the defaults take precedence, and a
        URL no rule matches falls back to origin."""
        mine = Rule(re.compile(r"\.whl$"), 10.0, name="mine")
        rules = (mine, *policy.default_rules(INDEX_TTL))
        self.assertIs(policy.select_rule(rules, "http://x/a.whl"), mine)
        self.assertEqual(policy.select_rule(rules, "http://x/a.deb").name, "immutable")
        fallback = policy.select_rule([mine], "http://x/page")
        self.assertIsNone(fallback.ttl)
        self.assertEqual(fallback.name, "origin")


class RequestBypassTests(TestCase):
    def test_table(self) -> None:
        """Non-GET/HEAD, store=false rules and credentials bypass; request
        no-store bypasses only under origin."""
        no_store_rule = Rule(re.compile(""), 10.0, store=False)
        cases: list[tuple[Rule, str, list[Header], Bypass | None]] = [
            (IMMUTABLE, "GET", [], None),
            (IMMUTABLE, "HEAD", [], None),
            (IMMUTABLE, "POST", [], Bypass.METHOD),
            (ORIGIN, "PUT", [], Bypass.METHOD),
            (no_store_rule, "GET", [], Bypass.RULE),
            (IMMUTABLE, "GET", [("Authorization", "Basic eA==")], Bypass.CREDENTIALS),
            (ORIGIN, "GET", [("cookie", "a=b")], Bypass.CREDENTIALS),
            (ORIGIN, "GET", [("Cache-Control", "no-store")], Bypass.NO_STORE),
            (METADATA, "GET", [("Cache-Control", "no-store")], None),
            (METADATA, "GET", [("Cache-Control", "max-age=0")], None),
        ]
        for rule, method, headers, expected in cases:
            self.assertEqual(
                policy.request_bypass(rule, method, headers),
                expected,
                (method, headers),
            )


class StorableTests(TestCase):
    def test_package_rules(self) -> None:
        """Under forever/TTL rules: 200, 301 and 308 are stored whatever the
        origin's Cache-Control says; 404/410 only with a negative TTL;
        Set-Cookie and Vary: * never."""
        cases: list[tuple[int, list[Header], float, bool]] = [
            (200, [], 60, True),
            (200, [("Cache-Control", "no-store")], 60, True),
            (200, [("Cache-Control", "private, max-age=0")], 60, True),
            (200, [("Vary", "Accept")], 60, True),
            (301, [], 60, True),
            (308, [], 60, True),
            (302, [], 60, False),
            (206, [], 60, False),
            (304, [], 60, False),
            (500, [], 60, False),
            (404, [], 60, True),
            (410, [], 60, True),
            (404, [], 0, False),
            (410, [], 0, False),
            (200, [("Set-Cookie", "a=b")], 60, False),
            (200, [("Vary", "*")], 60, False),
            (200, [("Vary", "Accept, *")], 60, False),
        ]
        for rule in (IMMUTABLE, METADATA):
            for status, headers, negative, expected in cases:
                self.assertEqual(
                    policy.is_storable(rule, status, headers, negative),
                    expected,
                    (rule.name, status, headers, negative),
                )

    def test_origin_rule(self) -> None:
        """Under origin, RFC 9111 decides: explicit freshness or a validator is
        needed; no-store, private, Set-Cookie and Vary: * forbid storing."""
        date = ("Date", http_date(NOW))
        cases: list[tuple[int, list[Header], bool]] = [
            (200, [], False),
            (200, [("Cache-Control", "max-age=60")], True),
            (200, [("Cache-Control", "s-maxage=60")], True),
            (200, [("Cache-Control", "max-age=0")], False),
            (200, [("Cache-Control", "no-store, max-age=60")], False),
            (200, [("Cache-Control", "private, max-age=60")], False),
            (200, [("Cache-Control", "max-age=60"), ("Set-Cookie", "a=b")], False),
            (200, [("Cache-Control", "max-age=60"), ("Vary", "*")], False),
            (200, [("ETag", '"v1"')], True),
            (200, [("Last-Modified", http_date(NOW - 3600))], True),
            (200, [("Expires", http_date(NOW + 600)), date], True),
            (200, [("Expires", http_date(NOW - 600)), date], False),
            (200, [("Expires", "0"), date], False),
            (404, [("Cache-Control", "max-age=60")], True),
            (404, [], False),
            (302, [("Cache-Control", "max-age=60")], True),
            (302, [("ETag", '"v1"')], False),
            (206, [("Cache-Control", "max-age=60")], False),
            (500, [("Cache-Control", "max-age=60")], False),
        ]
        for status, headers, expected in cases:
            self.assertEqual(
                policy.is_storable(ORIGIN, status, headers, NEGATIVE_TTL),
                expected,
                (status, headers),
            )

    def test_origin_404_ignores_negative_ttl(self) -> None:
        """Under origin a 404 with explicit freshness follows RFC 9111 even
        when --negative-ttl is 0 (that option governs the package rules)."""
        headers = [("Cache-Control", "max-age=60")]
        self.assertTrue(policy.is_storable(ORIGIN, 404, headers, 0))
        self.assertFalse(policy.is_storable(IMMUTABLE, 404, headers, 0))


class FreshnessTests(TestCase):
    def lifetime(self, headers: list[Header], status: int = 200) -> float:
        return policy.freshness_lifetime(
            ORIGIN, entry(tuple(headers), status), INDEX_TTL, NEGATIVE_TTL
        )

    def test_origin_lifetime_precedence(self) -> None:
        """s-maxage beats max-age beats Expires-Date beats the Last-Modified
        heuristic (a tenth of the age, at most a day); no-cache means 0."""
        date = ("Date", http_date(NOW))
        expires = ("Expires", http_date(NOW + 3600))
        cases: list[tuple[list[Header], float]] = [
            ([("Cache-Control", "s-maxage=100, max-age=10"), expires, date], 100),
            ([("Cache-Control", "max-age=10"), expires, date], 10),
            ([expires, date], 3600),
            ([("Expires", http_date(NOW - 10)), date], 0),
            ([("Expires", "0"), date], 0),
            ([("Last-Modified", http_date(NOW - 1000)), date], 100),
            ([("Last-Modified", http_date(NOW - 30 * 86400)), date], 86400),
            ([("Last-Modified", http_date(NOW + 1000)), date], 0),
            ([("Cache-Control", "no-cache, max-age=100")], 0),
            ([("Cache-Control", "max-age=abc")], 0),
            ([("Cache-Control", "max-age=-1")], 0),
            ([], 0),
        ]
        for headers, expected in cases:
            self.assertEqual(self.lifetime(headers), expected, headers)

    def test_heuristic_only_for_heuristic_statuses(self) -> None:
        """The Last-Modified heuristic does not apply to a 302."""
        headers = [("Last-Modified", http_date(NOW - 1000)), ("Date", http_date(NOW))]
        self.assertEqual(self.lifetime(headers, 302), 0)
        self.assertEqual(self.lifetime(headers, 404), 100)

    def test_rule_lifetimes(self) -> None:
        """Package rules: forever for immutable, the rule TTL for metadata,
        the index TTL for 301/308, the negative TTL for 404/410; origin
        Cache-Control is ignored."""
        no_cache = (("Cache-Control", "no-cache"),)
        cases: list[tuple[Rule, int, float]] = [
            (IMMUTABLE, 200, math.inf),
            (METADATA, 200, INDEX_TTL),
            (IMMUTABLE, 301, INDEX_TTL),
            (METADATA, 308, INDEX_TTL),
            (IMMUTABLE, 404, NEGATIVE_TTL),
            (METADATA, 410, NEGATIVE_TTL),
            (Rule(re.compile(""), 0.0), 200, 0.0),
        ]
        for rule, status, expected in cases:
            self.assertEqual(
                policy.freshness_lifetime(
                    rule, entry(no_cache, status), INDEX_TTL, NEGATIVE_TTL
                ),
                expected,
                (rule.name, status),
            )

    def test_is_fresh(self) -> None:
        """Fresh while the current age (upstream Age plus time here) is below
        the lifetime; forever entries are always fresh."""
        plain = entry()
        aged = entry(initial_age=100)
        max_age = entry((("Cache-Control", "max-age=60"),))
        cases: list[tuple[Rule, StoredResponse, float, bool]] = [
            (METADATA, plain, NOW + 299, True),
            (METADATA, plain, NOW + 300, False),
            (METADATA, aged, NOW + 199, True),
            (METADATA, aged, NOW + 200, False),
            (IMMUTABLE, plain, NOW + 1e9, True),
            (ORIGIN, max_age, NOW + 59, True),
            (ORIGIN, max_age, NOW + 60, False),
            (ORIGIN, plain, NOW, False),
            (Rule(re.compile(""), 0.0), plain, NOW, False),
        ]
        for rule, e, now, expected in cases:
            self.assertEqual(
                policy.is_fresh(rule, e, now, INDEX_TTL, NEGATIVE_TTL),
                expected,
                (rule.name, e.headers, e.initial_age, now - NOW),
            )

    def test_current_age(self) -> None:
        """Age is the upstream's Age plus the time since storing, never less
        than the upstream's Age if the clock steps back."""
        self.assertEqual(policy.current_age(entry(initial_age=5), NOW + 10), 15)
        self.assertEqual(policy.current_age(entry(initial_age=5), NOW - 10), 5)
        self.assertEqual(policy.current_age(entry(), NOW), 0)

    def test_parse_age(self) -> None:
        """A valid Age is its integer seconds; anything else counts as 0."""
        cases: list[tuple[list[Header], float]] = [
            ([("Age", "10")], 10),
            ([("age", " 7 ")], 7),
            ([("Age", "10"), ("Age", "20")], 10),
            ([], 0),
            ([("Age", "-5")], 0),
            ([("Age", "abc")], 0),
            ([("Age", "1.5")], 0),
            ([("Age", "\xb2")], 0),
        ]
        for headers, expected in cases:
            self.assertEqual(policy.parse_age(headers), expected, headers)

    def test_request_wants_revalidation(self) -> None:
        """Client no-cache, Pragma: no-cache (without Cache-Control) and an
        exceeded max-age force revalidation, but only under origin."""
        cases: list[tuple[Rule, list[Header], float, bool]] = [
            (ORIGIN, [], 100, False),
            (ORIGIN, [("Cache-Control", "no-cache")], 0, True),
            (ORIGIN, [("Pragma", "no-cache")], 0, True),
            (
                ORIGIN,
                [("Pragma", "no-cache"), ("Cache-Control", "max-age=100")],
                10,
                False,
            ),
            (ORIGIN, [("Cache-Control", "max-age=0")], 1, True),
            (ORIGIN, [("Cache-Control", "max-age=60")], 10, False),
            (ORIGIN, [("Cache-Control", "max-age=60")], 61, True),
            (METADATA, [("Cache-Control", "no-cache")], 0, False),
            (METADATA, [("Cache-Control", "max-age=0")], 100, False),
            (IMMUTABLE, [("Pragma", "no-cache")], 0, False),
        ]
        for rule, headers, age, expected in cases:
            self.assertEqual(
                policy.request_wants_revalidation(rule, headers, age),
                expected,
                (rule.name, headers, age),
            )


class StaleTests(TestCase):
    def allowed(
        self, rule: Rule, e: StoredResponse, now: float, max_stale: float | None
    ) -> bool:
        return policy.stale_allowed(rule, e, now, INDEX_TTL, NEGATIVE_TTL, max_stale)

    def test_origin_revalidation_directives(self) -> None:
        """Under origin, must-revalidate, proxy-revalidate, no-cache and
        s-maxage forbid serving stale; plain max-age allows it."""
        cases = [
            ("max-age=10, must-revalidate", False),
            ("max-age=10, proxy-revalidate", False),
            ("no-cache", False),
            ("s-maxage=10", False),
            ("max-age=10", True),
        ]
        for cc, expected in cases:
            e = entry((("Cache-Control", cc), ("ETag", '"a"')))
            self.assertEqual(self.allowed(ORIGIN, e, NOW + 1e6, None), expected, cc)

    def test_package_rules_ignore_origin_directives(self) -> None:
        """Under package rules the origin's must-revalidate does not stop
        stale-on-error."""
        e = entry((("Cache-Control", "must-revalidate, no-cache"),))
        self.assertTrue(self.allowed(METADATA, e, NOW + 1e6, None))

    def test_max_stale(self) -> None:
        """--max-stale bounds how far past its lifetime an entry may be served."""
        e = entry()
        stale_by_50 = NOW + INDEX_TTL + 50
        self.assertTrue(self.allowed(METADATA, e, stale_by_50, None))
        self.assertTrue(self.allowed(METADATA, e, stale_by_50, 60))
        self.assertTrue(self.allowed(METADATA, e, stale_by_50, 50))
        self.assertFalse(self.allowed(METADATA, e, stale_by_50, 40))
        self.assertFalse(self.allowed(METADATA, e, stale_by_50, 0))
        origin_entry = entry((("Cache-Control", "max-age=10"),))
        self.assertTrue(self.allowed(ORIGIN, origin_entry, NOW + 15, 10))
        self.assertFalse(self.allowed(ORIGIN, origin_entry, NOW + 25, 10))


class VaryTests(TestCase):
    def test_parse_vary(self) -> None:
        """Vary names come back sorted, lower-cased and deduplicated; ``*``
        anywhere means None (never storable)."""
        cases: list[tuple[list[Header], tuple[str, ...] | None]] = [
            ([], ()),
            ([("Vary", "Accept")], ("accept",)),
            (
                [("Vary", "Accept-Encoding, accept, ACCEPT")],
                ("accept", "accept-encoding"),
            ),
            ([("Vary", "Accept"), ("vary", "User-Agent")], ("accept", "user-agent")),
            ([("Vary", " , ")], ()),
            ([("Vary", "*")], None),
            ([("Vary", "Accept, *")], None),
        ]
        for headers, expected in cases:
            self.assertEqual(policy.parse_vary(headers), expected, headers)

    def test_variant_of(self) -> None:
        """The secondary key lists each Vary header's whitespace-normalised
        value; absent headers count as empty; no Vary gives ""."""
        self.assertEqual(policy.variant_of((), [("Accept", "x")]), "")
        self.assertEqual(
            policy.variant_of(("accept",), [("ACCEPT", "text/html")]),
            "accept=text/html",
        )
        self.assertEqual(
            policy.variant_of(
                ("accept",), [("Accept", " text/html,\t application/json ")]
            ),
            policy.variant_of(("accept",), [("Accept", "text/html, application/json")]),
        )
        self.assertEqual(policy.variant_of(("accept",), []), "accept=")
        self.assertNotEqual(
            policy.variant_of(("accept",), [("Accept", "text/html")]),
            policy.variant_of(("accept",), [("Accept", "application/json")]),
        )
        self.assertEqual(
            policy.variant_of(
                ("accept", "accept-encoding"),
                [("Accept-Encoding", "gzip"), ("Accept", "a")],
            ),
            "accept=a\naccept-encoding=gzip",
        )

    def test_select_variant(self) -> None:
        """The matching variant is chosen (HTML and JSON never mixed up); with
        several matches the newest wins; no match gives None."""
        html_accept = [("Accept", "text/html")]
        json_accept = [("Accept", "application/vnd.pypi.simple.v1+json")]
        html = entry(
            vary=("accept",), variant=policy.variant_of(("accept",), html_accept)
        )
        json = entry(
            vary=("accept",), variant=policy.variant_of(("accept",), json_accept)
        )
        self.assertIs(policy.select_variant([html, json], json_accept), json)
        self.assertIs(policy.select_variant([html, json], html_accept), html)
        self.assertIsNone(policy.select_variant([html, json], [("Accept", "*/*")]))
        self.assertIsNone(policy.select_variant([], html_accept))
        old = entry(stored_at=NOW - 10)
        new = entry(stored_at=NOW)
        self.assertIs(policy.select_variant([new, old], []), new)
        self.assertIs(policy.select_variant([old, new], []), new)


class RefreshTests(TestCase):
    def test_refreshed_merges_304(self) -> None:
        """A 304's end-to-end headers replace the stored ones of the same name;
        Content-Length and other body headers, hop-by-hop headers and the body
        stay; stored_at becomes now and the Age of the 304 is the new age."""
        stored = entry(
            (
                ("ETag", '"a"'),
                ("Cache-Control", "max-age=10"),
                ("Content-Length", "1000"),
                ("Content-Encoding", "gzip"),
                ("X-Old", "1"),
                ("Link", "<a>"),
                ("Link", "<b>"),
            ),
            initial_age=50,
        )
        result = policy.refreshed(
            stored,
            [
                ("Cache-Control", "max-age=100"),
                ("Content-Length", "0"),
                ("Content-Encoding", "identity"),
                ("ETag", '"a"'),
                ("Age", "5"),
                ("Connection", "X-Hop"),
                ("X-Hop", "1"),
                ("Keep-Alive", "timeout=5"),
                ("Link", "<c>"),
            ],
            NOW + 500,
        )
        self.assertEqual(result.header("cache-control"), "max-age=100")
        self.assertEqual(result.header("content-length"), "1000")
        self.assertEqual(result.header("content-encoding"), "gzip")
        self.assertEqual(result.header("x-old"), "1")
        self.assertEqual(result.header("link"), "<c>")
        self.assertIsNone(result.header("x-hop"))
        self.assertIsNone(result.header("keep-alive"))
        self.assertIsNone(result.header("connection"))
        self.assertEqual(result.stored_at, NOW + 500)
        self.assertEqual(result.initial_age, 5)
        self.assertEqual(
            (result.body_ref, result.size, result.digest, result.url, result.variant),
            (stored.body_ref, stored.size, stored.digest, stored.url, stored.variant),
        )

    def test_validators(self) -> None:
        """A stale entry is revalidated with If-None-Match and/or
        If-Modified-Since from its ETag and Last-Modified."""
        lm = http_date(NOW - 100)
        both = entry((("ETag", '"a"'), ("Last-Modified", lm)))
        self.assertEqual(
            policy.validators(both),
            [("If-None-Match", '"a"'), ("If-Modified-Since", lm)],
        )
        self.assertEqual(policy.validators(entry()), [])


class ConditionalTests(TestCase):
    def test_not_modified(self) -> None:
        """If-None-Match (weak comparison, lists, ``*``) decides when present;
        otherwise If-Modified-Since against Last-Modified; only for 200s."""
        lm = NOW - 1000
        e = entry((("ETag", '"abc"'), ("Last-Modified", http_date(lm))))
        weak = entry((("ETag", 'W/"abc"'),))
        cases: list[tuple[StoredResponse, list[Header], bool]] = [
            (e, [], False),
            (e, [("If-None-Match", '"abc"')], True),
            (e, [("If-None-Match", 'W/"abc"')], True),
            (e, [("If-None-Match", '"x", "abc"')], True),
            (e, [("If-None-Match", "*")], True),
            (e, [("If-None-Match", '"x"')], False),
            (
                e,
                [("If-None-Match", '"x"'), ("If-Modified-Since", http_date(NOW))],
                False,
            ),
            (weak, [("If-None-Match", '"abc"')], True),
            (entry(), [("If-None-Match", '"abc"')], False),
            (entry(), [("If-None-Match", "*")], True),
            (e, [("If-Modified-Since", http_date(lm))], True),
            (e, [("If-Modified-Since", http_date(lm + 10))], True),
            (e, [("If-Modified-Since", http_date(lm - 10))], False),
            (e, [("If-Modified-Since", "yesterday")], False),
            (entry(), [("If-Modified-Since", http_date(NOW))], False),
            (entry((("ETag", '"abc"'),), status=404), [("If-None-Match", "*")], False),
        ]
        for stored, headers, expected in cases:
            self.assertEqual(
                policy.not_modified(stored, headers),
                expected,
                (stored.headers, headers),
            )

    def test_parse_range(self) -> None:
        """Single byte ranges in every form; out-of-range starts and empty
        suffixes are 416; several ranges or bad syntax mean the whole body."""
        size = 1000
        unsat = Unsatisfiable.RANGE
        cases: list[tuple[str | None, int, ByteRange | Unsatisfiable | None]] = [
            (None, size, None),
            ("bytes=0-99", size, ByteRange(0, 100)),
            ("bytes=0-0", size, ByteRange(0, 1)),
            ("bytes=500-", size, ByteRange(500, 1000)),
            ("bytes=-100", size, ByteRange(900, 1000)),
            ("bytes=-2000", size, ByteRange(0, 1000)),
            ("bytes=990-2000", size, ByteRange(990, 1000)),
            ("bytes=999-999", size, ByteRange(999, 1000)),
            ("Bytes = 10-19", size, ByteRange(10, 20)),
            ("bytes=1000-", size, unsat),
            ("bytes=1000-1005", size, unsat),
            ("bytes=-0", size, unsat),
            ("bytes=0-", 0, unsat),
            ("bytes=-5", 0, unsat),
            ("bytes=5-2", size, None),
            ("bytes=0-1,3-4", size, None),
            ("bytes=0-1, 3-4", size, None),
            ("items=0-1", size, None),
            ("bytes=abc", size, None),
            ("bytes=", size, None),
            ("bytes=-", size, None),
            ("bytes=0x1-2", size, None),
            ("bytes=+1-2", size, None),
            ("bytes=1--2", size, None),
            ("bytes=\xb2-5", size, None),
            ("bytes=0-\xb9", size, None),
        ]
        for value, body_size, expected in cases:
            self.assertEqual(policy.parse_range(value, body_size), expected, value)

    def test_if_range(self) -> None:
        """If-Range allows a partial answer only for an equal strong ETag or an
        exactly equal Last-Modified date."""
        lm = http_date(NOW - 100)
        e = entry((("ETag", '"abc"'), ("Last-Modified", lm)))
        weak = entry((("ETag", 'W/"abc"'),))
        cases: list[tuple[StoredResponse, list[Header], bool]] = [
            (e, [], True),
            (e, [("If-Range", '"abc"')], True),
            (e, [("If-Range", '"abd"')], False),
            (e, [("If-Range", 'W/"abc"')], False),
            (weak, [("If-Range", 'W/"abc"')], False),
            (entry(), [("If-Range", '"abc"')], False),
            (e, [("If-Range", lm)], True),
            (e, [("If-Range", http_date(NOW))], False),
        ]
        for stored, headers, expected in cases:
            self.assertEqual(
                policy.if_range_matches(stored, headers),
                expected,
                (stored.headers, headers),
            )


class HeaderTests(TestCase):
    def test_end_to_end(self) -> None:
        """Hop-by-hop headers, Proxy-* and every header named by Connection are
        dropped (case-insensitively); end-to-end headers keep order and case."""
        headers = [
            ("Connection", "close, X-Custom"),
            ("connection", "x-other"),
            ("X-CUSTOM", "1"),
            ("X-Other", "2"),
            ("Content-Type", "text/plain"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authorization", "Basic eA=="),
            ("Proxy-Authenticate", "Basic"),
            ("Proxy-Connection", "keep-alive"),
            ("Proxy-Whatever", "x"),
            ("TE", "trailers"),
            ("Trailer", "X"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "h2c"),
            ("ETag", '"a"'),
            ("Close", "not named by Connection? it is"),
        ]
        self.assertEqual(
            H.end_to_end(headers),
            [("Content-Type", "text/plain"), ("ETag", '"a"')],
        )

    def test_connection_tokens(self) -> None:
        """Connection tokens are lower-cased and split on commas."""
        self.assertEqual(
            H.connection_tokens([("Connection", "Keep-Alive, X-A ,,"), ("X", "y")]),
            frozenset({"keep-alive", "x-a"}),
        )

    def test_parse_cache_control(self) -> None:
        """Directives are lower-cased; quoted arguments may hold commas and
        lose their quotes; empty parts are skipped."""
        cases: list[tuple[str | None, dict[str, str | None]]] = [
            (None, {}),
            ("", {}),
            ("no-cache", {"no-cache": None}),
            ("MAX-AGE=60, Public", {"max-age": "60", "public": None}),
            (
                'max-age=60, private="set-cookie, x-y", no-cache',
                {"max-age": "60", "private": "set-cookie, x-y", "no-cache": None},
            ),
            ('no-cache="a,b,c"', {"no-cache": "a,b,c"}),
            ('max-age="30"', {"max-age": "30"}),
            (" , ,max-age=1,, ", {"max-age": "1"}),
            ("s-maxage = 5", {"s-maxage": "5"}),
        ]
        for value, expected in cases:
            self.assertEqual(H.parse_cache_control(value), expected, value)

    def test_delta_seconds(self) -> None:
        """Only non-negative integers are valid delta-seconds."""
        cc = H.parse_cache_control("max-age=60, s-maxage=-1, a=abc, b")
        self.assertEqual(H.delta_seconds(cc, "max-age"), 60.0)
        self.assertIsNone(H.delta_seconds(cc, "s-maxage"))
        self.assertIsNone(H.delta_seconds(cc, "a"))
        self.assertIsNone(H.delta_seconds(cc, "b"))
        self.assertIsNone(H.delta_seconds(cc, "missing"))

    def test_get(self) -> None:
        """get() joins every value of a header, case-insensitively."""
        headers = [("Accept", "a"), ("accept", "b"), ("X", "y")]
        self.assertEqual(H.get(headers, "ACCEPT"), "a, b")
        self.assertIsNone(H.get(headers, "missing"))
