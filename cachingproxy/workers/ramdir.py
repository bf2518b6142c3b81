"""The claims directory in memory, where the system has a RAM file system.

Every claim costs file creations on a miss's way to its first byte: the
lock file, then the state file, replaced by rename when the claim is taken
and again when the head arrives (:mod:`cachingproxy.workers.claims`).  On a
disk file system each creation is a journal transaction -- about 0.4 ms on
ext4 on the bench machine, some 1.5 ms of a 1 MiB MISS's time to first byte
with ``--workers 2`` (3.9 ms with one worker) -- while on tmpfs each is a
few microseconds.  So the supervisor makes ``run/claims`` a symbolic link to
a private directory (mode 0700) under ``/dev/shm`` for its lifetime; the
workers, all on the same host as their supervisor, follow the link.  Where
there is no writable ``/dev/shm`` the claims stay in a plain directory.

The locks (``flock``) and atomic renames the claims rely on behave the same
on tmpfs.  A supervisor killed with SIGKILL leaves its directory behind
(small files, nothing else); the next supervisor of the same cache removes
it through the link it finds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

RAM_ROOT = "/dev/shm"
"""Where the private directory is made (tmpfs on Linux)."""
PREFIX = "cachingproxy-claims-"


def make(path: str, root: str = RAM_ROOT) -> str:
    """(Re)create ``path`` empty: a link to a new private directory under
    ``root`` when possible, else a plain directory.  Returns the directory
    that holds the files."""
    remove(path, root)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.isdir(root) and os.access(root, os.W_OK | os.X_OK):
        try:
            target = tempfile.mkdtemp(prefix=PREFIX, dir=os.path.abspath(root))
        except OSError:
            pass
        else:
            try:
                os.symlink(target, path)
            except OSError:
                shutil.rmtree(target, ignore_errors=True)
            else:
                return target
    os.makedirs(path, exist_ok=True)
    return path


def remove(path: str, root: str = RAM_ROOT) -> None:
    """Remove ``path`` and, when it is a link :func:`make` made, the
    directory it points to."""
    if os.path.islink(path):
        target = os.readlink(path)
        if _ours(target, root):
            shutil.rmtree(target, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _ours(target: str, root: str) -> bool:
    """Whether ``target`` is a directory :func:`make` would have made."""
    return (
        os.path.isabs(target)
        and os.path.dirname(os.path.normpath(target)) == os.path.abspath(root)
        and os.path.basename(target).startswith(PREFIX)
        and os.path.isdir(target)
        and not os.path.islink(target)
        and os.stat(target).st_uid == os.getuid()
    )


__all__ = ["PREFIX", "RAM_ROOT", "make", "remove"]
