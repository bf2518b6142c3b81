#!/usr/bin/env python3
"""Benchmark: ``pip install`` of 20 wheels through the mirror, cold and warm;
with ``--ecosystems all``, each ecosystem's own client (pip, go, cargo, gem, apt)
through its preset, cold and warm, as ratios to the client installing from a
local directory (bench/ecosystems.py).

Run from a checkout, with a Python that has the project's dependencies and
pip::

    python bench/bench_pip.py                 # 20 wheels of 200 KiB, 3 runs
    python bench/bench_pip.py --runs 1 --rate 4e6 --latency 0.02
    python bench/bench_pip.py --ecosystems all --wheels 10   # per ecosystem

Everything runs on 127.0.0.1; nothing else is contacted:

* an origin: a PEP 503 index (pypiserver-style root-relative
  ``/packages/…#sha256=`` links) in its own process, throttled like a far
  registry -- every request waits ``--latency`` seconds before its answer and
  every body is sent at ``--rate`` bytes/s;
* the proxy: a real ``twistd -n cachingproxy --mirror /pypi/=ORIGIN`` with a
  fresh cache directory per run.

pip (this Python's, no pip config, no proxy variables, ``--no-cache-dir``,
``--no-deps``, ``--target`` a fresh directory) installs the same 20 wheels:

* direct -- from the throttled origin, no cache (what a cache saves you);
* cold   -- through the mirror from the throttled origin (empty cache);
* warm   -- through the mirror with the origin stopped (everything a HIT);
* local index -- straight from the same index unthrottled (no latency, no
  rate limit, no cache): what pip itself costs over HTTP;
* floor  -- ``pip install --no-index --find-links DIR`` from a local folder.

Times are wall-clock seconds of the pip process; the table shows the median
of ``--runs`` runs, min and max, and each median's ratio to the floor.  MB
is 10^6 bytes; KiB is 1024 bytes.  Every child is killed on exit and the
temporary directory is deleted.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# bench.py imports this module: its helpers are imported where used, so that
# running this file does not import itself again half-way (an import cycle).

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KiB = 1024
TWISTD = (
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
)


# -- the throttled origin (runs in its own process) ----------------------------


def serve_origin(root: str, port: int, rate: float, latency: float) -> None:
    """A PEP 503 index of the wheels in ``root`` on 127.0.0.1:``port``:
    each answer waits ``latency`` s, bodies go out at ``rate`` bytes/s;
    ``GET /_count`` answers the request counts per path as JSON."""
    from twisted.internet import reactor
    from twisted.web import resource, server

    counts: collections.Counter[str] = collections.Counter()
    wheels = sorted(n for n in os.listdir(root) if n.endswith(".whl"))
    projects: dict[str, list[str]] = collections.defaultdict(list)
    for name in wheels:
        projects[name.split("-")[0].replace("_", "-")].append(name)
    digests = {}
    for name in wheels:
        with open(os.path.join(root, name), "rb") as f:
            digests[name] = hashlib.sha256(f.read()).hexdigest()
    chunk = 16 * KiB

    def page(links: list[tuple[str, str]]) -> bytes:
        anchors = "".join(f'<a href="{h}">{t}</a><br/>\n' for h, t in links)
        return f"<!DOCTYPE html><html><body>\n{anchors}</body></html>\n".encode()

    def send(request: server.Request, body: bytes, content_type: bytes) -> None:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        request.setHeader(b"Content-Type", content_type)
        request.setHeader(b"Content-Length", b"%d" % len(body))

        def more(offset: int) -> None:
            if gone:
                return
            if offset >= len(body):
                request.finish()
                return
            piece = body[offset : offset + chunk]
            request.write(piece)
            reactor.callLater(len(piece) / rate, more, offset + len(piece))

        reactor.callLater(latency, more, 0)

    class Root(resource.Resource):
        isLeaf = True

        def render_GET(self, request: server.Request) -> Any:  # noqa: N802
            path = request.path.decode("latin-1")
            if path == "/_count":
                return json.dumps(counts).encode()
            counts[path] += 1
            parts = path.strip("/").split("/")
            if path == "/simple/":
                body = page([(f"{p}/", p) for p in projects])
            elif len(parts) == 2 and parts[0] == "simple" and parts[1] in projects:
                body = page(
                    [
                        (f"/packages/{n}#sha256={digests[n]}", n)
                        for n in projects[parts[1]]
                    ]
                )
            elif len(parts) == 2 and parts[0] == "packages" and parts[1] in digests:
                with open(os.path.join(root, parts[1]), "rb") as f:
                    send(request, f.read(), b"application/octet-stream")
                return server.NOT_DONE_YET
            else:
                request.setResponseCode(404)
                return b"not found"
            send(request, body, b"text/html; charset=utf-8")
            return server.NOT_DONE_YET

    class QuietSite(server.Site):
        def log(self, request: Any) -> None:
            pass

    site: Any = QuietSite(Root())
    reactor.listenTCP(port, site, interface="127.0.0.1")
    reactor.run()


# -- processes -----------------------------------------------------------------


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextmanager
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every child started into the list is stopped and reaped on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            stop(proc)


def spawn(
    procs: list[subprocess.Popen[bytes]], argv: list[str], log: str, port: int
) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    procs.append(proc)
    from bench import wait_listening

    wait_listening(proc, port, log)
    return proc


# -- the bench -----------------------------------------------------------------


def build_wheels(directory: str, count: int, size: int) -> list[str]:
    """``count`` distinct wheels of about ``size`` bytes (random payload)."""
    sys.path.insert(0, REPO)
    from tests.support import build_wheel

    names = []
    for i in range(count):
        project = f"bench-pkg-{i:02d}"
        module = project.replace("-", "_")
        filename, data = build_wheel(
            project,
            "1.0",
            files={
                f"{module}/__init__.py": f"VALUE = {i}\n".encode(),
                f"{module}/payload.bin": os.urandom(size),
            },
        )
        with open(os.path.join(directory, filename), "wb") as f:
            f.write(data)
        names.append(project)
    return names


def pip_env() -> dict[str, str]:
    """This environment without pip settings or proxy variables."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith("PIP_") and "proxy" not in k.lower()
    }
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def pip_install(tmp: str, projects: list[str], *source: str) -> float:
    """Wall time of one ``pip install --target`` (fresh directory)."""
    target = tempfile.mkdtemp(dir=tmp, prefix="target-")
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--no-cache-dir"]
    argv += ["--no-deps", "--no-input", "--timeout", "30", "--retries", "0"]
    argv += ["--target", target, *source, *projects]
    started = time.monotonic()
    done = subprocess.run(
        argv, env=pip_env(), capture_output=True, text=True, timeout=600
    )
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"pip failed:\n{done.stdout}{done.stderr}")
    installed = [
        p for p in projects if os.path.isdir(os.path.join(target, p.replace("-", "_")))
    ]
    if len(installed) != len(projects):
        raise SystemExit(f"pip installed {len(installed)} of {len(projects)}")
    shutil.rmtree(target)
    return elapsed


def origin_counts(port: int) -> dict[str, int]:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/_count", timeout=10) as r:
        counts: dict[str, int] = json.load(r)
    return counts


def run(args: argparse.Namespace) -> None:
    from bench import free_port

    tmp = tempfile.mkdtemp(prefix="cachingproxy-bench-pip-")
    times: dict[str, list[float]] = collections.defaultdict(list)
    try:
        wheel_dir = os.path.join(tmp, "wheels")
        os.makedirs(wheel_dir)
        projects = build_wheels(wheel_dir, args.wheels, args.size)
        total = sum(
            os.path.getsize(os.path.join(wheel_dir, n)) for n in os.listdir(wheel_dir)
        )
        print(
            f"{len(projects)} wheels, {total / 1e6:.2f} MB in all; origin: "
            f"{args.rate / 1e6:g} MB/s per body, {args.latency * 1000:g} ms per "
            f"request; {args.runs} run(s) each; pip {pip_version()}",
            flush=True,
        )
        with children() as procs:
            fport = free_port()
            spawn(
                procs,
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--serve-origin",
                    wheel_dir,
                    str(fport),
                    "1e12",
                    "0",
                ],
                os.path.join(tmp, "origin.log"),
                fport,
            )
            local = ["--index-url", f"http://127.0.0.1:{fport}/simple/"]
            for run_no in range(args.runs):
                oport, pport = free_port(), free_port()
                origin = spawn(
                    procs,
                    [
                        sys.executable,
                        os.path.abspath(__file__),
                        "--serve-origin",
                        wheel_dir,
                        str(oport),
                        str(args.rate),
                        str(args.latency),
                    ],
                    os.path.join(tmp, "origin.log"),
                    oport,
                )
                cache = os.path.join(tmp, f"cache-{run_no}")
                proxy = spawn(
                    procs,
                    [
                        sys.executable,
                        "-c",
                        TWISTD,
                        "-n",
                        "--pidfile=",
                        "--logfile",
                        os.path.join(tmp, "twistd.log"),
                        "cachingproxy",
                        "--listen",
                        f"tcp:{pport}:interface=127.0.0.1",
                        "--cache-dir",
                        cache,
                        "--allow-upstream",
                        "127.0.0.1",
                        "--allow-client",
                        "127.0.0.1",
                        "--mirror",
                        f"/pypi/=http://127.0.0.1:{oport}/",
                    ],
                    os.path.join(tmp, "twistd.out"),
                    pport,
                )
                mirror = ["--index-url", f"http://127.0.0.1:{pport}/pypi/simple/"]
                direct = ["--index-url", f"http://127.0.0.1:{oport}/simple/"]
                times["direct"].append(pip_install(tmp, projects, *direct))
                before = origin_counts(oport)
                times["cold"].append(pip_install(tmp, projects, *mirror))
                after = origin_counts(oport)
                fetched = sum(
                    after.get(k, 0) - before.get(k, 0)
                    for k in after
                    if k.startswith("/packages/")
                )
                if fetched != len(projects):
                    raise SystemExit(f"cold run: origin sent {fetched} wheels")
                stop(origin)
                times["warm"].append(pip_install(tmp, projects, *mirror))
                times["local"].append(pip_install(tmp, projects, *local))
                times["floor"].append(
                    pip_install(tmp, projects, "--no-index", "--find-links", wheel_dir)
                )
                stop(proxy)
                print(
                    f"run {run_no + 1}: "
                    + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                    flush=True,
                )
        report(times, total, len(projects))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pip_version() -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--version"],
        env=pip_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout.split()[1] if done.returncode == 0 else "?"


def report(times: dict[str, list[float]], total: int, count: int) -> None:
    labels = {
        "floor": "floor: --no-index --find-links DIR",
        "local": "local index: unthrottled, no cache",
        "warm": "warm: mirror, all HITs, origin stopped",
        "cold": "cold: mirror, empty cache, throttled origin",
        "direct": "direct: throttled origin, no cache",
    }
    floor = statistics.median(times["floor"])
    print()
    print(
        f"{f'pip install of {count} wheels':<45} {'median':>7} {'min':>7} {'max':>7} {'x floor':>8} {'MB/s':>7}"
    )
    for key in ("floor", "local", "warm", "cold", "direct"):
        values = times[key]
        median = statistics.median(values)
        print(
            f"{labels[key]:<45} {median:>6.2f}s {min(values):>6.2f}s "
            f"{max(values):>6.2f}s {median / floor:>7.2f}x {total / median / 1e6:>7.2f}"
        )
    warm, cold = statistics.median(times["warm"]), statistics.median(times["cold"])
    direct = statistics.median(times["direct"])
    local = statistics.median(times["local"])
    print()
    print(
        f"warm is {cold / warm:.1f}x faster than cold and {warm / local:.2f}x the"
        f" unthrottled local index; cold costs {cold / direct:.2f}x direct"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", type=int, default=20, help="how many wheels")
    parser.add_argument(
        "--size", type=int, default=200 * KiB, help="payload bytes per wheel"
    )
    parser.add_argument(
        "--rate", type=float, default=2e6, help="origin bytes/s per body"
    )
    parser.add_argument(
        "--latency", type=float, default=0.05, help="origin delay per request, s"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each measurement")
    parser.add_argument(
        "--ecosystems",
        default="",
        help="instead: a per-ecosystem table (cold, warm with the origin stopped,"
        " floor) for these clients, comma-separated, or 'all'"
        " (pip, go, cargo, gem, apt); --wheels packages of --size bytes each",
    )
    parser.add_argument("--serve-origin", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ecosystems:
        from ecosystems import ECOSYSTEMS, run_all

        names = (
            list(ECOSYSTEMS) if args.ecosystems == "all" else args.ecosystems.split(",")
        )
        unknown = sorted(set(names) - set(ECOSYSTEMS))
        if unknown:
            raise SystemExit(f"--ecosystems: unknown {', '.join(unknown)}")
        run_all(names, args.wheels, args.size, stop)
        return
    if args.serve_origin:
        root, port, rate, latency = args.serve_origin
        serve_origin(root, int(port), float(rate), float(latency))
        return
    if not 1 <= args.wheels <= 200 or not 1 <= args.runs <= 20:
        raise SystemExit("--wheels must be 1..200 and --runs 1..20")
    run(args)


if __name__ == "__main__":
    main()
