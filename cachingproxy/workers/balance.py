"""Spreading connections over the workers that share a listening socket.

All workers wait on the same accept queue, and Linux wakes them all for each
connection: the one that runs first takes it, which tends to be the same
(busiest, cache-hot) worker again and again, so a few workers could hold
most keep-alive connections while others idle.  Each worker therefore
publishes how many connections it holds in a small shared table
(``run/balance``, one slot per worker) and stops accepting while it holds
more than the least loaded live worker; the least loaded ones always
accept, so a connection never waits for a worker to be free.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable, Sequence

from twisted.internet import task
from twisted.internet.interfaces import IListeningPort, IReactorTime

_SLOT = struct.Struct("=qd")
"""Per worker: connections held, time of the last update."""
TICK = 0.01
"""Seconds between updates of a worker's slot and its accepting."""
STALE = 0.5
"""A slot not updated for this long is a worker that is gone."""


def create_table(path: str, slots: int) -> None:
    """A zeroed table for ``slots`` workers (by the supervisor)."""
    with open(path, "wb") as f:
        f.write(b"\0" * (_SLOT.size * slots))


class Balancer:
    """Accepts on ``ports`` only while this worker is among the least loaded."""

    def __init__(
        self,
        path: str,
        slot: int,
        slots: int,
        connections: Callable[[], int],
        ports: Callable[[], Sequence[IListeningPort]],
        clock: IReactorTime,
    ) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self._map = mmap.mmap(fd, _SLOT.size * slots)
        finally:
            os.close(fd)
        self._slot = slot
        self._slots = slots
        self._connections = connections
        self._ports = ports
        self._clock = clock
        self.accepting = True
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(TICK, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        self._set_accepting(True)
        _SLOT.pack_into(self._map, self._slot * _SLOT.size, 0, 0.0)

    def _tick(self) -> None:
        now = self._clock.seconds()
        mine = self._connections()
        _SLOT.pack_into(self._map, self._slot * _SLOT.size, mine, now)
        least = mine
        for slot in range(self._slots):
            if slot != self._slot:
                held, seen = _SLOT.unpack_from(self._map, slot * _SLOT.size)
                if now - seen < STALE:
                    least = min(least, held)
        self._set_accepting(mine <= least)

    def _set_accepting(self, accepting: bool) -> None:
        if accepting == self.accepting:
            return
        self.accepting = accepting
        for port in self._ports():
            if accepting:
                port.startReading()  # type: ignore[attr-defined]
            else:
                port.stopReading()  # type: ignore[attr-defined]


__all__ = ["Balancer", "create_table"]
