"""``--workers 2``: a real ``twistd cachingproxy`` supervisor and its workers
(SPEC 11), against origins in the test's reactor.

Which worker serves a connection is the kernel's choice (they share one
accept queue); tests that need a particular split keep adding connections
until the shared state under ``CACHE/run`` shows it, bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket

from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool, ProxyAgent

from .support import fetch, pause, run, start_origin, wait_for
from .test_process import Twistd

WORKER_MODULE = b"cachingproxy.workers.worker"


def worker_pids(supervisor: int) -> set[int]:
    """The pids of the live worker processes of ``supervisor``."""
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        fields = stat.rsplit(b")", 1)[1].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == supervisor and WORKER_MODULE in cmdline and state != b"Z":
            found.add(int(name))
    return found


def any_workers_of(pids: set[int]) -> set[int]:
    """Which of ``pids`` still run (not zombies)."""
    alive = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state != b"Z":
            alive.add(pid)
    return alive


def fresh_client(test: TestCase, proxy_port: int) -> HTTPClient:
    """A client through the proxy that opens a new connection per request."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    test.addCleanup(pool.closeCachedConnections)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy_port)
    return HTTPClient(ProxyAgent(endpoint, reactor=reactor, pool=pool))


async def start(test: TestCase, *options: str) -> Twistd:
    """``twistd cachingproxy --workers 2`` with both workers up."""
    proxy = Twistd(test, test.mktemp(), "--workers", "2", *options)
    await proxy.wait_listening()
    await wait_for(lambda: len(worker_pids(proxy.process.pid)) == 2, timeout=30)
    return proxy


def _can_bind(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class ProcessModelTests(TestCase):
    """The supervisor binds once, runs N workers, replaces, signals, stops."""

    def test_two_workers_share_the_socket(self) -> defer.Deferred[None]:
        """Two worker processes run under the process twistd started, and
        requests over many connections are answered with the origin's bytes."""
        return run(self._share())

    async def _share(self) -> None:
        origin, oport = start_origin(self)
        origin.static("/a-1.0.whl", b"a" * 5000)
        proxy = await start(self)
        http = fresh_client(self, proxy.port)
        url = f"http://127.0.0.1:{oport}/a-1.0.whl"
        for _ in range(10):
            response, body = await fetch(http, url)
            self.assertEqual((response.code, body), (200, b"a" * 5000))
        self.assertEqual(len(worker_pids(proxy.process.pid)), 2)

    def test_dead_worker_is_replaced(self) -> defer.Deferred[None]:
        """kill -9 of a worker: another one is started, the supervisor keeps
        its pid, and the proxy keeps answering."""
        return run(self._replaced())

    async def _replaced(self) -> None:
        origin, oport = start_origin(self)
        origin.static("/b-1.0.whl", b"b" * 100)
        proxy = await start(self)
        before = worker_pids(proxy.process.pid)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        survivors = before - {victim}
        await wait_for(
            lambda: (
                len(worker_pids(proxy.process.pid) - survivors) == 1
                and victim not in worker_pids(proxy.process.pid)
            ),
            timeout=30,
        )
        self.assertTrue(proxy.running)
        http = fresh_client(self, proxy.port)
        for _ in range(4):
            response, body = await fetch(http, f"http://127.0.0.1:{oport}/b-1.0.whl")
            self.assertEqual((response.code, body), (200, b"b" * 100))

    def test_sigterm_stops_every_worker(self) -> defer.Deferred[None]:
        """SIGTERM to the supervisor ends it and its workers; the port is free."""
        return run(self._sigterm())

    async def _sigterm(self) -> None:
        proxy = await start(self)
        workers = worker_pids(proxy.process.pid)
        os.kill(proxy.process.pid, signal.SIGTERM)
        await proxy.ended
        ended = proxy.reason.value if proxy.reason is not None else None
        # twistd ends by its own SIGTERM again once shut down (Twisted >= 24).
        self.assertIn(
            (getattr(ended, "exitCode", None), getattr(ended, "signal", None)),
            [(0, None), (None, signal.SIGTERM)],
            proxy.log(),
        )
        await wait_for(lambda: not any_workers_of(workers), timeout=15)
        self.assertTrue(_can_bind(proxy.port))

    def test_supervisor_sigkill_ends_the_workers(self) -> defer.Deferred[None]:
        """SIGKILL of the supervisor: its workers exit on their own (SPEC 11
        says within 5 s; the bound here only keeps the test from hanging)
        and the port can be bound again."""
        return run(self._sigkill())

    async def _sigkill(self) -> None:
        proxy = await start(self)
        workers = worker_pids(proxy.process.pid)
        await proxy.kill("KILL")
        await wait_for(lambda: not any_workers_of(workers), timeout=15)
        await wait_for(lambda: _can_bind(proxy.port), timeout=5)

    def test_sighup_reopens_the_access_log_in_every_worker(
        self,
    ) -> defer.Deferred[None]:
        """logrotate: after a rename and SIGHUP to the supervisor, requests
        answered by either worker are logged to a new file at the old path;
        nothing more goes to the renamed file."""
        return run(self._sighup())

    async def _sighup(self) -> None:
        origin, oport = start_origin(self)
        origin.static("/c-1.0.whl", b"c" * 10)
        log = os.path.abspath(self.mktemp())
        proxy = await start(self, "--access-log", log)
        http = fresh_client(self, proxy.port)
        url = f"http://127.0.0.1:{oport}/c-1.0.whl"
        for _ in range(6):
            await fetch(http, url)
        await wait_for(lambda: len(_lines(log)) == 6)
        os.rename(log, log + ".1")
        os.kill(proxy.process.pid, signal.SIGHUP)
        await wait_for(lambda: os.path.exists(log) or not proxy.running)
        # Both workers must have reopened: wait until neither writes to .1.
        await pause(0.5)
        for _ in range(12):
            await fetch(http, url)
        await wait_for(lambda: len(_lines(log)) == 12)
        self.assertEqual(len(_lines(log + ".1")), 6)
        self.assertTrue(proxy.running, proxy.log())


def _lines(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


class SharedFiguresTests(TestCase):
    """``/status.json``, ``/metrics`` and the access log are totals."""

    def test_totals_over_many_connections(self) -> defer.Deferred[None]:
        """30 requests, each on its own connection (so both workers answer
        some): whichever worker answers, /status.json and /metrics count all
        30 with their bytes, and the access log has 30 whole lines."""
        return _run(self._totals())

    async def _totals(self) -> None:
        origin, oport = start_origin(self)
        body = os.urandom(7000)
        origin.static("/t-1.0.whl", body)
        log = os.path.abspath(self.mktemp())
        proxy = await start(self, "--access-log", log)
        http = fresh_client(self, proxy.port)
        url = f"http://127.0.0.1:{oport}/t-1.0.whl"
        for _ in range(30):
            _response, got = await fetch(http, url)
            self.assertEqual(got, body)
        await wait_for(lambda: len(_lines(log)) >= 30)
        lines = _lines(log)
        self.assertEqual(len(lines), 30)
        for line in lines:
            fields = line.split(" ")
            self.assertEqual(len(fields), 9, line)
            self.assertEqual(fields[3:6], [url, "200", str(len(body))])
        misses = sum(line.split(" ")[7] == "MISS" for line in lines)
        self.assertEqual(misses, 1)
        self.assertEqual(origin.count("/t-1.0.whl"), 1)
        for _ in range(6):  # several connections: several workers answer
            _, raw = await fetch(http, f"http://127.0.0.1:{proxy.port}/status.json")
            status = json.loads(raw)
            self.assertEqual(status["requests"], 30)
            self.assertEqual((status["hits"], status["misses"]), (29, 1))
            self.assertEqual(status["bytes_served"], 30 * len(body))
            self.assertEqual(status["bytes_from_cache"], 29 * len(body))
            self.assertEqual(status["bytes_from_upstream"], len(body))
            _, raw = await fetch(http, f"http://127.0.0.1:{proxy.port}/metrics")
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(raw.decode())
                for s in family.samples
            }
            self.assertEqual(
                samples[("cachingproxy_requests_total", (("cache", "HIT"),))], 29
            )
            self.assertEqual(
                samples[("cachingproxy_requests_total", (("cache", "MISS"),))], 1
            )
            self.assertEqual(
                samples[("cachingproxy_bytes_total", (("source", "upstream"),))],
                len(body),
            )
            self.assertEqual(
                samples[("cachingproxy_response_seconds_count", (("cache", "HIT"),))],
                29,
            )
