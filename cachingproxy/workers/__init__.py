"""Worker processes sharing the listening sockets and the cache (SPEC 11).

With ``--workers N`` (N > 1) the process twistd starts is a
:class:`~cachingproxy.workers.supervisor.Supervisor`: it binds every listening
endpoint once and runs N copies of :mod:`cachingproxy.workers.worker`, each a
full proxy accepting from those sockets.  What the workers must agree on lives
in the cache directory, under ``run/``: the claims on downloads
(:mod:`~cachingproxy.workers.claims`) and the shared statistics.
"""

from __future__ import annotations

import os

from twisted.application.service import IService

from cachingproxy.config import ProxyConfig

MAX_AUTO = 16
"""``--workers auto`` runs one worker per core, at most this many."""


MAX_WORKERS = 64


def parse_workers(value: object) -> int | None:
    """``--workers``: ``auto`` (None) or a whole number from 1 to 64."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdecimal() or int(text) < 1:
        raise ValueError(f"{value!r} is not auto or a whole number of at least 1")
    if int(text) > MAX_WORKERS:
        raise ValueError(f"{value!r} is more than {MAX_WORKERS} workers")
    return int(text)


def worker_count(workers: int | None) -> int:
    """How many workers ``--workers`` means (None is ``auto``)."""
    if workers is not None:
        return workers
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(MAX_AUTO, cores))


def run_dir(cache_dir: str, *parts: str) -> str:
    """A path under the cache directory's ``run/``, the workers' shared state."""
    return os.path.join(cache_dir, "run", *parts)


def make_service(config: ProxyConfig) -> IService:
    """One proxy process (``--workers 1``), or a supervisor of N workers."""
    count = worker_count(config.workers)
    if count == 1:
        from cachingproxy.service import make_service as single

        return single(config)
    from cachingproxy.workers.supervisor import Supervisor

    return Supervisor(config, count)


__all__ = [
    "MAX_AUTO",
    "MAX_WORKERS",
    "make_service",
    "parse_workers",
    "run_dir",
    "worker_count",
]
