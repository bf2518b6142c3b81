"""Process-level tests: a real ``twistd -n cachingproxy`` and real ``curl``.

The origin runs in the test's reactor; twistd and curl are child processes
spawned without blocking it.  Every child is killed and reaped in a cleanup.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.trial.unittest import TestCase

from .support import (
    NOT_DONE_YET,
    TWISTD,
    ProcessResult,
    Twistd,
    checkout_env,
    curl,
    free_port,
    need,
    own_page,
    pause,
    run,
    run_process,
    start_origin,
    wait_for,
)

MiB = 1024 * 1024

SPEC_OPTIONS = (
    "--listen",
    "--cache-dir",
    "--index-ttl",
    "--negative-ttl",
    "--max-stale",
    "--offline",
    "--connect-timeout",
    "--read-timeout",
    "--allow-client",
    "--allow-upstream",
    "--name",
    "--access-log",
    "--config",
)
"""Options SPEC section 1 names that ``--help`` must list."""


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _temp_files(cache_dir: str) -> dict[str, int]:
    """Name and size of every file in the cache's ``tmp/`` directory."""
    tmp = os.path.join(cache_dir, "tmp")
    found = {}
    for name in os.listdir(tmp) if os.path.isdir(tmp) else ():
        with contextlib.suppress(FileNotFoundError):
            found[name] = os.stat(os.path.join(tmp, name)).st_size
    return found


def _committed_urls(cache_dir: str) -> list[str]:
    """URLs with a row in the disk store's index (white-box: store/disk.py schema)."""
    index = os.path.join(cache_dir, "index.sqlite")
    db = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        return [url for (url,) in db.execute("SELECT url FROM entries")]
    finally:
        db.close()


class TwistdCachingTests(TestCase):
    """The real twistd process caches, logs and survives a crash."""

    def setUp(self) -> None:
        need("curl")

    def test_miss_then_hit(self) -> defer.Deferred[None]:
        """Through ``twistd cachingproxy``, curl gets X-Cache MISS then HIT with the
        origin's exact bytes, and the origin sees one request."""
        return run(self._miss_then_hit())

    async def _miss_then_hit(self) -> None:
        origin, oport = start_origin(self)
        body = os.urandom(300_000)
        origin.static("/pkg-1.0.tar.gz", body)
        proxy = Twistd(self, self.mktemp())
        await proxy.wait_listening()
        url = f"http://127.0.0.1:{oport}/pkg-1.0.tar.gz"
        first, second = self.mktemp(), self.mktemp()
        r1 = await curl(url, proxy=proxy.port, out=first)
        r2 = await curl(url, proxy=proxy.port, out=second)
        self.assertEqual(r1.code, 0, r1.output)
        self.assertEqual(r2.code, 0, r2.output)
        self.assertEqual((r1.status, r2.status), (200, 200))
        self.assertEqual(
            (r1.headers.get("x-cache"), r2.headers.get("x-cache")), ("MISS", "HIT")
        )
        self.assertEqual(r1.body, body)
        self.assertEqual(r2.body, body)
        self.assertEqual(origin.count("/pkg-1.0.tar.gz"), 1)

    def test_kill_9_mid_download_leaves_nothing(self) -> defer.Deferred[None]:
        """SIGKILL during a download commits no entry; a restart on the same cache
        dir sweeps the temp file, and the URL is then a MISS fetched again whole.

        One process (``--workers 1``): under a supervisor, SIGKILL of the
        supervisor lets its workers stop cleanly (test_workers covers that
        and the SIGKILL of a worker)."""
        return run(self._kill_9())

    async def _kill_9(self) -> None:
        origin, oport = start_origin(self)
        body = os.urandom(8 * MiB)
        sent = 1 * MiB
        stalled: list[Any] = []

        def handler(request: Any) -> Any:
            request.setHeader(b"Content-Length", b"%d" % len(body))
            if stalled:
                return body
            # First request: 1 MiB of the declared 8 MiB, then silence.
            request.write(body[:sent])
            stalled.append(request)
            return NOT_DONE_YET

        def release_stalled() -> None:
            for request in stalled:
                if not request.finished and not request._disconnected:
                    request.channel.transport.abortConnection()

        self.addCleanup(release_stalled)
        path = "/big-1.0.tar.gz"
        url = f"http://127.0.0.1:{oport}{path}"
        origin.route(path, handler)
        cache_dir = os.path.abspath(self.mktemp())
        proxy = Twistd(self, cache_dir, "--read-timeout", "60", "--workers", "1")
        await proxy.wait_listening()

        partial = self.mktemp()
        client = defer.ensureDeferred(curl(url, proxy=proxy.port, out=partial))
        waited = 0.0
        while not any(size >= sent for size in _temp_files(cache_dir).values()):
            if waited > 15:
                raise AssertionError(
                    f"no {sent}-byte temp file in {cache_dir}/tmp: "
                    f"{_temp_files(cache_dir)}\n{proxy.log()}"
                )
            await pause(0.02)
            waited += 0.02
        await proxy.kill("KILL")
        ended = proxy.reason.value if proxy.reason is not None else None
        self.assertEqual(getattr(ended, "signal", None), 9)

        self.assertEqual(_committed_urls(cache_dir), [])
        self.assertTrue(_temp_files(cache_dir), "the crash left its temp file")
        result = await client
        self.assertNotEqual(result.code, 0, "curl saw a complete body")
        self.assertEqual(result.headers.get("x-cache"), "MISS")
        self.assertLess(os.path.getsize(partial), len(body))

        restarted = Twistd(self, cache_dir)
        await restarted.wait_listening()
        # The port is bound before the cache is opened and swept; the sweep
        # is over once the proxy answers a request.
        response, _ = await own_page(self, restarted.port, "/status.json")
        self.assertEqual(response.code, 200)
        self.assertEqual(_temp_files(cache_dir), {}, restarted.log())
        again = self.mktemp()
        r = await curl(url, proxy=restarted.port, out=again)
        self.assertEqual(r.code, 0, r.output)
        self.assertEqual(r.status, 200)
        self.assertEqual(r.headers.get("x-cache"), "MISS")
        self.assertEqual(r.body, body)
        self.assertEqual(origin.count(path), 2)
        # The commit (fsync, rename, index row) may land just after the response.
        for _ in range(500):
            if _committed_urls(cache_dir):
                break
            await pause(0.02)
        self.assertEqual(_committed_urls(cache_dir), [url])

    def test_access_log(self) -> defer.Deferred[None]:
        """--access-log FILE gets one line per request with, in SPEC 9 order,
        method, URL, status, bytes and the cache status (MISS, then HIT)."""
        return run(self._access_log())

    async def _access_log(self) -> None:
        origin, oport = start_origin(self)
        body = os.urandom(12_345)
        origin.static("/log-1.0.whl", body)
        log = os.path.abspath(self.mktemp())
        proxy = Twistd(self, self.mktemp(), "--access-log", log)
        await proxy.wait_listening()
        url = f"http://127.0.0.1:{oport}/log-1.0.whl"

        def lines() -> list[str]:
            return _read(log).decode().splitlines() if os.path.exists(log) else []

        for n in (1, 2):
            result = await curl(url, proxy=proxy.port, out=self.mktemp())
            self.assertEqual(result.code, 0, result.output)
            # A request's line is written once its response is over, by the
            # worker that served it (with several workers, possibly not the
            # one that served the previous request): wait for it before the
            # next request, so that the lines are in request order.
            await wait_for(lambda n=n: len(lines()) >= n, timeout=30, step=0.02)
        logged = lines()
        self.assertEqual(len(logged), 2, logged)
        # time, client, method, URL, status, bytes, duration ms, cache, upstream
        fields = [line.split() for line in logged]
        for row in fields:
            self.assertEqual(row[1:6], ["127.0.0.1", "GET", url, "200", str(len(body))])
            self.assertTrue(row[6].isdigit(), row)
        self.assertEqual([row[7] for row in fields], ["MISS", "HIT"])


class TwistdCommandLineTests(TestCase):
    """What ``twistd cachingproxy`` prints and how it exits on bad start-up."""

    async def _twistd(self, *args: str, timeout: float = 20.0) -> ProcessResult:
        cwd = self.mktemp()
        os.makedirs(cwd)
        argv = [*TWISTD, "-n", "--pidfile=", "cachingproxy", *args]
        return await run_process(argv, env=checkout_env(), timeout=timeout, path=cwd)

    def test_help_lists_spec_options(self) -> defer.Deferred[None]:
        """``twistd cachingproxy --help`` exits 0 and lists every option SPEC 1 names."""
        return run(self._help())

    async def _help(self) -> None:
        result = await self._twistd("--help")
        self.assertEqual(result.code, 0, result.output)
        for option in SPEC_OPTIONS:
            self.assertIn(f"{option}", result.output)
            self.assertRegex(result.output, rf"(?m)^\s+{option}[= ]")

    def test_bad_values(self) -> defer.Deferred[None]:
        """A bad option value stops start-up: non-zero exit, an error line naming
        the option, no traceback, and nothing listening."""
        return run(self._bad_values())

    async def _bad_values(self) -> None:
        port = free_port()
        cache_dir = os.path.abspath(self.mktemp())
        for option, value in [
            ("--max-size", "12X"),
            ("--allow-upstream", "not-a-network"),
            ("--read-timeout", "-1"),
        ]:
            result = await self._twistd(
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--cache-dir",
                cache_dir,
                option,
                value,
            )
            self.assertNotEqual(result.code, 0, result.output)
            self.assertRegex(result.output, rf"(?m)^.*{option}\b.*{value}")
            self.assertNotIn("Traceback", result.output)

    def test_port_in_use(self) -> defer.Deferred[None]:
        """``--listen`` on a port already in use exits non-zero (in bounded time)
        with an error naming --listen and no traceback."""
        return run(self._port_in_use())

    async def _port_in_use(self) -> None:
        factory: Any = ServerFactory.forProtocol(Protocol)
        taken = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        port = taken.getHost().port  # type: ignore[attr-defined]
        result = await self._twistd(
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--cache-dir",
            os.path.abspath(self.mktemp()),
            timeout=10,
        )
        self.assertNotEqual(result.code, 0, result.output)
        self.assertRegex(result.output, rf"--listen tcp:{port}\b.*in use")
        self.assertNotIn("Traceback", result.output)
