"""A worker's tie to its supervisor: it never outlives it by more than seconds.

Two independent guards, so that even a supervisor killed by ``SIGKILL`` takes
its workers with it (SPEC 11) and a restart can bind the ports again:

* ``PR_SET_PDEATHSIG``: the kernel sends the worker ``SIGTERM`` when the
  supervisor dies (Linux; through ``prctl`` in libc);
* the lifeline pipe: the worker's stdin is a pipe only the supervisor holds
  open.  A thread blocks reading it; at end of file it asks the reactor to
  stop and, should that not finish in :data:`GRACE` seconds (a stuck
  reactor), ends the process itself.
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import threading
import time
from collections.abc import Callable

PR_SET_PDEATHSIG = 1
GRACE = 3.0
"""Seconds a worker whose supervisor is gone may take to stop cleanly."""

_LENGTH = struct.Struct("!Q")


def die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGTERM when the parent goes; exit if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the lifeline pipe still ends us
    if os.getppid() != parent:
        os._exit(1)


def frame(payload: bytes) -> bytes:
    """``payload`` with its length in front, as :func:`read_frame` reads it."""
    return _LENGTH.pack(len(payload)) + payload


def read_frame(fd: int) -> bytes:
    """One length-prefixed message from ``fd`` (blocking); EOFError if cut."""
    head = _read_exactly(fd, _LENGTH.size)
    (length,) = _LENGTH.unpack(head)
    return _read_exactly(fd, length)


def _read_exactly(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError("the supervisor went away")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def watch(fd: int, stop: Callable[[], None], grace: float = GRACE) -> threading.Thread:
    """Call ``stop`` (from a thread) once ``fd`` reaches end of file, then end
    the process if it is still alive ``grace`` seconds later."""

    def run() -> None:
        try:
            while os.read(fd, 4096):
                pass
        except OSError:
            pass
        stop()
        time.sleep(grace)
        os._exit(1)

    thread = threading.Thread(target=run, name="lifeline", daemon=True)
    thread.start()
    return thread


__all__ = ["GRACE", "die_with_parent", "frame", "read_frame", "watch"]
