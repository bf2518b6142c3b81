#!/usr/bin/env python3
"""cachingproxy side by side with its peers, in one run, as ratios.

Run from a checkout, with a Python that has the project installed::

    python bench/bench_peers.py            # a few minutes on 2 cores
    python bench/bench_peers.py --quick    # small sizes
    python bench/bench_peers.py --only cachingproxy,nginx

Every proxy is set up as a caching reverse proxy (a mirror) in front of one
origin -- nginx serving static files on 127.0.0.1, with ``/slow/`` rate
limited so that one download takes about 3 s -- and measured the same way:

1. small hits: requests/s for a warm 10 KiB file (``wrk -t2 -c64``);
2. large hits: MB/s for one ``curl`` reading a warm large file (median);
3. coalescing: 20 ``curl`` clients asking at once for a cold file under
   ``/slow/``: how many GETs the origin saw, and the slowest client's time
   against one client fetching it directly;
4. memory: the peak RSS and PSS of all the proxy's processes together while
   20 clients read a warm huge file at once (polled every 20 ms; PSS does not
   count twice the pages that forked workers share).

The peers are those of the field that are packaged for this machine: nginx
``proxy_cache``, Varnish, Apache ``mod_cache_disk`` and Squid (Debian:
``apt-get install nginx varnish apache2 squid wrk``), and proxpi (PyPI: ``pip
install proxpi package-cache gunicorn`` into the Python given by ``--peers-python``). A peer that is
not installed is skipped and says so. Nothing but 127.0.0.1 is contacted;
every child is killed on exit; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import (
    GiB,
    KiB,
    MiB,
    children,
    free_port,
    make_file,
    table,
    wait_listening,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOW_RATE = "10m"  # nginx limit_rate for /slow/: bytes per second
CLIENTS = 20


@dataclass(frozen=True)
class Sizes:
    small: int
    large: int
    huge: int
    cold: int
    load_seconds: float
    runs: int


DEFAULT = Sizes(10 * KiB, 256 * MiB, 1 * GiB, 32 * MiB, 5.0, 3)
QUICK = Sizes(10 * KiB, 32 * MiB, 64 * MiB, 8 * MiB, 2.0, 1)


@dataclass
class Peer:
    """One proxy under test: how to start it and where its files are."""

    name: str
    port: int
    argv: list[str]
    prefix: str = ""  # path prefix in front of the origin's paths
    env: dict[str, str] | None = None
    prepare: Callable[[], None] | None = None
    pid: int | None = None
    flat: bool = False  # files by name under the prefix (a PyPI project page)

    def url(self, path: str) -> str:
        if self.flat:
            path = "/" + path.rsplit("/", 1)[1]
        return f"http://127.0.0.1:{self.port}{self.prefix}{path}"


# -- configurations ------------------------------------------------------------


def origin_nginx(work: str, port: int) -> list[str]:
    root = os.path.join(work, "www")
    conf = os.path.join(work, "origin.conf")
    with open(conf, "w") as f:
        f.write(
            f"""worker_processes 2; daemon off; pid {work}/origin.pid; user root;
error_log {work}/origin-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log {work}/origin-access.log;
  sendfile on; default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port} backlog=4096; root {root};
    location /slow/ {{ limit_rate {SLOW_RATE}; }}
    location /simple/ {{ autoindex on; }}
  }}
}}
"""
        )
    return ["nginx", "-c", conf, "-p", work]


def peer_cachingproxy(work: str, origin: int) -> Peer:
    port = free_port()
    argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile", ""]
    argv += ["cachingproxy", "--listen", f"tcp:{port}:interface=127.0.0.1"]
    argv += ["--cache-dir", os.path.join(work, "cp-cache")]
    argv += ["--mirror", f"/=http://127.0.0.1:{origin}/"]
    argv += ["--allow-upstream", "127.0.0.1/32"]
    return Peer("cachingproxy", port, argv)


TWISTD = (
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
)


def peer_nginx(work: str, origin: int) -> Peer:
    port = free_port()
    d = os.path.join(work, "nginx")
    os.makedirs(d)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(
            f"""worker_processes auto; daemon off; pid {d}/nginx.pid; user root;
error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  proxy_cache_path {d}/cache levels=1:2 keys_zone=c:16m max_size=20g
                   inactive=1d use_temp_path=off;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://127.0.0.1:{origin};
      proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_cache c; proxy_cache_valid 200 1d;
      proxy_cache_lock on; proxy_cache_lock_timeout 120s; proxy_cache_lock_age 120s;
      proxy_max_temp_file_size 0;
    }}
  }}
}}
"""
        )
    return Peer("nginx proxy_cache", port, ["nginx", "-c", conf, "-p", d])


def peer_varnish(work: str, origin: int) -> Peer:
    port = free_port()
    d = os.path.join(work, "varnish")
    os.makedirs(d)
    shutil.chown(d, "varnish", "varnish") if _has_user("varnish") else None
    vcl = os.path.join(d, "default.vcl")
    with open(vcl, "w") as f:
        f.write(
            f"""vcl 4.1;
backend origin {{ .host = "127.0.0.1"; .port = "{origin}";
                  .first_byte_timeout = 60s; .between_bytes_timeout = 60s; }}
sub vcl_backend_response {{ set beresp.ttl = 1d; set beresp.do_stream = true; }}
"""
        )
    os.chmod(vcl, 0o644)
    argv = ["varnishd", "-F", "-a", f"127.0.0.1:{port}", "-f", vcl]
    argv += ["-n", d, "-s", "malloc,2G", "-p", "thread_pools=2"]
    return Peer("Varnish", port, argv)


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def peer_apache(work: str, origin: int) -> Peer:
    port = free_port()
    d = os.path.join(work, "apache")
    os.makedirs(os.path.join(d, "cache"))
    shutil.chown(os.path.join(d, "cache"), "www-data", "www-data")
    conf = os.path.join(d, "httpd.conf")
    mods = "/usr/lib/apache2/modules"
    load = "\n".join(
        f"LoadModule {m}_module {mods}/mod_{m}.so"
        for m in (
            "mpm_event",
            "authz_core",
            "proxy",
            "proxy_http",
            "cache",
            "cache_disk",
        )
    )
    with open(conf, "w") as f:
        f.write(
            f"""ServerRoot {d}
{load}
ServerName localhost
Listen 127.0.0.1:{port}
PidFile {d}/httpd.pid
ErrorLog {d}/error.log
Mutex file:{d}
User www-data
Group www-data
ListenBacklog 4096
KeepAlive On
MaxKeepAliveRequests 0
CacheRoot {d}/cache
CacheEnable disk /
CacheQuickHandler on
CacheLock on
CacheLockPath /tmp/mod_cache-lock
CacheDefaultExpire 86400
CacheIgnoreNoLastMod On
CacheMaxFileSize 4000000000
ProxyPass / http://127.0.0.1:{origin}/
"""
        )
    return Peer("Apache mod_cache", port, ["apache2", "-f", conf, "-DFOREGROUND"])


def peer_squid(work: str, origin: int) -> Peer:
    port = free_port()
    d = os.path.join(work, "squid")
    os.makedirs(os.path.join(d, "cache"))
    conf = os.path.join(d, "squid.conf")
    with open(conf, "w") as f:
        f.write(
            f"""http_port 127.0.0.1:{port} accel defaultsite=127.0.0.1:{origin} no-vhost
cache_peer 127.0.0.1 parent {origin} 0 no-query originserver name=origin
acl all src all
http_access allow all
cache_peer_access origin allow all
cache_dir ufs {d}/cache 20000 16 256
cache_mem 64 MB
maximum_object_size 4 GB
maximum_object_size_in_memory 64 KB
collapsed_forwarding on
refresh_pattern . 1440 100% 10080 override-expire override-lastmod ignore-reload
pid_filename {d}/squid.pid
access_log none
cache_log {d}/cache.log
cache_store_log none
coredump_dir {d}
cache_effective_user proxy
shutdown_lifetime 1 seconds
"""
        )
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            shutil.chown(os.path.join(root, name), "proxy", "proxy")
    shutil.chown(d, "proxy", "proxy")

    def prepare() -> None:
        subprocess.run(
            ["squid", "-z", "-N", "-f", conf],
            check=True,
            timeout=60,
            capture_output=True,
        )

    return Peer("Squid", port, ["squid", "-N", "-f", conf], prepare=prepare)


def peer_package_cache(work: str, origin: int, python: str) -> Peer:
    port = free_port()
    d = os.path.join(work, "package-cache")
    os.makedirs(d)
    argv = [os.path.join(os.path.dirname(python), "package-cache")]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    argv += ["--source", f"http://127.0.0.1:{origin}/", "--cache", d]
    return Peer("package-cache (Python)", port, argv)


def peer_proxpi(work: str, origin: int, python: str) -> Peer:
    port = free_port()
    d = os.path.join(work, "proxpi")
    os.makedirs(d)
    env = {
        "PROXPI_INDEX_URL": f"http://127.0.0.1:{origin}/simple/",
        "PROXPI_CACHE_DIR": d,
        "PROXPI_CACHE_SIZE": str(20 * GiB),
    }
    bindir = os.path.dirname(python)
    gunicorn = os.path.join(bindir, "gunicorn")
    if os.path.exists(gunicorn):
        argv = [gunicorn, "-b", f"127.0.0.1:{port}", "-w", "2", "--threads", "8"]
        argv += ["proxpi.server:app"]
    else:
        argv = [python, "-m", "flask", "--app", "proxpi.server", "run"]
        argv += ["--host", "127.0.0.1", "--port", str(port)]
    return Peer("proxpi (Python)", port, argv, prefix="/index/pkg", env=env, flat=True)


# -- measurements --------------------------------------------------------------


def curl(url: str, out: str = "/dev/null") -> tuple[int, int, float, str]:
    """Status, bytes, seconds and X-Cache of one GET."""
    argv = ["curl", "-s", "-S", "-L", "--noproxy", "*", "-o", out, "--max-time", "600"]
    argv += ["-D", "-", "-w", "\n%{http_code} %{size_download} %{time_total}"]
    result = subprocess.run([*argv, url], capture_output=True, text=True, timeout=620)
    lines = result.stdout.strip().splitlines()
    if not lines:
        return 0, 0, 0.0, "-"
    code, size, secs = lines[-1].split()
    cache = "-"
    for line in lines:
        if line.lower().startswith("x-cache:"):
            cache = line.split(":", 1)[1].strip()
    return int(code), int(float(size)), float(secs), cache


def wrk(url: str, seconds: float) -> float:
    argv = ["wrk", "-t2", "-c64", f"-d{seconds:g}s", "--timeout", "10s", url]
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + 60
    ).stdout
    for line in out.splitlines():
        if "Non-2xx" in line or "Socket errors" in line:
            print(f"    wrk {url}: {line.strip()}")
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    return 0.0


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants (from /proc)."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def memory_kb(pids: list[int]) -> tuple[int, int]:
    """Summed RSS and PSS of ``pids`` (PSS shares pages that several of them
    map, so a supervisor and its forked workers are not counted twice)."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            pass
    return rss, pss


class TreeRss:
    """Peak RSS of a process tree, polled in a thread."""

    def __init__(self, root: int) -> None:
        self.root, self.peak_kb, self.peak_pss_kb = root, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def _run(self) -> None:
        pids = tree_pids(self.root)
        n = 0
        while not self._stop.is_set():
            if n % 25 == 0:
                pids = tree_pids(self.root)
            rss, pss = memory_kb(pids)
            self.peak_kb = max(self.peak_kb, rss)
            self.peak_pss_kb = max(self.peak_pss_kb, pss)
            n += 1
            self._stop.wait(0.02)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def together(count: int, one: Callable[[], tuple[int, int, float, str]]) -> list:
    results: list = [None] * count
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        try:
            barrier.wait(30)
            results[i] = one()
        except Exception as e:
            results[i] = (0, 0, 0.0, f"error {e}")

    pool = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(900)
    return [r or (0, 0, 0.0, "timeout") for r in results]


def origin_gets(work: str, path: str) -> int:
    with open(os.path.join(work, "origin-access.log")) as f:
        return sum(1 for line in f if f"GET {path} " in line)


@dataclass
class Result:
    name: str
    small_rps: float = 0.0
    large_mbs: float = 0.0
    origin_gets: int = 0
    slowest: float = 0.0
    rss_mib: float = 0.0
    pss_mib: float = 0.0
    note: str = ""


def measure(peer: Peer, sizes: Sizes, work: str, tag: str) -> Result:
    r = Result(peer.name)
    small, large = "/files/small-1.0.tar.gz", "/files/large-1.0.tar.gz"
    huge = "/files/huge-1.0.tar.gz"
    for path, size in ((small, sizes.small), (large, sizes.large), (huge, sizes.huge)):
        for _ in range(2):  # the second one is the hit
            code, got, _, _ = curl(peer.url(path))
        if code != 200 or got != size:
            r.note = f"{path}: {code}, {got} bytes"
            return r
    r.small_rps = wrk(peer.url(small), sizes.load_seconds)
    r.large_mbs = statistics.median(
        sizes.large / curl(peer.url(large))[2] / 1e6 for _ in range(sizes.runs)
    )
    cold = f"/slow/cold-{tag}-1.0.tar.gz"
    shutil.copy(
        os.path.join(work, "www", "slow", "cold-1.0.tar.gz"),
        os.path.join(work, "www", "slow", f"cold-{tag}-1.0.tar.gz"),
    )
    results = together(CLIENTS, lambda: curl(peer.url(cold)))
    bad = [x for x in results if x[0] != 200 or x[1] != sizes.cold]
    r.slowest = max(x[2] for x in results)
    r.origin_gets = origin_gets(work, cold)
    if bad:
        r.note = f"{len(bad)} of {CLIENTS} cold clients failed ({bad[0]})"
    assert peer.pid is not None
    with TreeRss(peer.pid) as rss:
        results = together(CLIENTS, lambda: curl(peer.url(huge)))
    r.rss_mib = rss.peak_kb / 1024
    r.pss_mib = rss.peak_pss_kb / 1024
    if any(x[0] != 200 or x[1] != sizes.huge for x in results):
        r.note += " huge-file clients failed"
    return r


# -- the run -------------------------------------------------------------------


def build_origin(work: str, sizes: Sizes) -> None:
    www = os.path.join(work, "www")
    for sub in ("files", "slow", "simple/pkg"):
        os.makedirs(os.path.join(www, sub))
    names = {
        "small-1.0.tar.gz": sizes.small,
        "large-1.0.tar.gz": sizes.large,
        "huge-1.0.tar.gz": sizes.huge,
    }
    for name, size in names.items():
        make_file(os.path.join(www, "files", name), size)
    make_file(os.path.join(www, "slow", "cold-1.0.tar.gz"), sizes.cold)
    hrefs = [f"/files/{n}" for n in names]
    hrefs += [f"/slow/cold-{i}-1.0.tar.gz" for i in range(16)]
    links = "".join(f'<a href="{h}">{h.rsplit("/", 1)[1]}</a>\n' for h in hrefs)
    with open(os.path.join(www, "simple", "pkg", "index.html"), "w") as f:
        f.write(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated peer names")
    parser.add_argument("--peers-python", default="/opt/peers/bin/python")
    parser.add_argument("--workers", default="", help="cachingproxy --workers")
    args = parser.parse_args()
    sizes = QUICK if args.quick else DEFAULT
    if shutil.which("nginx") is None or shutil.which("wrk") is None:
        raise SystemExit("needs nginx (the origin) and wrk: apt-get install nginx wrk")
    work = tempfile.mkdtemp(prefix="bench-peers-")
    os.chmod(work, 0o755)
    try:
        build_origin(work, sizes)
        origin = free_port()
        peers: list[Peer] = []
        cp = peer_cachingproxy(work, origin)
        if args.workers:
            cp.argv += ["--workers", args.workers]
        peers.append(cp)
        makers: list[tuple[str, Callable[[], Peer]]] = [
            ("nginx", lambda: peer_nginx(work, origin)),
            ("varnishd", lambda: peer_varnish(work, origin)),
            ("apache2", lambda: peer_apache(work, origin)),
            ("squid", lambda: peer_squid(work, origin)),
        ]
        for tool, make in makers:
            if shutil.which(tool) or os.path.exists(f"/usr/sbin/{tool}"):
                peers.append(make())
            else:
                print(f"  skipped: {tool} is not installed")
        if (
            os.path.exists(args.peers_python)
            and subprocess.run(
                [args.peers_python, "-c", "import proxpi"], capture_output=True
            ).returncode
            == 0
        ):
            peers.append(peer_proxpi(work, origin, args.peers_python))
        else:
            print(f"  skipped: proxpi (not importable by {args.peers_python})")
        pc = os.path.join(os.path.dirname(args.peers_python), "package-cache")
        if os.path.exists(pc):
            peers.append(peer_package_cache(work, origin, args.peers_python))
        else:
            print(f"  skipped: package-cache (no {pc})")
        if args.only:
            wanted = args.only.split(",")
            peers = [
                p for p in peers if any(w.lower() in p.name.lower() for w in wanted)
            ]
        results = []
        with children() as procs:
            log = os.path.join(work, "origin.log")
            with open(log, "wb") as out:
                procs.append(
                    subprocess.Popen(origin_nginx(work, origin), stdout=out, stderr=out)
                )
            wait_listening(procs[-1], origin, log)
            direct = curl(f"http://127.0.0.1:{origin}/slow/cold-1.0.tar.gz")[2]
            for i, peer in enumerate(peers):
                print(f"== {peer.name}", flush=True)
                if peer.prepare:
                    peer.prepare()
                plog = os.path.join(work, f"peer-{i}.log")
                env = {**os.environ, **(peer.env or {})}
                with open(plog, "wb") as out:
                    proc = subprocess.Popen(peer.argv, stdout=out, stderr=out, env=env)
                procs.append(proc)
                peer.pid = proc.pid
                wait_listening(proc, peer.port, plog)
                time.sleep(1.0)  # let worker processes come up
                try:
                    results.append(measure(peer, sizes, work, str(i)))
                except Exception as e:  # one peer's failure is a row, not a crash
                    results.append(Result(peer.name, note=f"failed: {e}"))
                print(f"   {results[-1]}", flush=True)
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        report(results, direct, sizes)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(results: list[Result], direct: float, sizes: Sizes) -> None:
    ours = next((r for r in results if r.name == "cachingproxy"), None)

    def ratio(value: float, other: float) -> str:
        return f"{value / other:.2f}x" if other else "-"

    rows: list[tuple[str, ...]] = []
    for r in results:
        rows.append(
            (
                r.name,
                f"{r.small_rps:,.0f}",
                ratio(ours.small_rps, r.small_rps) if ours else "-",
                f"{r.large_mbs:,.0f}",
                ratio(ours.large_mbs, r.large_mbs) if ours else "-",
                f"{r.origin_gets} / {r.slowest:.2f} s",
                f"{r.rss_mib:.0f} / {r.pss_mib:.0f}",
                r.note,
            )
        )
    print()
    print(
        f"small = {sizes.small // KiB} KiB hits (wrk -t2 -c64); large = "
        f"{sizes.large // MiB} MiB hits (curl, median of {sizes.runs}); cold = "
        f"{CLIENTS} clients of a {sizes.cold // MiB} MiB file at {SLOW_RATE}B/s "
        f"(direct {direct:.2f} s); RSS, PSS = peaks summed over all processes, {CLIENTS} clients of "
        f"{sizes.huge // MiB} MiB; 'cp/x' = cachingproxy's figure over the peer's"
    )
    print(
        "\n".join(
            table(
                (
                    "proxy",
                    "small hits req/s",
                    "cp/x",
                    "large hits MB/s",
                    "cp/x",
                    "cold: origin GETs / slowest",
                    "RSS / PSS MiB",
                    "note",
                ),
                rows,
            )
        )
    )


if __name__ == "__main__":
    main()
