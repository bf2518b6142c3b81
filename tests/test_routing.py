"""Table tests of request classification (SPEC 2): cachingproxy.front.routing."""

from __future__ import annotations

import time

from twisted.trial.unittest import TestCase

from cachingproxy.front.routing import (
    BadRequest,
    Listener,
    Route,
    RouteKind,
    classify,
    is_self,
    split_host,
)

PORT = 3128
LISTENER = Listener("127.0.0.1", PORT, frozenset({"localhost", "cache.example"}))


def route(
    target: str,
    host: str | None = None,
    *,
    method: str = "GET",
    listener: Listener = LISTENER,
    original: tuple[str, int] | None = None,
) -> Route:
    return classify(method, target, host, listener, original)


class ForwardTests(TestCase):
    def test_absolute_form_is_forward(self) -> None:
        """An absolute-form target is a forward-proxy request for its
        normalised URL; a Host header, if any, names the same host and port."""
        cases = [
            ("http://Example.COM/x", None, "http://example.com/x"),
            ("http://example.com:80/x#frag", None, "http://example.com/x"),
            ("http://example.com", "EXAMPLE.com:80", "http://example.com/"),
            ("http://example.com:8080/a?b=1", None, "http://example.com:8080/a?b=1"),
            ("HTTP://example.com/x", None, "http://example.com/x"),
            ("https://example.com/x", None, "https://example.com/x"),
            ("https://example.com:443/x", "example.com", "https://example.com/x"),
            ("https://localhost:8443/pkg.whl", None, "https://localhost:8443/pkg.whl"),
            # The proxy's name on another port is some other server.
            ("http://localhost/x", None, "http://localhost/x"),
            ("http://127.0.0.1:8080/x", None, "http://127.0.0.1:8080/x"),
        ]
        for target, host, url in cases:
            self.assertEqual(
                route(target, host), Route(RouteKind.FORWARD, url=url), target
            )

    def test_self_addressed_absolute_form(self) -> None:
        """An absolute-form http URL naming the proxy (a --name or its address,
        with its port) is served as the proxy's own pages, not fetched."""
        cases = [
            ("http://localhost:3128/status.json", "/status.json"),
            ("http://LOCALHOST:3128/", "/"),
            ("http://cache.example:3128/metrics?x=1", "/metrics?x=1"),
            ("http://127.0.0.1:3128", "/"),
        ]
        for target, path in cases:
            self.assertEqual(route(target), Route(RouteKind.SELF, path=path), target)

    def test_bad_absolute_targets(self) -> None:
        """Absolute-form targets with user info, bad hosts or ports, or
        other schemes are BadRequest."""
        for target in [
            "http://user:pw@example.com/",
            "http://user@example.com/",
            "http://[zz]/",
            "http://exa mple.com/",
            "http://example.com:99999/",
            "http://example.com:0/",
            "http:///x",
            "ftp://example.com/x",
            "http:/x",
        ]:
            self.assertRaises(BadRequest, route, target, "example.com")

    def test_long_bad_host_is_fast(self) -> None:
        """A hostile host name is refused quickly, not after exponential
        backtracking."""
        started = time.perf_counter()
        self.assertRaises(BadRequest, route, "http://" + "a" * 26 + "!/")
        self.assertRaises(BadRequest, route, "/x", "a" * 16000 + "!")
        self.assertLess(time.perf_counter() - started, 0.5)


class OriginFormTests(TestCase):
    def test_host_naming_the_proxy_is_self(self) -> None:
        """Origin-form with Host naming a --name or the local address, with
        the listening port, is SELF; no port in Host means 80."""
        cases = [
            ("/x", "cache.example:3128", LISTENER),
            ("/x", "CACHE.EXAMPLE:3128", LISTENER),
            ("/x", "cache.example.:3128", LISTENER),
            ("/x", "localhost:3128", LISTENER),
            ("/x", "127.0.0.1:3128", LISTENER),
            (
                "/x",
                "cache.example",
                Listener("10.0.0.5", 80, frozenset({"cache.example"})),
            ),
            ("/x", "10.0.0.5", Listener("10.0.0.5", 80, frozenset())),
            ("/x", "[::1]:3128", Listener("::1", PORT, frozenset())),
        ]
        for target, host, listener in cases:
            self.assertEqual(
                route(target, host, listener=listener),
                Route(RouteKind.SELF, path=target),
                (host, listener),
            )

    def test_self_keeps_path_and_query(self) -> None:
        """The SELF route carries the origin-form path with its query."""
        self.assertEqual(
            route("/cache?url=http%3A%2F%2Fx%2F", "localhost:3128").path,
            "/cache?url=http%3A%2F%2Fx%2F",
        )

    def test_other_host_is_transparent(self) -> None:
        """Any other Host is transparent interception of http://{Host}{path}:
        a non-default port is kept, host lower-cased, trailing dot dropped."""
        cases = [
            ("/x", "example.com", "http://example.com/x"),
            ("/x?q=1", "Example.COM.", "http://example.com/x?q=1"),
            ("/x", "example.com:8080", "http://example.com:8080/x"),
            ("/x", "example.com:80", "http://example.com/x"),
            ("/", "[2001:db8::1]:8080", "http://[2001:db8::1]:8080/"),
            ("/x", "cache.example", "http://cache.example/x"),
            ("/x", "localhost:8080", "http://localhost:8080/x"),
            ("/x", "127.0.0.2:3128", "http://127.0.0.2:3128/x"),
            ("//evil.example/x", "example.com", "http://example.com//evil.example/x"),
        ]
        for target, host, url in cases:
            self.assertEqual(
                route(target, host),
                Route(RouteKind.TRANSPARENT, url=url),
                (target, host),
            )

    def test_missing_host(self) -> None:
        """Without Host (or with an empty one) the original destination is
        used; without either the request is BadRequest."""
        self.assertRaises(BadRequest, route, "/x", None)
        self.assertRaises(BadRequest, route, "/x", "")
        self.assertRaises(BadRequest, route, "/x", "   ")
        self.assertEqual(
            route("/x", None, original=("93.184.216.34", 80)),
            Route(RouteKind.TRANSPARENT, url="http://93.184.216.34/x"),
        )
        self.assertEqual(
            route("/x", "", original=("93.184.216.34", 8080)),
            Route(RouteKind.TRANSPARENT, url="http://93.184.216.34:8080/x"),
        )
        self.assertEqual(
            route("/x", None, original=("2001:db8::1", 80)),
            Route(RouteKind.TRANSPARENT, url="http://[2001:db8::1]/x"),
        )
        # A connection that was not redirected arrives at the proxy itself.
        self.assertEqual(
            route("/x", None, original=("127.0.0.1", PORT)),
            Route(RouteKind.SELF, path="/x"),
        )

    def test_host_header_wins_over_original_destination(self) -> None:
        """A Host header takes precedence over the original destination."""
        self.assertEqual(
            route("/x", "example.com", original=("93.184.216.34", 80)).url,
            "http://example.com/x",
        )

    def test_bad_host_values(self) -> None:
        """Malformed Host values are BadRequest, never routed."""
        for host in [
            "a b",
            "x:99999",
            "x:0",
            "x:",
            "x:-1",
            "x:80:80",
            "[zz]",
            "[zz]:80",
            "[::1",
            "user@example.com",
            "example.com/path",
            "-example.com",
            "exa_mple!.com",
            "a..b",
            "\x00",
        ]:
            self.assertRaises(BadRequest, route, "/x", host)

    def test_bad_targets(self) -> None:
        """Targets that are neither absolute-form nor origin-form ("*",
        authority-form outside CONNECT, garbage) are BadRequest."""
        for target in ["*", "", "example.com:80", "x", "?a", "%2F", "\\x"]:
            self.assertRaises(BadRequest, route, target, "example.com")


class ConnectTests(TestCase):
    def test_connect(self) -> None:
        """CONNECT is classified as a tunnel to its authority-form target."""
        self.assertEqual(
            route("example.com:443", None, method="CONNECT"),
            Route(RouteKind.CONNECT, url="example.com:443"),
        )


class HelperTests(TestCase):
    def test_split_host(self) -> None:
        """split_host lower-cases, strips a trailing dot, keeps IPv6 brackets
        and fills in the default port."""
        cases = [
            ("Example.com", 80, ("example.com", 80)),
            ("example.com:8080", 80, ("example.com", 8080)),
            ("example.com.", 443, ("example.com", 443)),
            ("[::1]", 80, ("[::1]", 80)),
            ("[::1]:3128", 80, ("[::1]", 3128)),
            ("10.0.0.1:65535", 80, ("10.0.0.1", 65535)),
        ]
        for value, default, expected in cases:
            self.assertEqual(split_host(value, default), expected, value)
        self.assertRaises(BadRequest, split_host, "x:65536", 80)

    def test_is_self(self) -> None:
        """is_self needs the listening port and a name or the local address;
        IPv6 and IPv4-address spellings compare as addresses."""
        self.assertTrue(is_self("localhost", PORT, LISTENER))
        self.assertTrue(is_self("127.0.0.1", PORT, LISTENER))
        self.assertFalse(is_self("localhost", PORT + 1, LISTENER))
        self.assertFalse(is_self("127.0.0.2", PORT, LISTENER))
        self.assertFalse(is_self("example.com", PORT, LISTENER))
        six = Listener("::1", PORT, frozenset())
        self.assertTrue(is_self("[::1]", PORT, six))
        self.assertTrue(is_self("[0:0:0:0:0:0:0:1]", PORT, six))
