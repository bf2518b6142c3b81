"""What a supervisor hands each worker process (pickled on its stdin)."""

from __future__ import annotations

from attrs import frozen

from cachingproxy.config import ProxyConfig
from cachingproxy.workers.sockets import Bound


@frozen
class WorkerPlan:
    """What a worker needs from its supervisor."""

    config: ProxyConfig
    slot: int
    """Which of the N workers this is (0-based; a replacement keeps the slot)."""
    count: int
    """N."""
    sockets: tuple[Bound, ...]
    """The supervisor's sockets; the worker has them at fds 3, 4, …"""
    supervisor: int
    """The supervisor's pid."""


FIRST_FD = 3
"""The worker's descriptor for ``sockets[0]``; the others follow."""


__all__ = ["FIRST_FD", "WorkerPlan"]
