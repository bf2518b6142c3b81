"""The lean hit path against the request path, head by head (hypothesis):
whatever the memo answers, the request path would have answered the same
bytes (``Age`` and ``Date`` apart), closed or kept the connection the same
way, left the same timers and logged and counted the same
(front/quick.py, handler/quick.py, front/channel.py)."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from twisted.trial.unittest import TestCase

from cachingproxy.front.quick import CONDITIONS, IGNORED_ON_HIT, simple_get
from cachingproxy.mirror.mirrors import Mirror
from tests.quickheads import Outcome, conversations, converse, fill, heads, parsed
from tests.support import raw_get, run, start_origin, start_proxy, stored

BODY = os.urandom(3000)

BOUNDED = settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class ParserAgreementTests(TestCase):
    @BOUNDED
    @given(heads())
    def test_accepted_heads_parse_the_same(self, template: str) -> None:
        """Whenever ``simple_get`` takes a head, twisted.web's parser on the
        proxy's own channel takes it too, as one GET with the same target,
        one Host with the same value and only fields a hit ignores, and
        keeps the connection open as the head asks."""
        data = fill(template, 8000, 3128)
        found = simple_get(data)
        if found is None:
            return
        recorder, output, closed = parsed(data)
        self.assertTrue(
            output.startswith(found.version + b" 200 "), (data, output[:200])
        )
        if found.version == b"HTTP/1.1":
            # (twisted.web closes every HTTP/1.0 connection; the memo keeps
            # one open on Connection: keep-alive, by design)
            self.assertEqual(closed, not found.keep_alive, data)
        self.assertEqual(len(recorder.seen), 1, data)
        method, uri, version, fields = recorder.seen[0]
        self.assertEqual((method, uri, version), (b"GET", found.target, found.version))
        hosts = [v for n, v in fields if n.lower() == b"host"]
        self.assertEqual(hosts, [found.host], data)
        for name, _ in fields:
            self.assertIn(name.lower(), IGNORED_ON_HIT | CONDITIONS, data)


class DifferentialTests(TestCase):
    """A real proxy with stored hits (forward, transparent and mirrored):
    each conversation goes once through the request path alone and once
    with the memo."""

    def setUp(self) -> Any:
        self.origin, self.oport = start_origin(self)
        for name in ("f.whl", "g.whl"):
            self.origin.static(
                f"/{name}",
                BODY,
                [("Cache-Control", "max-age=3600")],
                etag='"v1"',
                last_modified=1_000_000_000,
            )
        base = f"http://127.0.0.1:{self.oport}/"
        mirrors = (Mirror("/m/", (base,)),)
        cache_dir = self.mktemp()
        first, first_port = start_proxy(self, mirrors=mirrors, cache_dir=cache_dir)

        async def warm() -> None:
            # Stored by one proxy, served by another that never goes
            # upstream: every answer is made at once, on this connection.
            for name in ("f.whl", "g.whl"):
                url = f"http://127.0.0.1:{self.oport}/{name}"
                await raw_get(self, first_port, url)
                await stored(first, url)
            await first.stopService()
            self.service, self.port = start_proxy(
                self, mirrors=mirrors, cache_dir=cache_dir, offline=True
            )
            proxy: Any = self.service.proxy
            original = proxy._record

            def record(*args: Any) -> None:
                client, method, url, status, sent, _, info = args
                self.records.append(
                    (client, method, url, status, sent, info.cache, info.upstream)
                )
                original(*args)

            proxy._record = record

        self.records: list[tuple[Any, ...]] = []
        return run(warm())

    @BOUNDED
    @given(conversations())
    def test_memo_answers_as_the_request_path(self, packets: list[str]) -> None:
        """Any conversation (see tests/quickheads.py) gets the same bytes,
        the same closing, the same timers and the same log records with the
        memo as through the request path alone."""
        data = [fill(p, self.oport, self.port) for p in packets]
        whole = b"".join(data)
        # By design the memo keeps an HTTP/1.0 connection open on
        # Connection: keep-alive, where twisted.web closes every HTTP/1.0
        # connection (and says Connection: close where twisted.web closes
        # without a word): those are compared in test_quick.py.
        assume(b"HTTP/1.0" not in whole)
        alone, memo, answered = self.both(*data)
        self.assertEqual(memo, alone, (data, answered))

    def both(self, *packets: str | bytes) -> tuple[Outcome, Outcome, int]:
        """``packets`` through the request path alone, then with the memo
        (warmed by the first run); and how many the memo answered."""
        site: Any = self.service.site
        assert site.quick is not None
        quick = self.service.proxy.quick  # type: ignore[union-attr]
        data = [
            p if isinstance(p, bytes) else fill(p, self.oport, self.port)
            for p in packets
        ]
        # The memo answers nothing (the request path serves every request)
        # but keeps what it may, as in service.
        quick.answer = lambda *args: None
        try:
            alone = converse(site, data, ("127.0.0.1", self.port), self.records)
        finally:
            del quick.answer
        before = quick.answered
        memo = converse(site, data, ("127.0.0.1", self.port), self.records)
        return alone, memo, quick.answered - before

    def test_too_many_fields(self) -> None:
        """A head with more fields than the channel takes is a 431 from
        the memo too (it was a 200)."""
        plain = "GET /m/f.whl HTTP/1.1\r\nHost: localhost:{P}\r\n"
        alone, memo, answered = self.both(
            plain + "\r\n", plain + "Accept: a\r\n" * 99 + "\r\n"
        )
        self.assertEqual(alone.output.count(BODY), 2)  # 100 fields are allowed
        self.assertEqual((memo, answered), (alone, 2))
        alone, memo, answered = self.both(
            plain + "\r\n", plain + "Accept: a\r\n" * 100 + "\r\n"
        )
        self.assertIn(b"431 more than 100 header fields", alone.output)
        self.assertTrue(alone.closed)
        self.assertEqual(memo, alone)
        self.assertEqual(answered, 1)

    def test_empty_line_before_each_request(self) -> None:
        """An empty line before a request line is skipped once per request
        (twisted.web's allowance for old clients), after a quick answer as
        after any other: not a 400 for the second one."""
        plain = "GET /m/f.whl HTTP/1.1\r\nHost: localhost:{P}\r\n\r\n"
        alone, memo, answered = self.both(plain, "\r\n", plain, "\r\n", plain)
        self.assertEqual(alone.output.count(BODY), 3)
        self.assertEqual((memo, answered), (alone, 3))
