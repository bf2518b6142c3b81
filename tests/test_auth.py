"""Proxy authentication (``--proxy-auth FILE``): htpasswd parsing, the checker
(bcrypt off the reactor thread, cached, file reloads) and the proxy asking
for ``Proxy-Authorization`` on forward, transparent and CONNECT requests."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import bcrypt
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from cachingproxy.config import Mirror
from cachingproxy.front import auth
from cachingproxy.front.auth import (
    CHALLENGE,
    HtpasswdError,
    ProxyAuth,
    Scheme,
    parse_basic,
    parse_htpasswd,
)

from .support import (
    TWISTD,
    checkout_env,
    client,
    fetch,
    free_port,
    header,
    own_page,
    parse_raw_response,
    raw_connect,
    raw_exchange,
    run,
    run_process,
    start_origin,
    start_proxy,
    wait_for,
)

# Cheap hashes (cost 4) keep the tests fast; the cost does not change the code path.
BCRYPT_ALICE = bcrypt.hashpw(b"wonderland", bcrypt.gensalt(rounds=4)).decode()
SHA_BOB = "{SHA}" + base64.b64encode(hashlib.sha1(b"builder").digest()).decode()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class LogCapture:
    """Every log event published while a test runs."""

    def __init__(self, test: TestCase) -> None:
        self.events: list[dict[str, Any]] = []
        observer: Callable[[Any], None] = self.events.append
        globalLogPublisher.addObserver(observer)
        test.addCleanup(globalLogPublisher.removeObserver, observer)

    def lines(self, containing: str = "") -> list[str]:
        texts = [formatEvent(e) for e in self.events]
        return [t for t in texts if containing in t]

    def everything(self) -> str:
        """Formatted events and the repr of every field, for "never logged"."""
        return "\n".join(formatEvent(e) + repr(e) for e in self.events)


def write(test: TestCase, text: str, path: str | None = None) -> str:
    path = path or test.mktemp()
    with open(path, "w") as f:
        f.write(text)
    return path


class HtpasswdTests(TestCase):
    def test_entries(self) -> None:
        """bcrypt ($2y$, $2a$, $2b$) and {SHA} lines are read; blank lines and
        comments are skipped."""
        body = BCRYPT_ALICE[4:]
        users = parse_htpasswd(
            "# users\n\n"
            f"alice:$2y${body}\n"
            f"amy:$2a${body}\n"
            f"ann:$2b${body}\n"
            f"bob:{SHA_BOB}\n"
        )
        self.assertEqual(sorted(users), ["alice", "amy", "ann", "bob"])
        self.assertEqual(users["alice"].scheme, Scheme.BCRYPT)
        self.assertEqual(users["bob"].scheme, Scheme.SHA)
        self.assertEqual(users["bob"].hashed, hashlib.sha1(b"builder").digest())

    def test_errors(self) -> None:
        """Lines that are not USER:HASH, other hash kinds (MD5, crypt,
        plain), malformed hashes, a user given twice and a file without users
        are errors naming the line."""
        cases = [
            ("alice\n", "line 1: expected USER:HASH"),
            (":$2y$\n", "line 1: expected USER:HASH"),
            ("carol:$apr1$abc$defghijklmnop\n", "line 1: user 'carol': unsupported"),
            ("carol:plaintext\n", "unsupported password hash"),
            ("carol:rqXKkH8lCqyvs\n", "unsupported password hash"),
            ("carol:$2y$10$short\n", "malformed bcrypt hash"),
            ("carol:{SHA}bm90IDIwIGJ5dGVz\n", "malformed SHA hash"),
            ("carol:{SHA}***\n", "malformed SHA hash"),
            (f"bob:{SHA_BOB}\nbob:{SHA_BOB}\n", "line 2: user 'bob' appears twice"),
            ("# nobody\n\n", "no users"),
        ]
        for text, message in cases:
            with self.assertRaises(HtpasswdError, msg=text) as caught:
                parse_htpasswd(text)
            self.assertIn(message, str(caught.exception), text)

    def test_basic_credentials(self) -> None:
        """Basic credentials are decoded (any case of the scheme, a colon in
        the password kept); other schemes and malformed values are None."""
        self.assertEqual(parse_basic(basic("u", "p:w").encode()), ("u", b"p:w"))
        self.assertEqual(parse_basic(b"bAsIc " + base64.b64encode(b"u:")), ("u", b""))
        for value in [
            None,
            b"",
            b"Bearer abc",
            b"Basic",
            b"Basic !!!",
            b"Basic " + base64.b64encode(b"no-colon"),
            b"Basic " + base64.b64encode(b":password"),
        ]:
            self.assertIsNone(parse_basic(value), value)


class ProxyAuthTests(TestCase):
    """The checker on its own: a Clock decides when the file is looked at."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.path = write(self, f"alice:{BCRYPT_ALICE}\nbob:{SHA_BOB}\n")
        self.auth = ProxyAuth(self.path, self.clock, reactor)
        self.addCleanup(self.auth.close)

    def test_sha(self) -> None:
        """A {SHA} user is checked at once (no thread): the right password
        gives the user name, a wrong one or an unknown user None."""
        check = self.auth.check
        self.assertEqual(
            self.successResultOf(check(basic("bob", "builder").encode(), "c")), "bob"
        )
        self.assertIsNone(self.successResultOf(check(basic("bob", "x").encode(), "c")))
        self.assertIsNone(
            self.successResultOf(check(basic("eve", "builder").encode(), "c"))
        )
        self.assertIsNone(self.successResultOf(check(None, "c")))

    def test_bcrypt_in_a_thread_then_cached(self) -> defer.Deferred[None]:
        """The first bcrypt check runs in a worker thread (its Deferred has no
        result yet); the same credentials again are answered at once from
        the cache, with no second bcrypt run."""
        return run(self._bcrypt_in_a_thread_then_cached())

    async def _bcrypt_in_a_thread_then_cached(self) -> None:
        runs: list[bytes] = []
        real = auth._check_bcrypt

        def counting(password: bytes, hashed: bytes) -> bool:
            runs.append(password)
            return real(password, hashed)

        self.patch(auth, "_check_bcrypt", counting)
        header_value = basic("alice", "wonderland").encode()
        first = self.auth.check(header_value, "127.0.0.1")
        self.assertNoResult(first)
        self.assertEqual(await first, "alice")
        second = self.auth.check(header_value, "127.0.0.1")
        self.assertEqual(self.successResultOf(second), "alice")
        self.assertEqual(len(runs), 1)
        wrong = self.auth.check(basic("alice", "queen").encode(), "127.0.0.1")
        self.assertIsNone(await wrong)
        self.assertEqual(len(runs), 2)

    def test_concurrent_checks_share_one_run(self) -> defer.Deferred[None]:
        """Ten simultaneous checks of the same credentials run bcrypt once."""
        return run(self._concurrent_checks_share_one_run())

    async def _concurrent_checks_share_one_run(self) -> None:
        runs: list[bytes] = []
        real = auth._check_bcrypt

        def counting(password: bytes, hashed: bytes) -> bool:
            runs.append(password)
            return real(password, hashed)

        self.patch(auth, "_check_bcrypt", counting)
        value = basic("alice", "wonderland").encode()
        results = await defer.gatherResults(
            [self.auth.check(value, "127.0.0.1") for _ in range(10)]
        )
        self.assertEqual(results, ["alice"] * 10)
        self.assertEqual(len(runs), 1)

    def test_queue_is_bounded(self) -> defer.Deferred[None]:
        """With ``max_pending`` bcrypt checks queued, another (different)
        one is refused at once (None) with a warning, not counted as a wrong
        password; the queued one still succeeds."""
        return run(self._queue_is_bounded())

    async def _queue_is_bounded(self) -> None:
        logs = LogCapture(self)
        self.auth.max_pending = 1
        queued = self.auth.check(basic("alice", "wonderland").encode(), "c1")
        over = self.auth.check(basic("alice", "guess").encode(), "c2")
        self.assertIsNone(self.successResultOf(over))
        self.assertEqual(await queued, "alice")
        self.assertEqual(len(logs.lines("too many password checks")), 1)
        self.assertEqual(logs.lines("wrong password"), [])

    def test_bcrypt_does_not_block_the_reactor(self) -> defer.Deferred[None]:
        """The bcrypt check runs in a worker thread: while it is held there,
        the reactor keeps turning and the answer waits; released, it is
        accepted."""
        return run(self._bcrypt_does_not_block_the_reactor())

    async def _bcrypt_does_not_block_the_reactor(self) -> None:
        hashed = bcrypt.hashpw(b"slow", bcrypt.gensalt(rounds=4)).decode()
        path = write(self, f"slow:{hashed}\n")
        checker = ProxyAuth(path, self.clock, reactor)
        self.addCleanup(checker.close)
        release = threading.Event()
        self.addCleanup(release.set)
        threads: list[int] = []
        checkpw = bcrypt.checkpw

        def held(password: bytes, hashed: bytes) -> bool:
            threads.append(threading.get_ident())
            release.wait(10)
            return checkpw(password, hashed)

        self.patch(auth.bcrypt, "checkpw", held)
        result = checker.check(basic("slow", "slow").encode(), "127.0.0.1")
        await wait_for(lambda: bool(threads))  # the reactor turns meanwhile
        self.assertNotEqual(threads, [threading.get_ident()])
        self.assertNoResult(result)
        release.set()
        self.assertEqual(await result, "slow")

    def test_reload_on_change(self) -> defer.Deferred[None]:
        """A changed file is picked up once a second has passed since the last
        look (not before); a new user is accepted, a removed one refused."""
        return run(self._reload_on_change())

    async def _reload_on_change(self) -> None:
        carol = "{SHA}" + base64.b64encode(hashlib.sha1(b"c").digest()).decode()
        value = basic("carol", "c").encode()
        self.assertIsNone(await self.auth.check(value, "127.0.0.1"))
        write(self, f"carol:{carol}\n", self.path)
        os.utime(self.path, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
        self.clock.advance(0.5)
        self.assertIsNone(await self.auth.check(value, "127.0.0.1"))
        self.clock.advance(0.6)
        self.assertEqual(await self.auth.check(value, "127.0.0.1"), "carol")
        self.assertIsNone(
            await self.auth.check(basic("bob", "builder").encode(), "127.0.0.1")
        )
        self.assertEqual(self.auth.users, frozenset({"carol"}))

    def test_unusable_file_on_reload_keeps_users(self) -> None:
        """A file that became unusable is reported in the log and the users
        loaded before stay valid."""
        logs = LogCapture(self)
        write(self, "garbage without a colon\n", self.path)
        os.utime(self.path, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
        self.clock.advance(2)
        value = basic("bob", "builder").encode()
        self.assertEqual(self.successResultOf(self.auth.check(value, "c")), "bob")
        [line] = logs.lines("--proxy-auth")
        self.assertIn("line 1: expected USER:HASH", line)
        self.assertIn("still using the 2 users", line)

    def test_wrong_password_logged_without_password(self) -> None:
        """A wrong password or unknown user is logged with the user name and
        the client address; the password appears nowhere in the log."""
        logs = LogCapture(self)
        self.auth.check(basic("bob", "S3cr3t-guess").encode(), "10.1.2.3")
        self.auth.check(basic("mallory", "S3cr3t-guess").encode(), "10.1.2.4")
        [wrong] = logs.lines("wrong password")
        [unknown] = logs.lines("unknown user")
        self.assertIn("'bob'", wrong)
        self.assertIn("10.1.2.3", wrong)
        self.assertIn("'mallory'", unknown)
        self.assertIn("10.1.2.4", unknown)
        self.assertNotIn("S3cr3t-guess", logs.everything())

    def test_failures_logged_at_a_bounded_rate(self) -> None:
        """A client guessing passwords fills no log: five lines per ten
        seconds, then one saying how many were held back."""
        logs = LogCapture(self)
        for i in range(50):
            self.auth.check(basic("bob", f"guess{i}").encode(), "10.9.9.9")
        self.assertEqual(len(logs.lines("wrong password")), 5)
        self.clock.advance(11)
        self.auth.check(basic("bob", "again").encode(), "10.9.9.9")
        self.assertIn("45 similar messages held back", logs.lines("wrong")[-1])


class ProxyAuthIntegrationTests(TestCase):
    """A real proxy with --proxy-auth and a real origin on 127.0.0.1."""

    def setUp(self) -> None:
        self.origin, self.oport = start_origin(self)
        self.origin.static("/pkg-1.0.whl", b"wheel")
        self.origin.route("/upload", lambda request: b"stored")
        self.htpasswd = write(self, f"alice:{BCRYPT_ALICE}\nbob:{SHA_BOB}\n")
        self.service, self.pport = start_proxy(
            self,
            proxy_auth=self.htpasswd,
            connect_ports=frozenset({self.oport}),
            mirrors=(Mirror("/m/", (f"http://127.0.0.1:{self.oport}/",)),),
        )
        self.url = f"http://127.0.0.1:{self.oport}/pkg-1.0.whl"

    def test_get_needs_credentials(self) -> defer.Deferred[None]:
        """A forward GET without Proxy-Authorization, or with a wrong
        password, is 407 with the Basic challenge; the origin sees nothing."""
        return run(self._get_needs_credentials())

    async def _get_needs_credentials(self) -> None:
        http = client(self, self.pport)
        for headers in [
            {},
            {"Proxy-Authorization": basic("alice", "wrong")},
            {"Proxy-Authorization": basic("bob", "wrong")},
            {"Proxy-Authorization": "Bearer abc"},
        ]:
            response, _ = await fetch(http, self.url, headers)
            self.assertEqual(response.code, 407, headers)
            self.assertEqual(header(response, "proxy-authenticate"), CHALLENGE)
        self.assertEqual(CHALLENGE, 'Basic realm="cachingproxy"')
        self.assertEqual(self.origin.count(), 0)

    def test_accepted_and_never_forwarded(self) -> defer.Deferred[None]:
        """The right bcrypt and SHA passwords are accepted (MISS, then HIT);
        neither the cached path nor a passed-through POST sends
        Proxy-Authorization to the origin."""
        return run(self._accepted_and_never_forwarded())

    async def _accepted_and_never_forwarded(self) -> None:
        http = client(self, self.pport)
        alice = {"Proxy-Authorization": basic("alice", "wonderland")}
        bob = {"Proxy-Authorization": basic("bob", "builder")}
        r1, b1 = await fetch(http, self.url, alice)
        r2, b2 = await fetch(http, self.url, bob)
        self.assertEqual((r1.code, header(r1, "x-cache"), b1), (200, "MISS", b"wheel"))
        self.assertEqual((r2.code, header(r2, "x-cache"), b2), (200, "HIT", b"wheel"))
        r3, b3 = await fetch(
            http, f"http://127.0.0.1:{self.oport}/upload", bob, method="POST"
        )
        self.assertEqual((r3.code, b3), (200, b"stored"))
        self.assertEqual([r.method for r in self.origin.requests], ["GET", "POST"])
        for seen in self.origin.requests:
            self.assertIsNone(seen.header("proxy-authorization"), seen)

    def test_transparent_request_needs_credentials(self) -> defer.Deferred[None]:
        """An origin-form request whose Host names another server is proxied
        too, so it needs credentials as well (else Host would be a way round
        the check)."""
        return run(self._transparent_request_needs_credentials())

    async def _transparent_request_needs_credentials(self) -> None:
        request = (
            f"GET /pkg-1.0.whl HTTP/1.1\r\nHost: 127.0.0.1:{self.oport}\r\n\r\n"
        ).encode()
        status, headers, _ = parse_raw_response(
            await raw_exchange(self, self.pport, request)
        )
        self.assertEqual(status, 407)
        self.assertEqual(headers["proxy-authenticate"], [CHALLENGE])
        self.assertEqual(self.origin.count(), 0)

    def test_connect_needs_credentials(self) -> defer.Deferred[None]:
        """CONNECT without credentials is 407 and no tunnel is opened; with
        them the tunnel is established and carries a request to the origin."""
        return run(self._connect_needs_credentials())

    async def _connect_needs_credentials(self) -> None:
        authority = f"127.0.0.1:{self.oport}"
        refused = await raw_exchange(
            self,
            self.pport,
            f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode(),
        )
        status, headers, _ = parse_raw_response(refused)
        self.assertEqual(status, 407)
        self.assertEqual(headers["proxy-authenticate"], [CHALLENGE])
        tunnel = await raw_connect(
            self,
            self.pport,
            (
                f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
                f"Proxy-Authorization: {basic('alice', 'wonderland')}\r\n\r\n"
            ).encode(),
        )
        await wait_for(lambda: b"\r\n\r\n" in tunnel.received)
        self.assertTrue(
            bytes(tunnel.received).startswith(b"HTTP/1.1 200"), tunnel.received
        )
        self.assertEqual(self.origin.count(), 0)
        del tunnel.received[:]
        assert tunnel.transport is not None
        tunnel.transport.write(
            b"GET /pkg-1.0.whl HTTP/1.1\r\nHost: origin\r\nConnection: close\r\n\r\n"
        )
        await tunnel.lost
        self.assertTrue(bytes(tunnel.received).endswith(b"wheel"), tunnel.received)
        self.assertEqual(self.origin.count("/pkg-1.0.whl"), 1)

    def test_own_pages_and_mirrors_need_none(self) -> defer.Deferred[None]:
        """Requests addressed to the proxy itself (status page, metrics, a
        mirror) are served without Proxy-Authorization: pip --index-url
        cannot send it, and they reach only operator-configured upstreams."""
        return run(self._own_pages_and_mirrors_need_none())

    async def _own_pages_and_mirrors_need_none(self) -> None:
        status, _ = await own_page(self, self.pport, "/status.json")
        metrics, _ = await own_page(self, self.pport, "/metrics")
        mirrored, body = await own_page(self, self.pport, "/m/pkg-1.0.whl")
        self.assertEqual((status.code, metrics.code), (200, 200))
        self.assertEqual((mirrored.code, body), (200, b"wheel"))

    def test_wrong_password_is_logged(self) -> defer.Deferred[None]:
        """Through the proxy, a wrong password is logged with the user and the
        client address, never the password."""
        return run(self._wrong_password_is_logged())

    async def _wrong_password_is_logged(self) -> None:
        logs = LogCapture(self)
        response, _ = await fetch(
            client(self, self.pport),
            self.url,
            {"Proxy-Authorization": basic("alice", "Tr0ub4dor&3")},
        )
        self.assertEqual(response.code, 407)
        [line] = logs.lines("wrong password")
        self.assertIn("'alice'", line)
        self.assertIn("127.0.0.1", line)
        self.assertNotIn("Tr0ub4dor&3", logs.everything())

    def test_users_added_without_restart(self) -> defer.Deferred[None]:
        """A user added to the file is accepted by the running proxy, with no
        restart, once a second has passed."""
        return run(self._users_added_without_restart())

    async def _users_added_without_restart(self) -> None:
        http = client(self, self.pport)
        carol = {"Proxy-Authorization": basic("carol", "c")}
        refused, _ = await fetch(http, self.url, carol)
        self.assertEqual(refused.code, 407)
        sha = "{SHA}" + base64.b64encode(hashlib.sha1(b"c").digest()).decode()
        with open(self.htpasswd, "a") as f:
            f.write(f"carol:{sha}\n")
        os.utime(self.htpasswd, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
        checker = self.service.auth
        assert checker is not None
        checker._looked_at -= 2  # as if a second had passed
        accepted, body = await fetch(http, self.url, carol)
        self.assertEqual((accepted.code, body), (200, b"wheel"))


class StartupTests(TestCase):
    def test_bad_file_stops_start_up(self) -> defer.Deferred[None]:
        """``twistd cachingproxy --proxy-auth FILE`` with an unusable file
        exits non-zero with an error naming --proxy-auth and the line at
        fault, and no traceback."""
        return run(self._bad_file_stops_start_up())

    async def _bad_file_stops_start_up(self) -> None:
        bad = os.path.abspath(write(self, "alice:$apr1$xyz$abcdefghijklmnopqrstuv\n"))
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        result = await run_process(
            [
                *TWISTD,
                "-n",
                "--pidfile=",
                "cachingproxy",
                "--listen",
                f"tcp:{free_port()}:interface=127.0.0.1",
                "--cache-dir",
                os.path.abspath(self.mktemp()),
                "--proxy-auth",
                bad,
            ],
            env=checkout_env(),
            timeout=30,
            path=cwd,
        )
        self.assertNotEqual(result.code, 0, result.output)
        self.assertRegex(
            result.output, rf"--proxy-auth {bad}: line 1: user 'alice': unsupported"
        )
        self.assertNotIn("Traceback", result.output)
