"""SPEC 5: every response carries exactly one ``X-Cache`` from the SPEC's set
(``HIT``, ``MISS``, ``REVALIDATED``, ``STALE``, ``OFFLINE``, ``BYPASS``) and
the proxy's ``Via`` -- the proxy's own pages and the errors answered before
any cache decision included (those say ``BYPASS``: the cache was not
consulted), whichever layer writes them (twisted.web's request, the
channel's raw refusals, the head gate, proxy authentication).

Black-box: a real in-process proxy and a real origin, raw requests on real
connections, the raw answers parsed.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from cachingproxy.cache.status import CacheStatus, header_value
from cachingproxy.config import Mirror

from .support import (
    parse_raw_response,
    raw_connect,
    raw_exchange,
    run,
    start_origin,
    start_proxy,
    wait_for,
)
from .test_auth import SHA_BOB, basic, write

SPEC_VALUES = frozenset({"HIT", "MISS", "REVALIDATED", "STALE", "OFFLINE", "BYPASS"})

BODY = b"wheel bytes " * 100


def _request(line: str, *headers: str, body: bytes = b"") -> bytes:
    head = "".join(f"{h}\r\n" for h in (*headers, "Connection: close"))
    return f"{line}\r\n{head}\r\n".encode("latin-1") + body


class XCacheTableTests(TestCase):
    """Each kind of answer, provoked on its own connection."""

    def setUp(self) -> None:
        self.origin, self.oport = start_origin(self)
        self.origin.static("/pkg-1.0.whl", BODY)
        self.origin.static("/m/pkg-2.0.whl", BODY)
        self.origin.route("/broken", self._server_error)
        self.service, self.pport = start_proxy(
            self,
            allow_client=(ipaddress.ip_network("127.0.0.1/32"),),
            mirrors=(Mirror("/m/", (f"http://127.0.0.1:{self.oport}/m/",)),),
        )
        self.htpasswd = write(self, f"bob:{SHA_BOB}\n")
        self.auth_service, self.auth_port = start_proxy(self, proxy_auth=self.htpasswd)
        self.offline_service, self.offline_port = start_proxy(self, offline=True)

    @staticmethod
    def _server_error(request: Any) -> bytes:
        request.setResponseCode(503)
        request.setHeader(b"Content-Type", b"text/plain")
        return b"down for maintenance"

    def cases(self) -> list[tuple[str, int, bytes, int, str | None, str | None]]:
        """(what, proxy port, request, expected status, X-Cache expected
        (None: any SPEC value), source address)."""
        own = f"Host: 127.0.0.1:{self.pport}"
        origin = f"http://127.0.0.1:{self.oport}"
        host = f"Host: 127.0.0.1:{self.oport}"
        creds = f"Proxy-Authorization: {basic('bob', 'builder')}"
        return [
            ("status page", self.pport, _request("GET / HTTP/1.1", own), 200, "BYPASS", None),
            ("status page HEAD", self.pport, _request("HEAD / HTTP/1.1", own), 200, "BYPASS", None),
            ("status.json", self.pport, _request("GET /status.json HTTP/1.1", own), 200, "BYPASS", None),
            ("metrics", self.pport, _request("GET /metrics HTTP/1.1", own), 200, "BYPASS", None),
            ("purge", self.pport, _request(f"DELETE /cache?url={origin}/x HTTP/1.1", own), 200, "BYPASS", None),
            ("purge GET", self.pport, _request("GET /cache HTTP/1.1", own), 405, "BYPASS", None),
            ("own 404", self.pport, _request("GET /no-such-page HTTP/1.1", own), 404, "BYPASS", None),
            ("own 405", self.pport, _request("POST / HTTP/1.1", own, "Content-Length: 0"), 405, "BYPASS", None),
            ("mirror miss", self.pport, _request("GET /m/pkg-2.0.whl HTTP/1.1", own), 200, "MISS", None),
            ("mirror 404", self.pport, _request("GET /m/missing.whl HTTP/1.1", own), 404, None, None),
            ("forward miss", self.pport, _request(f"GET {origin}/pkg-1.0.whl HTTP/1.1", host), 200, "MISS", None),
            ("relayed 5xx", self.pport, _request(f"GET {origin}/broken HTTP/1.1", host), 503, None, None),
            ("POST passed through", self.pport, _request(f"POST {origin}/pkg-1.0.whl HTTP/1.1", host, "Content-Length: 0"), 200, "BYPASS", None),
            ("TRACE", self.pport, _request(f"TRACE {origin}/ HTTP/1.1", host), 405, "BYPASS", None),
            ("OPTIONS Max-Forwards 0", self.pport, _request(f"OPTIONS {origin}/ HTTP/1.1", host, "Max-Forwards: 0"), 200, "BYPASS", None),
            ("upstream refused", self.pport, _request("GET http://10.255.0.1/x.whl HTTP/1.1", "Host: 10.255.0.1"), 403, None, None),
            ("malformed line", self.pport, b"NOT-HTTP\r\n\r\n", 400, "BYPASS", None),
            ("method not a token", self.pport, _request("G@T / HTTP/1.1", own), 400, "BYPASS", None),
            ("bare LF", self.pport, b"GET / HTTP/1.1\nHost: x\n\n", 400, "BYPASS", None),
            ("obs-fold", self.pport, _request("GET / HTTP/1.1", own, " folded"), 400, "BYPASS", None),
            ("Transfer-Encoding gzip", self.pport, _request("POST / HTTP/1.1", own, "Transfer-Encoding: gzip"), 400, "BYPASS", None),
            ("two Host headers", self.pport, _request("GET / HTTP/1.1", own, own), 400, "BYPASS", None),
            ("client not allowed", self.pport, _request("GET / HTTP/1.1", own), 403, "BYPASS", "127.0.0.2"),
            ("body too large", self.pport, _request(f"POST {origin}/up HTTP/1.1", host, "Content-Length: 99999999999"), 413, "BYPASS", None),
            ("request line too long", self.pport, _request(f"GET {origin}/{'a' * 17000} HTTP/1.1", host), 414, "BYPASS", None),
            ("header too long", self.pport, _request("GET / HTTP/1.1", own, f"X-Big: {'b' * 17000}"), 431, "BYPASS", None),
            ("too many headers", self.pport, _request("GET / HTTP/1.1", own, *[f"X-H{i}: v" for i in range(120)]), 431, "BYPASS", None),
            ("loop", self.pport, _request(f"GET {origin}/pkg-1.0.whl HTTP/1.1", host, "Via: 1.1 localhost (cachingproxy/0)"), 508, "BYPASS", None),
            ("CONNECT port refused", self.pport, _request(f"CONNECT 127.0.0.1:{self.oport} HTTP/1.1", host), 403, "BYPASS", None),
            ("CONNECT without port", self.pport, _request("CONNECT 127.0.0.1 HTTP/1.1", "Host: 127.0.0.1"), 400, "BYPASS", None),
            ("407 on the request path", self.auth_port, _request(f"GET {origin}/pkg-1.0.whl HTTP/1.1", host), 407, "BYPASS", None),
            ("407 at the head gate", self.auth_port, _request(f"POST {origin}/up HTTP/1.1", host, "Content-Length: 5", body=b"hello"), 407, "BYPASS", None),
            ("authenticated miss", self.auth_port, _request(f"GET {origin}/pkg-1.0.whl HTTP/1.1", host, creds), 200, "MISS", None),
            ("offline miss", self.offline_port, _request(f"GET {origin}/other-1.0.whl HTTP/1.1", host), 504, "OFFLINE", None),
        ]  # fmt: skip

    def test_every_answer_has_one_spec_x_cache(self) -> defer.Deferred[None]:
        """Every kind of answer -- own pages, mirror and forward answers,
        relayed errors, and every refusal from the raw channel, the head
        gate, the router and proxy authentication -- has its expected
        status, exactly one ``X-Cache`` whose value is in SPEC 5's set (the
        expected one where the table names it) and exactly one ``Via``."""
        return run(self._table())

    async def _table(self) -> None:
        for what, port, data, status, cache, source in self.cases():
            client = await raw_connect(self, port, data, source=source)
            await wait_for(lambda c=client: c.closed)  # type: ignore[misc]
            raw = bytes(client.received)
            got_status, headers, _ = parse_raw_response(raw)
            values = headers.get("x-cache", [])
            one = len(values) == 1 and values[0] in SPEC_VALUES
            vias = len(headers.get("via", []))
            self.assertEqual(
                (what, got_status, one, vias), (what, status, True, 1), raw[:600]
            )
            if cache is not None:
                self.assertEqual(values, [cache], what)

    def test_repeat_hit_from_memory(self) -> defer.Deferred[None]:
        """A plain repeat GET answered from memory (handler/quick.py) says
        HIT like any other hit, once."""
        return run(self._repeat())

    async def _repeat(self) -> None:
        data = _request(
            f"GET http://127.0.0.1:{self.oport}/pkg-1.0.whl HTTP/1.1",
            f"Host: 127.0.0.1:{self.oport}",
        )
        caches = []
        for _ in range(4):
            raw = await raw_exchange(self, self.pport, data)
            _, headers, body = parse_raw_response(raw)
            self.assertEqual(body, BODY)
            caches.append(headers.get("x-cache"))
        self.assertEqual(caches, [["MISS"], ["HIT"], ["HIT"], ["HIT"]])
        self.assertEqual(self.origin.count("/pkg-1.0.whl"), 1)


class RefusedConnectionTests(TestCase):
    """Answers a connection gets before any request is read."""

    def test_too_many_connections(self) -> defer.Deferred[None]:
        """The 429 of a connection over --max-client-connections carries
        ``X-Cache: BYPASS`` and the proxy's Via."""
        return run(self._too_many())

    async def _too_many(self) -> None:
        service, port = start_proxy(self, max_client_connections=1)
        first = await raw_connect(self, port, b"")
        assert service.site is not None
        await wait_for(lambda: len(service.site.channels) == 1)  # type: ignore[union-attr]
        second = await raw_connect(self, port, b"")
        await wait_for(lambda: second.closed)
        status, headers, _ = parse_raw_response(bytes(second.received))
        self.assertEqual(
            (status, headers.get("x-cache"), len(headers.get("via", []))),
            (429, ["BYPASS"], 1),
        )
        self.assertFalse(first.closed)

    def test_slow_head(self) -> defer.Deferred[None]:
        """The 408 for a request head not sent in time carries
        ``X-Cache: BYPASS``."""
        return run(self._slow_head())

    async def _slow_head(self) -> None:
        service, port = start_proxy(self)
        assert service.site is not None
        service.site.head_timeout = 0.2
        client = await raw_connect(self, port, b"GET / HTTP/1.1\r\n")
        await wait_for(lambda: client.closed)
        status, headers, _ = parse_raw_response(bytes(client.received))
        self.assertEqual((status, headers.get("x-cache")), (408, ["BYPASS"]))


class HeaderValueTests(TestCase):
    def test_every_status_has_a_spec_header(self) -> None:
        """Every cache status the proxy records maps to an X-Cache header
        value in SPEC 5's set: the six are themselves, the log-only ``-``
        and ``TUNNEL`` are ``BYPASS``."""
        self.assertEqual(
            {status.value: header_value(status).value for status in CacheStatus},
            {
                **{value: value for value in SPEC_VALUES},
                "-": "BYPASS",
                "TUNNEL": "BYPASS",
            },
        )
