#!/usr/bin/env python3
"""How a worker learns that another worker's body file grew: inotify or polls.

Run from a checkout::

    python bench/bench_follow.py

A writer process appends 64 KiB chunks to a file at a set rate; a Twisted
reader in this process notices the growth either with ``twisted.internet.inotify``
(``IN_MODIFY``) or with a 10 ms ``LoopingCall`` doing ``fstat`` (what
:mod:`cachingproxy.workers.remote` does), and reports the delay from each
write to its detection (median, 99th percentile) and the reader's CPU time.
Everything is under a temporary directory, deleted at the end.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

CHUNK = 64 * 1024
WRITER = """
import os, sys, time
path, stamps, n, rate, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
fd = os.open(path, os.O_WRONLY | os.O_APPEND)
data = b'x' * chunk
with open(stamps, 'w') as st:
    for i in range(n):
        os.write(fd, data)
        st.write(repr(time.time()) + '\\n')
        time.sleep(1 / rate)
"""


def measure(mode: str, rate: float, count: int, work: str) -> str:
    """One run in a child process (each needs its own reactor)."""
    done = subprocess.run(
        [sys.executable, __file__, "--one", mode, str(rate), str(count), work],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return (done.stdout + done.stderr).strip()


def one(mode: str, rate: float, count: int, work: str) -> None:
    from twisted.internet import inotify, reactor, task
    from twisted.python import filepath

    path = os.path.join(work, f"body-{mode}")
    stamps_path = os.path.join(work, f"stamps-{mode}")
    open(path, "wb").close()
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WRITER,
            path,
            stamps_path,
            str(count),
            str(rate),
            str(CHUNK),
        ]
    )
    fd = os.open(path, os.O_RDONLY)
    seen: list[tuple[int, float]] = []
    last = [0]

    def check(*_: object) -> None:
        size = os.fstat(fd).st_size
        if size != last[0]:
            last[0] = size
            seen.append((size, time.time()))
        if size >= count * CHUNK and reactor.running:
            reactor.stop()

    if mode == "poll":
        task.LoopingCall(check).start(0.01)
    else:
        watcher = inotify.INotify()
        watcher.startReading()
        watcher.watch(
            filepath.FilePath(path), mask=inotify.IN_MODIFY, callbacks=[check]
        )
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.time()
    reactor.run()
    after = resource.getrusage(resource.RUSAGE_SELF)
    writer.wait()
    with open(stamps_path) as f:
        stamps = [float(line) for line in f]
    delays = sorted(
        next(t for size, t in seen if size >= (k + 1) * CHUNK) - written
        for k, written in enumerate(stamps)
    )
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    elapsed = time.time() - started
    print(
        f"{mode:8} {count} x 64 KiB at {count * CHUNK / elapsed / 1e6:6.1f} MB/s:"
        f" delay median {delays[len(delays) // 2] * 1000:5.2f} ms,"
        f" p99 {delays[int(len(delays) * 0.99)] * 1000:5.2f} ms;"
        f" reader CPU {cpu / elapsed * 100:4.1f}% of a core"
    )


def main() -> None:
    if sys.argv[1:2] == ["--one"]:
        mode, rate, count, work = sys.argv[2:6]
        one(mode, float(rate), int(count), work)
        return
    work = tempfile.mkdtemp(prefix="cachingproxy-bench-follow-")
    try:
        for rate, count in ((200, 400), (2000, 4000)):
            for mode in ("poll", "inotify"):
                print(measure(mode, rate, count, work), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
