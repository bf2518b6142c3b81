"""The process twistd starts under ``--workers N``: sockets, workers, signals.

It binds every endpoint (in ``privilegedStartService``, so still as root
under ``--uid``), checks what would otherwise fail in every worker at once
(the cache directory, ``--proxy-auth``, the interception CA, which it also
creates), sweeps the cache once, and then runs N workers.  A worker that
ends while the supervisor is not stopping is replaced after
:data:`RESPAWN_DELAY` seconds (longer, up to :data:`MAX_RESPAWN_DELAY`, while
workers keep dying at start-up).  ``SIGHUP`` is passed on to every worker;
stopping (``SIGTERM``) stops every worker, then closes the sockets.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import sys
import threading
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

import cachingproxy
from cachingproxy.cache.store import DiskStore
from cachingproxy.config import ProxyConfig
from cachingproxy.workers import lifeline, ramdir, run_dir
from cachingproxy.workers.balance import create_table
from cachingproxy.workers.plan import FIRST_FD, WorkerPlan
from cachingproxy.workers.relay import LineRelay
from cachingproxy.workers.sockets import Bound, bind_all

_log = Logger()

RESPAWN_DELAY = 0.2
MAX_RESPAWN_DELAY = 3.0
"""A replacement always starts within SPEC 11's 5 seconds."""
EARLY_DEATH = 5.0
"""A worker that ends sooner than this after starting counts as failing."""
GIVE_UP = 5
"""Start-up failures in a row of one worker slot after which the supervisor
stops instead of replacing it again."""
ORPHAN_SWEEP = 30.0
"""Seconds between looks for partial bodies no live worker holds (those
whose dead writer's followers were still reading them at its death)."""
STOP_GRACE = 15.0
"""Seconds workers get to stop on SIGTERM before they are killed."""
SHARED = ("metrics",)
"""Directories under ``run/`` that only live as long as the supervisor."""


class _Worker(ProcessProtocol):
    """One running worker process."""

    def __init__(self, supervisor: Supervisor, slot: int, started: float) -> None:
        self.supervisor = supervisor
        self.slot = slot
        self.started = started
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._relay = LineRelay()

    def errReceived(self, data: bytes) -> None:  # noqa: N802
        self._relay.received(data)

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        self._relay.flush()
        self.ended.callback(None)
        self.supervisor._ended(self, reason)

    def send(self, name: str) -> None:
        """Send signal ``name`` (``TERM``, ``HUP`` …) if it still runs."""
        with contextlib.suppress(ProcessExitedAlready, OSError):
            self.transport.signalProcess(name)  # type: ignore[union-attr]


class Supervisor(Service):
    """Runs ``count`` worker processes on sockets it bound itself."""

    def __init__(self, config: ProxyConfig, count: int, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.config = config
        self.count = count
        self.reactor = reactor
        self.ports: list[IListeningPort] = []
        self.sockets: list[Bound] = []
        self.workers: dict[int, _Worker] = {}
        self._respawns: dict[int, IDelayedCall] = {}
        self._delays: dict[int, float] = {}
        self._failures: dict[int, int] = {}
        self._stopping = False
        self._previous_sighup: Any = None
        self._sweeper: task.LoopingCall | None = None

    # -- start -----------------------------------------------------------------

    def privilegedStartService(self) -> None:  # noqa: N802
        super().privilegedStartService()
        self.ports, bound, failures = bind_all(self.reactor, self.config)
        self.sockets = bound
        if failures:
            for port in self.ports:
                port.stopListening()
            _fatal("; ".join(failures))
        for b in bound:
            _log.info("cachingproxy listening on {where}", where=b.description)

    def startService(self) -> None:  # noqa: N802
        super().startService()
        if not self.ports and not self.sockets:
            self.privilegedStartService()
        self._preflight()
        _log.info("cachingproxy running {n} workers (--workers)", n=self.count)
        if threading.current_thread() is threading.main_thread():
            self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)
        for slot in range(self.count):
            self._spawn(slot)
        self._sweeper = task.LoopingCall(self._sweep_orphans)
        self._sweeper.clock = self.reactor
        self._sweeper.start(ORPHAN_SWEEP, now=False)

    def _preflight(self) -> None:
        """Fail once, here, what would fail in every worker; sweep the cache;
        make the CA and the shared state directories."""
        config = self.config
        if config.proxy_auth is not None:
            from cachingproxy.front.auth import HtpasswdError, ProxyAuth

            try:
                ProxyAuth(config.proxy_auth, self.reactor, self.reactor).close()
            except HtpasswdError as e:
                _fatal(f"--proxy-auth {config.proxy_auth}: {e}")
        try:
            store = DiskStore.open(config.cache_dir, reactor=self.reactor)
        except Exception as e:
            _fatal(f"--cache-dir {config.cache_dir}: cannot open the cache: {e}")
        store.close()
        if config.intercept:  # the CA, made once here
            from cachingproxy.service import ProxyService

            ProxyService(config, self.reactor)._interception()
        for name in SHARED:
            path = run_dir(config.cache_dir, name)
            shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path, exist_ok=True)
        ramdir.make(run_dir(config.cache_dir, "claims"))  # on a miss's path
        create_table(run_dir(config.cache_dir, "balance"), self.count)
        for stale in ("digests.sqlite", "digests.sqlite-wal", "digests.sqlite-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(run_dir(config.cache_dir, stale))

    def _environment(self) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if k not in ("LISTEN_FDS", "LISTEN_PID")
        }
        package_root = os.path.dirname(os.path.dirname(cachingproxy.__file__))
        env["PYTHONPATH"] = os.pathsep.join(
            [package_root, *filter(None, [env.get("PYTHONPATH")])]
        )
        env["PROMETHEUS_MULTIPROC_DIR"] = run_dir(self.config.cache_dir, "metrics")
        return env

    def _spawn(self, slot: int) -> None:
        self._respawns.pop(slot, None)
        if self._stopping:
            return
        worker = _Worker(self, slot, self.reactor.seconds())
        # stdout (--access-log -) is shared; stderr carries the worker's log.
        fds: dict[int, int | str] = {0: "w", 1: 1, 2: "r"}
        for i, bound in enumerate(self.sockets):
            fds[FIRST_FD + i] = bound.fd
        argv = [sys.executable, "-m", "cachingproxy.workers.worker"]
        process = self.reactor.spawnProcess(
            worker, sys.executable, argv, env=self._environment(), childFDs=fds
        )
        plan = WorkerPlan(
            self.config, slot, self.count, tuple(self.sockets), os.getpid()
        )
        process.writeToChild(0, lifeline.frame(pickle.dumps(plan)))
        self.workers[slot] = worker

    # -- running ---------------------------------------------------------------

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.slot) is worker:
            del self.workers[worker.slot]
        if self._stopping:
            return
        lived = self.reactor.seconds() - worker.started
        delay = RESPAWN_DELAY
        if lived < EARLY_DEATH:
            delay = min(MAX_RESPAWN_DELAY, 2 * self._delays.get(worker.slot, delay / 2))
        self._delays[worker.slot] = delay
        # A worker that exits by itself at start-up, again and again, cannot
        # start (what the supervisor's checks missed): give up, loudly.
        exited = getattr(reason.value, "signal", None) is None
        failing = lived < EARLY_DEATH and exited
        self._failures[worker.slot] = (
            self._failures.get(worker.slot, 0) + 1 if failing else 0
        )
        if self._failures[worker.slot] >= GIVE_UP:
            _log.critical(
                "worker {slot} failed to start {n} times in a row; stopping"
                " (its output above says why)",
                slot=worker.slot,
                n=GIVE_UP,
            )
            self.reactor.stop()
            return
        _log.warn(
            "worker {slot} ended ({why}); starting another in {delay:g}s",
            slot=worker.slot,
            why=reason.getErrorMessage(),
            delay=delay,
        )
        self._respawns[worker.slot] = self.reactor.callLater(
            delay, self._spawn, worker.slot
        )
        # Now, and again once the survivors following its downloads moved on.
        self._sweep_orphans()
        for later in (2.0, 10.0):
            self.reactor.callLater(later, self._sweep_orphans)

    def _sweep_orphans(self) -> None:
        """Delete bodies in ``tmp/`` that no live worker holds open: those a
        dead worker was writing (a live worker keeps each of its bodies open
        from creation to commit or abort)."""
        if self._stopping:
            return
        tmp = os.path.join(self.config.cache_dir, "tmp")
        try:  # listed before the open files: a body made after is not seen
            entries = list(os.scandir(tmp))
        except OSError:
            return
        held: set[str] = set()
        for worker in list(self.workers.values()):
            pid = getattr(worker.transport, "pid", None)
            if pid is None:
                continue
            fds = f"/proc/{pid}/fd"
            try:
                names = os.listdir(fds)
            except OSError:
                return  # cannot tell (no /proc): delete nothing
            for name in names:
                with contextlib.suppress(OSError):
                    held.add(os.readlink(os.path.join(fds, name)))
        swept = 0
        for entry in entries:
            if entry.is_file(follow_symlinks=False) and entry.path not in held:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    swept += 1
        if swept:
            _log.info("removed {n} partial bodies of ended workers", n=swept)

    def _sighup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self._forward, "HUP")

    def _forward(self, name: str) -> None:
        for worker in list(self.workers.values()):
            worker.send(name)

    # -- stop ------------------------------------------------------------------

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        for call in self._respawns.values():
            if call.active():
                call.cancel()
        self._respawns.clear()
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        workers = list(self.workers.values())
        self._forward("TERM")
        if workers:
            all_ended = defer.DeferredList(
                [w.ended for w in workers], consumeErrors=True
            )
            timer = self.reactor.callLater(STOP_GRACE, self._forward, "KILL")
            await all_ended
            if timer.active():
                timer.cancel()
        ports, self.ports = self.ports, []
        for port in ports:
            await defer.maybeDeferred(port.stopListening)
        ramdir.remove(run_dir(self.config.cache_dir, "claims"))


def _fatal(message: str) -> None:
    print(f"cachingproxy: error: {message}", file=sys.stderr)
    raise SystemExit(1)


__all__ = ["Supervisor"]
