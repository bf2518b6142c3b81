#!/usr/bin/env python3
"""Benchmark: what the operator features cost on the hit path.

Run from a checkout, with a Python that has the project's dependencies::

    python bench/bench_ops.py            # 6 rounds of 3 s per configuration
    python bench/bench_ops.py --quick    # 2 rounds of 2 s

It starts, on 127.0.0.1 only, the origin of ``bench/bench.py`` (static files,
its own process) and three ``twistd -n cachingproxy`` processes side by
side, each with its own cache directory:

* ``base``: no access log, 100 entries in the store;
* ``log``: ``--access-log FILE``, 100 entries;
* ``100k``: no access log, 100 000 entries.

The stores are filled before the proxies start: rows go straight into the
index (``cachingproxy.cache.store.index.Index``, one transaction) with a tiny body
file each, so the proxy's start-up sweep keeps them.  Each proxy then stores
the same 10 KiB file (a MISS), and the benchmark measures HIT requests/s of
that file, one proxy at a time, in rounds that interleave the three so that
drift affects all alike; the table shows each configuration's median and
best round and their ratios to ``base`` (the best round is the steadier
figure on a machine shared with other work; the load average is printed).  Load: ``wrk -t1 -c32`` when installed, else bench.py's
Python client (which is then the bottleneck).  The proxies' own
``/status.json`` confirms afterwards that every measured request was a hit
and how many entries each store held.  Everything is written under one
temporary directory that is deleted at the end; every child is killed on
exit; every loop is bounded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # bench/bench.py: the origin, the load clients, helpers

sys.path.insert(0, bench.REPO)
from cachingproxy.cache.entry import StoredResponse
from cachingproxy.cache.store.index import Index

SMALL = 10 * bench.KiB
FILLER = b"cachingproxy benchmark filler\n"


@dataclass
class Proxy:
    """One proxy configuration under test and its measurements."""

    name: str
    label: str
    entries: int
    access_log: str | None
    cache_dir: str = ""
    port: int = 0
    origin_port: int = 0
    startup: float = 0.0
    rates: list[float] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> bench.Target:
        return bench.Target(self.name, self.port, self.origin_port, via_proxy=True)


def populate(cache_dir: str, count: int, origin_port: int) -> None:
    """A cache directory holding ``count`` entries with tiny bodies."""
    index = Index.open(cache_dir)
    try:
        digest = hashlib.sha256(FILLER).hexdigest()
        headers = (
            ("Content-Type", "application/octet-stream"),
            ("Content-Length", str(len(FILLER))),
        )
        now = time.time()
        with index.transaction():
            for i in range(count):
                name = hashlib.md5(str(i).encode()).hexdigest()
                ref = f"{name[:2]}/{name}"
                path = os.path.join(index.bodies_dir, ref)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(FILLER)
                url = (
                    f"http://127.0.0.1:{origin_port}/packages/filler-{i:06d}-1.0.tar.gz"
                )
                entry = StoredResponse(
                    url=url,
                    variant="",
                    vary=(),
                    status=200,
                    headers=headers,
                    stored_at=now,
                    size=len(FILLER),
                    digest=digest,
                    body_ref=ref,
                )
                index.insert(entry, now)
    finally:
        index.close()


def start_proxy(proxy: Proxy, work: str, procs: list[subprocess.Popen[bytes]]) -> None:
    """``twistd -n cachingproxy`` for ``proxy``; waits until it listens."""
    proxy.port = bench.free_port()
    log = os.path.join(work, f"{proxy.name}.twistd.log")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [bench.REPO, env.get("PYTHONPATH")])
    )
    argv = [sys.executable, "-c", bench.TWISTD, "-n", "--pidfile=", "--logfile", log]
    argv += ["cachingproxy", "--listen", f"tcp:{proxy.port}:interface=127.0.0.1"]
    argv += ["--cache-dir", proxy.cache_dir]
    argv += ["--allow-upstream", "127.0.0.1", "--allow-client", "127.0.0.1"]
    if proxy.access_log is not None:
        argv += ["--access-log", proxy.access_log]
    started = time.monotonic()
    proxy.proc = subprocess.Popen(
        argv, env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    procs.append(proxy.proc)
    bench.wait_listening(proxy.proc, proxy.port, log)
    proxy.startup = time.monotonic() - started


def status(proxy: Proxy) -> dict[str, Any]:
    """The proxy's own ``/status.json``."""
    url = f"http://127.0.0.1:{proxy.port}/status.json"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=30) as response:
        result: dict[str, Any] = json.loads(response.read())
    return result


def warm(proxy: Proxy, path: str) -> None:
    """Store ``path`` in ``proxy`` (a MISS), then wait for it to be a HIT."""
    status_, cache, got = bench.fetch(proxy.target, path)
    if (status_, cache, got) != (200, "MISS", SMALL):
        raise SystemExit(f"{proxy.name}: expected a MISS, got {status_} {cache} {got}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if bench.fetch(proxy.target, path)[1] == "HIT":
            return
        time.sleep(0.05)
    raise SystemExit(f"{proxy.name}: {path} never became a HIT")


def count_lines(path: str) -> tuple[int, int]:
    """Lines of an access log, and how many of them are HITs."""
    lines = hits = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            lines += 1
            fields = line.split(" ")
            hits += len(fields) > 7 and fields[7] == "HIT"
    return lines, hits


def run(
    rounds: int, seconds: float, force_python: bool, work: str
) -> tuple[list[Proxy], str, list[str]]:
    root = os.path.join(work, "origin")
    os.makedirs(root)
    bench.make_file(os.path.join(root, "small.whl"), SMALL)
    oport = bench.free_port()
    proxies = [
        Proxy("base", "access log off, 100 entries", 100, None),
        Proxy(
            "log", "access log ON, 100 entries", 100, os.path.join(work, "access.log")
        ),
        Proxy("100k", "access log off, 100 000 entries", 100_000, None),
    ]
    notes: list[str] = []
    for proxy in proxies:
        proxy.cache_dir = os.path.join(work, f"cache-{proxy.name}")
        proxy.origin_port = oport
        started = time.monotonic()
        populate(proxy.cache_dir, proxy.entries - 1, oport)  # + the measured file
        took = time.monotonic() - started
        print(f"== {proxy.name}: {proxy.entries - 1:,} entries written in {took:.1f} s")
    use_wrk = shutil.which("wrk") is not None and not force_python
    load = bench.load_wrk if use_wrk else bench.load_python
    how = ""
    with bench.children() as procs:
        origin_log = os.path.join(work, "origin.log")
        with open(origin_log, "wb") as log:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        bench.__file__,
                        "--serve-origin",
                        root,
                        str(oport),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=work,
                )
            )
        bench.wait_listening(procs[-1], oport, origin_log)
        origin = bench.Target("origin", oport, oport, via_proxy=False)
        for proxy in proxies:
            start_proxy(proxy, work, procs)
            warm(proxy, "/small.whl")
        before = bench.origin_counts(origin).get("/small.whl", 0)
        print("== warm-up, 1 s each")
        for proxy in proxies:
            load(proxy.target, "/small.whl", 1.0)
        for n in range(rounds):
            print(f"== round {n + 1} of {rounds}, {seconds:g} s each")
            for proxy in proxies:
                rate, how = load(proxy.target, "/small.whl", seconds)
                proxy.rates.append(rate)
                print(f"   {proxy.name:>5}: {rate:,.0f} requests/s")
        upstream = bench.origin_counts(origin).get("/small.whl", 0) - before
        if upstream:
            raise SystemExit(f"FAIL: {upstream} origin requests during the HIT runs")
        for proxy in proxies:
            assert proxy.proc is not None
            if proxy.proc.poll() is not None:
                raise SystemExit(f"FAIL: proxy {proxy.name} died")
            s = status(proxy)
            if s["entries"] != proxy.entries or s["hits"] != s["requests"] - 1:
                raise SystemExit(f"FAIL: {proxy.name}: unexpected status {s}")
            notes.append(
                f"{proxy.name}: /status.json says {s['requests']:,} requests,"
                f" {s['hits']:,} hits, {s['entries']:,} entries;"
                f" started (sweep included) in {proxy.startup:.2f} s"
            )
        log_path = proxies[1].access_log
        assert log_path is not None
        lines, hits = count_lines(log_path)
        notes.append(
            f"log: {lines:,} access log lines ({hits:,} HIT),"
            f" {os.path.getsize(log_path) / 1e6:,.1f} MB"
        )
    return proxies, how, notes


def print_table(proxies: list[Proxy], title: str, notes: list[str]) -> None:
    base_median = statistics.median(proxies[0].rates)
    base_best = max(proxies[0].rates)
    header = ("configuration", "median", "vs base", "best", "vs base", "rounds")
    rows = [
        (
            f"{p.name}: {p.label}",
            f"{statistics.median(p.rates):,.0f}",
            f"{statistics.median(p.rates) / base_median:.2f}",
            f"{max(p.rates):,.0f}",
            f"{max(p.rates) / base_best:.2f}",
            " ".join(f"{r:,.0f}" for r in p.rates),
        )
        for p in proxies
    ]
    print()
    print(title)
    print("\n".join(bench.table(header, rows)))
    print(
        "HIT requests/s of one 10 KiB file: the median and the best of the rounds,"
        " each against base's."
    )
    for note in notes:
        print(f"  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 s")
    parser.add_argument("--rounds", type=int, help="rounds (default 6, quick 2)")
    parser.add_argument("--seconds", type=float, help="seconds per measurement")
    parser.add_argument(
        "--python-clients",
        action="store_true",
        help="use bench.py's Python load client even when wrk is installed",
    )
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 6)
    seconds = args.seconds or (2.0 if args.quick else 3.0)
    if not 1 <= rounds <= 20 or not 0.5 <= seconds <= 60:
        parser.error("--rounds must be 1-20 and --seconds 0.5-60")
    load_before = os.getloadavg()[0]
    work = tempfile.mkdtemp(prefix="cachingproxy-bench-ops-")
    started = time.monotonic()
    try:
        proxies, how, notes = run(rounds, seconds, args.python_clients, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import twisted

    title = (
        f"cachingproxy operator benchmark: {bench.human(SMALL)} HIT requests/s"
        f" ({os.cpu_count()} CPUs; Python {sys.version.split()[0]};"
        f" Twisted {twisted.__version__}; {how}; {rounds} rounds x {seconds:g} s;"
        f" {time.monotonic() - started:.0f} s in all; load average"
        f" {load_before:.1f} before, {os.getloadavg()[0]:.1f} after)"
    )
    print_table(proxies, title, notes)


if __name__ == "__main__":
    main()
