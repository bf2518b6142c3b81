"""One worker process: a whole proxy on sockets its supervisor bound.

Started by :class:`~cachingproxy.workers.supervisor.Supervisor` as
``python -m cachingproxy.workers.worker``; reads its :class:`WorkerPlan`
(pickled, length-prefixed) from stdin, which then stays open as the lifeline
(:mod:`cachingproxy.workers.lifeline`).
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from typing import Any

from twisted.internet.interfaces import IStreamServerEndpoint

from cachingproxy.cache.store import DiskStore
from cachingproxy.interfaces import ICacheStore
from cachingproxy.ops.stats import Stats
from cachingproxy.service import ProxyService
from cachingproxy.workers import lifeline, run_dir
from cachingproxy.workers.balance import Balancer
from cachingproxy.workers.coordination import SharedDownloads
from cachingproxy.workers.digests import SharedDigests
from cachingproxy.workers.plan import FIRST_FD, WorkerPlan
from cachingproxy.workers.sockets import AdoptedEndpoint


class WorkerService(ProxyService):
    """A ProxyService that adopts its listening sockets and shares its cache."""

    def __init__(self, plan: WorkerPlan, reactor: Any = None) -> None:
        super().__init__(plan.config, reactor)
        self.plan = plan
        self._fds = {
            (b.option, b.description): FIRST_FD + i for i, b in enumerate(plan.sockets)
        }
        self._families = {b.description: b.family for b in plan.sockets}
        self.shared = SharedDownloads(
            plan.config.cache_dir,
            run_dir(plan.config.cache_dir, "claims"),
            self.reactor,
        )

    def endpoint(self, description: str) -> IStreamServerEndpoint:
        option = "--listen" if description in self.config.listen else "--listen-tls"
        fd = self._fds.get((option, description))
        if fd is None:  # the same string given to both options
            fd = next(v for (_, d), v in self._fds.items() if d == description)
        return AdoptedEndpoint(
            self.reactor, description, fd, self._families[description]
        )

    def startService(self) -> None:  # noqa: N802
        super().startService()
        assert self.proxy is not None
        self.proxy.downloads.across = self.shared
        self.shared.followers.start(self.reactor, self.proxy.downloads.all)
        self.digests = SharedDigests(run_dir(self.config.cache_dir, "digests.sqlite"))
        self.proxy.mirrors.shared_digests = self.digests
        site = self.site
        self.balancer = Balancer(
            run_dir(self.config.cache_dir, "balance"),
            self.plan.slot,
            self.plan.count,
            lambda: len(site.channels) if site is not None else 0,
            lambda: self.ports,
            self.reactor,
        )
        self.balancer.start()

    def stopService(self) -> Any:  # noqa: N802
        self.balancer.stop()
        self.shared.followers.stop()
        return super().stopService()

    def make_stats(self) -> Stats | None:
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not directory or self.store is None:
            return None
        from cachingproxy.workers.sharedstats import SharedStats

        return SharedStats(
            self.reactor,
            usage=self.store.usage,
            in_flight=self.shared.in_flight,
            directory=directory,
        )

    def open_store(self) -> ICacheStore:
        config = self.config
        return DiskStore.open(
            config.cache_dir,
            reactor=self.reactor,
            max_size=config.max_size,
            sweep=False,
        )


def main() -> None:
    """The worker's entry point."""
    parent = os.getppid()
    lifeline.die_with_parent(parent)
    plan: WorkerPlan = pickle.loads(lifeline.read_frame(0))
    if plan.supervisor != parent:
        sys.exit(1)
    from twisted.internet import reactor as global_reactor
    from twisted.logger import globalLogBeginner

    from cachingproxy.workers.relay import worker_observer

    reactor: Any = global_reactor
    label = f"worker {plan.slot} ({os.getpid()})"
    globalLogBeginner.beginLoggingTo([worker_observer(label)], redirectStandardIO=False)
    service = WorkerService(plan, reactor)
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    lifeline.watch(0, lambda: reactor.callFromThread(reactor.stop))
    # Ctrl-C reaches the whole process group: the supervisor decides.
    reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
    reactor.run()


if __name__ == "__main__":
    main()
