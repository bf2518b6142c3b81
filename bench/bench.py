#!/usr/bin/env python3
"""Benchmark of cachingproxy against direct access to a local origin.

Run from a checkout, with a Python that has the project's dependencies::

    python bench/bench.py            # default sizes, a few minutes on 2 cores
    python bench/bench.py --quick    # small sizes, well under a minute

It starts two child processes on 127.0.0.1 and nothing else is contacted:

* an origin: twisted.web's static ``File`` over a temporary directory, in its
  own process (so it does not share the proxy's CPU), counting the requests
  it gets per path (``GET /_count`` answers them as JSON);
* the proxy: a real ``twistd -n cachingproxy`` with a temporary cache
  directory and ``--allow-upstream 127.0.0.1``.

and measures, each figure next to the same thing fetched directly:

1. requests/s for a 10 KiB file served as a HIT (load: ``wrk`` when installed
   -- ``apt-get install -y wrk`` -- else a keep-alive ``http.client`` client in
   several threads, which is slower than the servers and then the bottleneck);
2. MB/s for one client reading a 256 MiB HIT (``curl``, else Python);
3. time to first body byte on a MISS (a fresh URL per trial; median);
4. how many origin requests 50 concurrent cold clients of one file cause
   (request coalescing: 1 is right);
5. the proxy's peak memory while 20 clients read one 1 GiB file at once, cold
   and then warm; PASS under 150 MB (10^6 bytes), from polling ``VmRSS`` and
   the kernel's own ``VmHWM`` high-water mark; under ``--workers`` the
   figure is the proportional set size (PSS) summed over the supervisor and
   its workers, as summed RSS counts their shared pages several times;
6. end to end: 8 concurrent ``pip install`` processes of the same 20 wheels
   (``bench_pip.py``'s PEP 503 origin, unthrottled) through a ``--mirror``
   whose cache is warm, wall time for all 8 (the direct column: the same 8
   against the origin itself).

Every figure is taken once per ``--workers`` setting (default ``1`` and
``auto``), each with a fresh proxy and cache, and a last table puts the
settings side by side.

Proxy requests use the transparent form (origin-form with ``Host:`` naming
the origin) for wrk and absolute-form (``http_proxy`` style) elsewhere.  MB
is 10^6 bytes; KiB, MiB and GiB are powers of 1024.  Everything is written
under one temporary directory that is deleted at the end; every child is
killed on exit.  Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.dirname(os.path.abspath(__file__))
KiB, MiB, GiB = 1024, 1024**2, 1024**3
RSS_LIMIT_MB = 150.0
TWISTD = (
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
)


@dataclass(frozen=True)
class Sizes:
    small: int
    large: int
    huge: int
    ttfb: int
    coalesce: int
    ttfb_trials: int
    load_seconds: float
    throughput_runs: int


DEFAULT = Sizes(10 * KiB, 256 * MiB, 1 * GiB, 8 * MiB, 32 * MiB, 7, 10.0, 3)
QUICK = Sizes(10 * KiB, 16 * MiB, 64 * MiB, 1 * MiB, 4 * MiB, 5, 3.0, 2)


# -- the origin (runs in its own process) --------------------------------------


def serve_origin(root: str, port: int) -> None:
    """twisted.web static files from ``root`` on 127.0.0.1:``port``, counting
    requests per path; ``GET /_count`` answers the counts as JSON."""
    from twisted.internet import reactor
    from twisted.web import resource, server, static

    counts: collections.Counter[str] = collections.Counter()

    class Count(resource.Resource):
        isLeaf = True

        def render_GET(self, request: server.Request) -> bytes:  # noqa: N802
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Cache-Control", b"no-store")
            return json.dumps(counts).encode()

    class Root(resource.Resource):
        def __init__(self) -> None:
            super().__init__()
            self.files = static.File(root)

        def getChildWithDefault(  # noqa: N802
            self, name: bytes, request: server.Request
        ) -> resource.Resource:
            if name == b"_count":
                return Count()
            counts[request.path.decode("latin-1")] += 1
            return self.files.getChildWithDefault(name, request)

    class QuietSite(server.Site):
        def log(self, request: Any) -> None:
            pass

    site: Any = QuietSite(Root())
    reactor.listenTCP(port, site, interface="127.0.0.1")
    reactor.run()


# -- processes -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(proc: subprocess.Popen[bytes], port: int, log: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"child exited ({proc.returncode}):\n{tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} not listening after 30 s:\n{tail(log)}")


def tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


@contextmanager
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every child started into the list is killed and reaped on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


# -- clients -------------------------------------------------------------------


@dataclass
class Target:
    """Where requests go: straight to the origin, or through the proxy."""

    name: str
    port: int
    origin_port: int
    via_proxy: bool

    def request_target(self, path: str) -> str:
        if self.via_proxy:
            return f"http://127.0.0.1:{self.origin_port}{path}"
        return path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.origin_port}{path}"

    def get(
        self, path: str, headers: dict[str, str] | None = None, method: str = "GET"
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(
            method,
            self.request_target(path),
            headers={"Host": f"127.0.0.1:{self.origin_port}", **(headers or {})},
        )
        return conn, conn.getresponse()


def drain(response: http.client.HTTPResponse, chunk: int = 1 * MiB) -> int:
    buffer = bytearray(chunk)
    total = 0
    while n := response.readinto(buffer):
        total += n
    return total


def fetch(target: Target, path: str, method: str = "GET") -> tuple[int, str, int]:
    """Status, X-Cache and body length of one request."""
    conn, response = target.get(path, method=method)
    try:
        size = drain(response) if method == "GET" else 0
        return response.status, response.headers.get("X-Cache", "-"), size
    finally:
        conn.close()


def origin_counts(origin: Target) -> dict[str, int]:
    conn, response = origin.get("/_count")
    try:
        return dict(json.loads(response.read()))
    finally:
        conn.close()


def load_wrk(target: Target, path: str, seconds: float) -> tuple[float, str]:
    url = f"http://127.0.0.1:{target.port}{path}"
    argv = ["wrk", "-t1", "-c32", f"-d{seconds:g}s", "--timeout", "10s"]
    argv += ["-H", f"Host: 127.0.0.1:{target.origin_port}", url]
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + 60, check=True
    )
    out = result.stdout
    rate = None
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            rate = float(line.split()[1])
        if "Non-2xx" in line or "Socket errors" in line:
            print(f"    wrk ({target.name}): {line.strip()}")
    if rate is None:
        raise SystemExit(f"cannot read wrk's output:\n{out}\n{result.stderr}")
    return rate, "wrk -t1 -c32"


def load_python(target: Target, path: str, seconds: float) -> tuple[float, str]:
    threads, counts, errors = 8, [0] * 8, [0] * 8
    deadline = time.monotonic() + seconds

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
        headers = {"Host": f"127.0.0.1:{target.origin_port}"}
        while time.monotonic() < deadline:
            try:
                conn.request("GET", target.request_target(path), headers=headers)
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    counts[i] += 1
                else:
                    errors[i] += 1
            except (OSError, http.client.HTTPException):
                errors[i] += 1
                conn.close()
        conn.close()

    started = time.monotonic()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(seconds + 30)
    elapsed = time.monotonic() - started
    if sum(errors):
        print(f"    python load ({target.name}): {sum(errors)} failed requests")
    return sum(counts) / elapsed, f"python http.client x{threads} threads"


def throughput_curl(target: Target, path: str, size: int) -> float:
    argv = ["curl", "-s", "-S", "-o", "/dev/null", "--max-time", "600"]
    argv += ["-w", "%{speed_download} %{size_download} %{http_code}"]
    if target.via_proxy:
        argv += ["--noproxy", "", "-x", f"http://127.0.0.1:{target.port}"]
    else:
        argv += ["--noproxy", "*"]
    result = subprocess.run(
        [*argv, target.url(path)], capture_output=True, text=True, timeout=620
    )
    speed, got, code = result.stdout.split()
    if code != "200" or int(float(got)) != size:
        raise SystemExit(f"curl {target.name}: status {code}, {got} of {size} bytes")
    return float(speed) / 1e6


def throughput_python(target: Target, path: str, size: int) -> float:
    started = time.monotonic()
    status, _, got = fetch(target, path)
    elapsed = time.monotonic() - started
    if status != 200 or got != size:
        raise SystemExit(f"{target.name}: status {status}, {got} of {size} bytes")
    return size / elapsed / 1e6


def time_to_first_byte(target: Target, path: str) -> tuple[float, str, int]:
    """Seconds from connect to the first body byte; X-Cache; bytes read."""
    started = time.perf_counter()
    conn, response = target.get(path)
    try:
        first = response.read(1)
        elapsed = time.perf_counter() - started
        rest = drain(response)
        return elapsed, response.headers.get("X-Cache", "-"), len(first) + rest
    finally:
        conn.close()


# -- memory --------------------------------------------------------------------


def proc_status_kb(pid: int, field_name: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise SystemExit(f"no {field_name} in /proc/{pid}/status")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its children (a supervisor's workers)."""
    found = [pid]
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(name))
    return found


def tree_pss_kb(pid: int) -> int:
    """Proportional set size summed over ``pid`` and its children: what the
    processes take together (RSS counts the pages they share once each)."""
    total = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def tree_status_kb(pid: int, field_name: str) -> int:
    """``field_name`` (VmRSS, VmHWM) summed over ``pid`` and its children."""
    total = 0
    for member in process_tree(pid):
        try:
            total += proc_status_kb(member, field_name)
        except (OSError, SystemExit):
            continue
    return total


@dataclass
class RssSampler:
    """Polls a process's VmRSS every 10 ms in a thread; ``peak_kb`` is the max."""

    pid: int
    peak_kb: int = 0
    peak_pss_kb: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, tree_status_kb(self.pid, "VmRSS"))
            self.peak_pss_kb = max(self.peak_pss_kb, tree_pss_kb(self.pid))
            self.samples += 1
            self._stop.wait(0.01)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(5)


def many_clients(
    count: int, one: Callable[[int], tuple[int, str, int]], timeout: float
) -> list[tuple[int, str, int]]:
    """Run ``one(i)`` for ``count`` clients started together; their results."""
    results: list[tuple[int, str, int] | None] = [None] * count
    barrier = threading.Barrier(count)

    def worker(i: int) -> None:
        try:
            barrier.wait(30)
            results[i] = one(i)
        except Exception as e:  # reported as a failed client
            results[i] = (0, f"error: {e}", 0)

    pool = [
        threading.Thread(target=worker, args=(i,), daemon=True) for i in range(count)
    ]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout)
    return [r or (0, "timeout", 0) for r in results]


def curl_clients(target: Target, path: str, count: int) -> list[tuple[int, str, int]]:
    """``count`` curl processes reading ``path`` through the proxy at once."""
    argv = ["curl", "-s", "-o", "/dev/null", "-D", "-", "--max-time", "900"]
    argv += ["-w", "\n%{http_code} %{size_download}\n", "--noproxy", ""]
    argv += ["-x", f"http://127.0.0.1:{target.port}", target.url(path)]
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        for _ in range(count)
    ]
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=900)
            text = out.decode("latin-1")
            cache = "-"
            for line in text.splitlines():
                if line.lower().startswith("x-cache:"):
                    cache = line.split(":", 1)[1].strip()
            code, size = text.strip().splitlines()[-1].split()
            results.append((int(code), cache, int(float(size))))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


# -- the benchmark -------------------------------------------------------------


def make_file(path: str, size: int) -> None:
    """``size`` bytes of incompressible data (a random MiB, varied per MiB)."""
    block = os.urandom(min(size, MiB))
    with open(path, "wb") as f:
        written = 0
        n = 0
        while written < size:
            piece = block[: size - written]
            if len(piece) >= 8:
                piece = n.to_bytes(8, "big") + piece[8:]
            f.write(piece)
            written += len(piece)
            n += 1


def human(size: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


Row = tuple[str, str, str, str, str]
"""measure, proxy, direct, ratio or PASS/FAIL, note."""


def _tally(kinds: collections.Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))


def run(sizes: Sizes, work: str, force_python: bool, workers: str) -> list[Row]:
    sys.path.insert(0, BENCH)
    import bench_pip  # bench/ is not a package; bench_pip imports this module

    rows: list[Row] = []
    root = os.path.join(work, "origin")
    os.makedirs(root)
    wheel_dir = os.path.join(work, "wheels")
    os.makedirs(wheel_dir)
    projects = bench_pip.build_wheels(wheel_dir, PIP_WHEELS, PIP_WHEEL_SIZE)
    print(f"== writing test files under {work}")
    make_file(os.path.join(root, "small.whl"), sizes.small)
    make_file(os.path.join(root, "large.whl"), sizes.large)
    make_file(os.path.join(root, "huge.whl"), sizes.huge)
    make_file(os.path.join(root, "coalesce.whl"), sizes.coalesce)
    make_file(os.path.join(root, "ttfb-0.whl"), sizes.ttfb)
    for i in range(1, sizes.ttfb_trials):
        os.link(os.path.join(root, "ttfb-0.whl"), os.path.join(root, f"ttfb-{i}.whl"))

    have_wrk = shutil.which("wrk") is not None and not force_python
    have_curl = shutil.which("curl") is not None and not force_python
    if shutil.which("wrk") is None:
        print(
            "   wrk not found: install it with `apt-get install -y wrk` for figures"
            " the load generator does not limit; using a Python client instead"
        )

    with children() as procs:
        oport, pport = free_port(), free_port()
        origin_log = os.path.join(work, "origin.log")
        origin_args = ["--serve-origin", root, str(oport)]
        with open(origin_log, "wb") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), *origin_args],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=work,
                )
            )
        wait_listening(procs[-1], oport, origin_log)
        iport = free_port()
        index_args = ["--serve-origin", wheel_dir, str(iport), "1e12", "0"]
        with open(origin_log, "ab") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, bench_pip.__file__, *index_args],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=work,
                )
            )
        index_proc = procs[-1]
        wait_listening(index_proc, iport, origin_log)
        proxy_log = os.path.join(work, "proxy.log")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
        argv = [
            sys.executable,
            "-c",
            TWISTD,
            "-n",
            "--pidfile=",
            "--logfile",
            proxy_log,
        ]
        argv += ["cachingproxy", "--listen", f"tcp:{pport}:interface=127.0.0.1"]
        argv += ["--cache-dir", os.path.join(work, "cache")]
        argv += ["--allow-upstream", "127.0.0.1", "--allow-client", "127.0.0.1"]
        argv += ["--mirror", f"/pypi/=http://127.0.0.1:{iport}/", "--workers", workers]
        procs.append(
            subprocess.Popen(
                argv,
                env=env,
                cwd=work,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        proxy_proc = procs[-1]
        wait_listening(proxy_proc, pport, proxy_log)
        direct = Target("direct", oport, oport, via_proxy=False)
        proxy = Target("proxy", pport, oport, via_proxy=True)

        def check(status: int, cache: str, got: int, size: int, want: str) -> None:
            if (status, cache, got) != (200, want, size):
                raise SystemExit(
                    f"expected 200 {want} {size} bytes, got {status} {cache} {got}"
                    f"\n{tail(proxy_log)}"
                )

        # 1. small HIT requests/s
        print(f"== {human(sizes.small)} HIT requests/s")
        check(*fetch(proxy, "/small.whl"), sizes.small, "MISS")
        time.sleep(0.5)  # let the commit land
        check(*fetch(proxy, "/small.whl"), sizes.small, "HIT")
        load = load_wrk if have_wrk else load_python
        before = origin_counts(direct).get("/small.whl", 0)
        proxy_rate, how = load(proxy, "/small.whl", sizes.load_seconds)
        from_origin = origin_counts(direct).get("/small.whl", 0) - before
        direct_rate, _ = load(direct, "/small.whl", sizes.load_seconds)
        note = f"{how}, {sizes.load_seconds:g} s each"
        note += f"; origin requests during the proxy run: {from_origin}"
        rows.append(
            (
                f"{human(sizes.small)} HIT requests/s",
                f"{proxy_rate:,.0f}",
                f"{direct_rate:,.0f}",
                f"{proxy_rate / direct_rate:.2f}" if not from_origin else "FAIL",
                note,
            )
        )

        # 2. large HIT throughput
        print(f"== {human(sizes.large)} HIT throughput")
        check(*fetch(proxy, "/large.whl"), sizes.large, "MISS")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if fetch(proxy, "/large.whl", method="HEAD")[1] == "HIT":
                break
            time.sleep(0.2)
        measure = throughput_curl if have_curl else throughput_python
        proxy_mbs = statistics.median(
            measure(proxy, "/large.whl", sizes.large)
            for _ in range(sizes.throughput_runs)
        )
        direct_mbs = statistics.median(
            measure(direct, "/large.whl", sizes.large)
            for _ in range(sizes.throughput_runs)
        )
        client = "curl" if have_curl else "python"
        rows.append(
            (
                f"{human(sizes.large)} HIT throughput MB/s",
                f"{proxy_mbs:,.0f}",
                f"{direct_mbs:,.0f}",
                f"{proxy_mbs / direct_mbs:.2f}",
                f"one {client} client, median of {sizes.throughput_runs} runs",
            )
        )

        # 3. time to first byte on a MISS
        print(f"== time to first byte, {human(sizes.ttfb)} MISS")
        proxy_ttfb, direct_ttfb = [], []
        for i in range(sizes.ttfb_trials):
            path = f"/ttfb-{i}.whl"
            seconds, cache, got = time_to_first_byte(direct, path)
            check(200, cache, got, sizes.ttfb, "-")
            direct_ttfb.append(seconds)
            seconds, cache, got = time_to_first_byte(proxy, path)
            check(200, cache, got, sizes.ttfb, "MISS")
            proxy_ttfb.append(seconds)
        p, d = statistics.median(proxy_ttfb), statistics.median(direct_ttfb)
        rows.append(
            (
                f"time to first byte ms, {human(sizes.ttfb)} MISS",
                f"{p * 1000:.2f}",
                f"{d * 1000:.2f}",
                f"{p / d:.2f}",
                f"connect to first body byte, fresh URL per trial, median of"
                f" {sizes.ttfb_trials}",
            )
        )

        # 4. coalescing
        print(f"== 50 concurrent cold clients of one {human(sizes.coalesce)} file")
        results = many_clients(50, lambda i: fetch(proxy, "/coalesce.whl"), 300)
        ok = sum(1 for s, _, n in results if s == 200 and n == sizes.coalesce)
        kinds = collections.Counter(c for _, c, _ in results)
        time.sleep(0.5)
        upstream = origin_counts(direct).get("/coalesce.whl", 0)
        rows.append(
            (
                f"origin requests, 50 cold clients of {human(sizes.coalesce)}",
                str(upstream),
                "-",
                "PASS" if upstream == 1 and ok == 50 else "FAIL",
                f"{ok}/50 complete and whole; X-Cache: {_tally(kinds)}; PASS = 1",
            )
        )

        # 5. memory
        for phase in ("cold", "warm"):
            print(f"== 20 clients x {human(sizes.huge)}, {phase}")
            with RssSampler(proxy_proc.pid) as sampler:
                started = time.monotonic()
                if have_curl:
                    results = curl_clients(proxy, "/huge.whl", 20)
                else:
                    results = many_clients(20, lambda i: fetch(proxy, "/huge.whl"), 900)
                elapsed = time.monotonic() - started
            ok = sum(1 for s, _, n in results if s == 200 and n == sizes.huge)
            kinds = collections.Counter(c for _, c, _ in results)
            hwm = tree_status_kb(proxy_proc.pid, "VmHWM") * 1024 / 1e6
            peak = sampler.peak_kb * 1024 / 1e6
            pss = sampler.peak_pss_kb * 1024 / 1e6
            processes = len(process_tree(proxy_proc.pid))
            rows.append(
                (
                    f"proxy peak memory MB, 20 x {human(sizes.huge)} {phase}",
                    f"{pss:.1f}",
                    f"< {RSS_LIMIT_MB:g}",
                    "PASS" if pss < RSS_LIMIT_MB and ok == 20 else "FAIL",
                    f"{ok}/20 complete and whole; X-Cache: {_tally(kinds)};"
                    f" {20 * sizes.huge / elapsed / 1e6:,.0f} MB/s in all;"
                    f" PSS summed over the {processes} proxy process(es), polled"
                    f" every 10 ms; their VmRSS summed peaked at {peak:.1f}"
                    f" (VmHWM summed since start {hwm:.1f}), which counts the"
                    " pages they share once per process",
                )
            )
            if phase == "cold":
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    if fetch(proxy, "/huge.whl", method="HEAD")[1] == "HIT":
                        break
                    time.sleep(0.2)
        # 6. end to end: concurrent pip installs from a warm mirror
        print(
            f"== {PIP_CONCURRENT} concurrent pip installs of {PIP_WHEELS} wheels, warm"
        )
        mirror = ["--index-url", f"http://127.0.0.1:{pport}/pypi/simple/"]
        direct_index = ["--index-url", f"http://127.0.0.1:{iport}/simple/"]
        bench_pip.pip_install(work, projects, *mirror)  # warms the cache
        time.sleep(0.5)
        direct_pip = concurrent_pips(work, projects, direct_index)
        index_proc.send_signal(signal.SIGTERM)  # every later request is a HIT
        index_proc.wait(timeout=10)
        proxy_pip = concurrent_pips(work, projects, mirror)
        rows.append(
            (
                f"{PIP_CONCURRENT} x pip install {PIP_WHEELS} wheels, warm, s",
                f"{proxy_pip:.2f}",
                f"{direct_pip:.2f}",
                f"{proxy_pip / direct_pip:.2f}",
                f"wall time until all {PIP_CONCURRENT} pip processes ended"
                f" (--no-cache-dir, --target); wheels of"
                f" {human(PIP_WHEEL_SIZE)} payload; origin stopped during the"
                " proxy run; direct = the unthrottled index itself",
            )
        )
        if proxy_proc.poll() is not None:
            raise SystemExit(f"the proxy died:\n{tail(proxy_log)}")
    return rows


PIP_WHEELS = 20
PIP_WHEEL_SIZE = 200 * KiB
PIP_CONCURRENT = 8


def concurrent_pips(work: str, projects: list[str], index: list[str]) -> float:
    """Wall time of ``PIP_CONCURRENT`` pip installs started together."""
    import bench_pip

    errors: list[BaseException] = []

    def one() -> None:
        try:
            bench_pip.pip_install(work, projects, *index)
        except BaseException as e:  # SystemExit from a failed pip
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(PIP_CONCURRENT)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(900)
    elapsed = time.monotonic() - started
    if errors:
        raise SystemExit(f"pip failed: {errors[0]}")
    return elapsed


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Lines of a plain-text table: first column left-aligned, others right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    rule = "  ".join("-" * w for w in widths)

    def show(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [rule, show(header), rule, *(show(r) for r in rows), rule]


def print_table(
    rows: list[Row],
    title: str,
    header: tuple[str, ...] = ("measure", "proxy", "direct", "ratio"),
) -> None:
    print()
    print(title)
    print("\n".join(table(header, [row[:4] for row in rows])))
    for n, row in enumerate(rows, 1):
        print(f"[{n}] {row[0]}: {row[4]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, short runs")
    parser.add_argument(
        "--python-clients",
        action="store_true",
        help="use the Python clients even when wrk and curl are installed",
    )
    parser.add_argument(
        "--workers",
        default="1,auto",
        help="comma-separated --workers settings to measure [default: 1,auto]",
    )
    parser.add_argument("--serve-origin", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_origin:
        serve_origin(args.serve_origin[0], int(args.serve_origin[1]))
        return
    sizes = QUICK if args.quick else DEFAULT
    import twisted

    failed = False
    results: dict[str, list[Row]] = {}
    for workers in [w.strip() for w in args.workers.split(",") if w.strip()]:
        work = tempfile.mkdtemp(prefix="cachingproxy-bench-")
        started = time.monotonic()
        try:
            rows = results[workers] = run(sizes, work, args.python_clients, workers)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        title = (
            f"cachingproxy --workers {workers}"
            f" ({'--quick' if args.quick else 'default sizes'};"
            f" {os.cpu_count()} CPUs; Python {sys.version.split()[0]};"
            f" Twisted {twisted.__version__}; {time.monotonic() - started:.0f} s)"
        )
        print_table(rows, title)
        failed = failed or any(row[3] == "FAIL" for row in rows)
    if len(results) > 1:
        names = list(results)
        first = results[names[0]]
        side = [
            (
                row[0],
                *(results[n][i][1] for n in names),
                _ratio(results[names[-1]][i][1], row[1]),
            )
            for i, row in enumerate(first)
        ]
        print()
        print("--workers side by side (ratio: last setting / first)")
        header = ("measure", *(f"--workers {n}" for n in names), "ratio")
        print("\n".join(table(header, side)))
    if failed:
        sys.exit(1)


def _ratio(last: str, first: str) -> str:
    try:
        a, b = float(last.replace(",", "")), float(first.replace(",", ""))
    except ValueError:
        return "-"
    return f"{a / b:.2f}" if b else "-"


if __name__ == "__main__":
    main()
