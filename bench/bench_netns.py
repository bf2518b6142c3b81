#!/usr/bin/env python3
"""The cost of transparent interception: the same proxy, redirected or explicit.

Run as root from a checkout, with a Python that has the project's
dependencies, ``ip`` (iproute2), ``nft`` (nftables) and ``curl``::

    python bench/bench_netns.py            # about a minute
    python bench/bench_netns.py --quick    # about 20 seconds

It makes three network namespaces of its own, as tests/test_netns.py does --
``client`` (10.200.1.2) -- ``router`` (10.200.1.1 / 10.200.2.1) -- ``origin``
(10.200.2.2) -- and removes them, with every process in them, when it ends.
Nothing outside these namespaces is contacted. In the router run one real
``twistd -n cachingproxy`` (listening on port 3128 of every router address)
and the shipped ``etc/nftables/transparent.nft``, which redirects the client
side's port 80 to it; the origin runs ``python -m http.server``.

Every figure is for cache HITs (each file is fetched once first), through the
same proxy process, reached three ways:

* transparent -- from the client namespace to ``http://10.200.2.2/...`` with
  no proxy setting: the router's nftables redirect it (NAT, conntrack, and the
  proxy's SO_ORIGINAL_DST look-up);
* explicit -- from the client namespace with ``http_proxy`` pointing at
  10.200.1.1:3128, over the same veth link: the same path minus interception;
* loopback -- explicit proxy from inside the router namespace on 127.0.0.1:
  no veth, no forwarding.

Requests/s is for a 10 KiB file with keep-alive connections (``wrk`` when
installed -- ``apt-get install -y wrk`` -- else a Python client, which is then
the bottleneck); MB/s is one ``curl`` reading a large file (median of a few
runs). MB is 10^6 bytes. Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
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
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KiB, MiB = 1024, 1024**2
TWISTD = (
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
)
PORT = 3128
CLIENT_IP, ROUTER_LAN_IP, ROUTER_UP_IP, ORIGIN_IP = (
    "10.200.1.2",
    "10.200.1.1",
    "10.200.2.1",
    "10.200.2.2",
)


@dataclass(frozen=True)
class Sizes:
    small: int
    large: int
    load_seconds: float
    throughput_runs: int


DEFAULT = Sizes(10 * KiB, 256 * MiB, 10.0, 3)
QUICK = Sizes(10 * KiB, 32 * MiB, 3.0, 3)


# -- namespaces -------------------------------------------------------------------


def run(argv: list[str], timeout: float = 60, check: bool = True) -> str:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise SystemExit(f"{argv!r} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


def in_ns(namespace: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", namespace, *argv]


@contextlib.contextmanager
def namespaces() -> Iterator[tuple[str, str, str]]:
    """client, router and origin, wired and forwarding; always removed."""
    tag = f"cpb{os.getpid() % 100000}{os.urandom(2).hex()}"
    names = (f"{tag}c", f"{tag}r", f"{tag}o")
    made: list[str] = []
    try:
        for name in names:
            etc = os.path.join("/etc/netns", name)
            os.makedirs(etc)
            with open(os.path.join(etc, "hosts"), "w") as f:
                f.write("127.0.0.1 localhost\n")
            with open(os.path.join(etc, "resolv.conf"), "w") as f:
                f.write("nameserver 127.0.0.1\n")
            run(["ip", "netns", "add", name])
            made.append(name)
        c, r, o = names
        script = f"""
            ip -n {r} link add lan0 type veth peer name eth0 netns {c}
            ip -n {r} link add up0 type veth peer name eth0 netns {o}
            ip -n {c} addr add {CLIENT_IP}/24 dev eth0
            ip -n {r} addr add {ROUTER_LAN_IP}/24 dev lan0
            ip -n {r} addr add {ROUTER_UP_IP}/24 dev up0
            ip -n {o} addr add {ORIGIN_IP}/24 dev eth0
            for ns in {c} {r} {o}; do ip -n $ns link set lo up; done
            ip -n {c} link set eth0 up
            ip -n {r} link set lan0 up
            ip -n {r} link set up0 up
            ip -n {o} link set eth0 up
            ip -n {c} route add default via {ROUTER_LAN_IP}
            ip -n {o} route add default via {ROUTER_UP_IP}
            ip netns exec {r} sysctl -q -w net.ipv4.ip_forward=1
        """
        run(["sh", "-ec", script])
        yield names
    finally:
        for name in made:
            for pid in run(["ip", "netns", "pids", name], check=False).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run(["ip", "netns", "del", name], check=False)
        for name in names:
            shutil.rmtree(os.path.join("/etc/netns", name), ignore_errors=True)


def load_rules(router: str, work: str) -> None:
    """etc/nftables/transparent.nft with the defines set for this router."""
    with open(os.path.join(REPO, "etc", "nftables", "transparent.nft")) as f:
        text = f.read()
    values = {"LAN_IF": '"lan0"', "PROXY_PORT": str(PORT), "PROXY_USER": '"root"'}
    lines = []
    for line in text.splitlines():
        for name, value in values.items():
            if line.startswith(f"define {name} = "):
                line = f"define {name} = {value}"
        lines.append(line)
    path = os.path.join(work, "transparent.nft")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    run(in_ns(router, "nft", "-f", path))


# -- children ---------------------------------------------------------------------


@contextlib.contextmanager
def child(argv: list[str], log: str, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def wait_for(log: str, text: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(log, encoding="utf-8", errors="replace") as f:
            if text in f.read():
                return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    with open(log, encoding="utf-8", errors="replace") as f:
        raise SystemExit(f"no {text!r} in {log}:\n{f.read()[-3000:]}")


# -- measurements -----------------------------------------------------------------


@dataclass(frozen=True)
class Way:
    """One way of reaching the proxy: from which namespace, through what."""

    name: str
    namespace: str
    proxy: str | None
    """``host:port`` of the proxy for an explicit proxy, None for transparent."""

    def curl(self, url: str, *options: str) -> list[str]:
        via = ["-x", f"http://{self.proxy}"] if self.proxy else []
        return in_ns(
            self.namespace,
            "curl",
            "-s",
            "-S",
            "--noproxy",
            "" if self.proxy else "*",
            *via,
            "--max-time",
            "120",
            *options,
            url,
        )


def fetch(way: Way, url: str) -> dict[str, str]:
    """One GET; the response headers, lower-cased."""
    out = run(way.curl(url, "-o", "/dev/null", "-D", "-"), timeout=150)
    headers = {}
    for line in out.splitlines()[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


def megabytes_per_second(way: Way, url: str, runs: int) -> float:
    speeds = [
        float(run(way.curl(url, "-o", "/dev/null", "-w", "%{speed_download}"), 150))
        for _ in range(runs)
    ]
    return statistics.median(speeds) / 1e6


_WRK_PROXY = """
wrk.path = "{url}"
wrk.headers["Host"] = "{host}"
"""

_PY_LOAD = """
import http.client, json, sys, threading, time
host, port, target, hostname, seconds, threads = sys.argv[1:7]
deadline = time.monotonic() + float(seconds)
counts = []
def worker():
    n = 0
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    while time.monotonic() < deadline:
        conn.request("GET", target, headers={"Host": hostname})
        r = conn.getresponse(); r.read()
        if r.status != 200:
            raise SystemExit(r.status)
        n += 1
    counts.append(n)
ts = [threading.Thread(target=worker) for _ in range(int(threads))]
for t in ts: t.start()
for t in ts: t.join()
print(json.dumps(sum(counts) / float(seconds)))
"""


def requests_per_second(
    way: Way, url: str, seconds: float, work: str, use_wrk: bool
) -> float:
    host = url.split("/")[2]
    path = "/" + url.split("/", 3)[3]
    if use_wrk:
        if way.proxy:
            script = os.path.join(work, f"{way.name}.lua")
            with open(script, "w") as f:
                f.write(_WRK_PROXY.format(url=url, host=host))
            argv = ["-s", script, f"http://{way.proxy}/"]
        else:
            argv = [url]
        out = run(
            in_ns(way.namespace, "wrk", "-t1", "-c8", f"-d{seconds:g}s", *argv),
            timeout=seconds + 30,
        )
        for line in out.splitlines():
            if line.startswith("Requests/sec:"):
                if "Non-2xx" in out:
                    raise SystemExit(f"errors from wrk:\n{out}")
                return float(line.split()[1])
        raise SystemExit(f"no Requests/sec from wrk:\n{out}")
    connect, target = (way.proxy.split(":"), url) if way.proxy else ([host, "80"], path)
    out = run(
        in_ns(
            way.namespace,
            sys.executable,
            "-c",
            _PY_LOAD,
            connect[0],
            connect[1],
            target,
            host,
            str(seconds),
            "4",
        ),
        timeout=seconds + 60,
    )
    return float(json.loads(out))


# -- main -------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument(
        "--no-wrk", action="store_true", help="use the Python client even with wrk"
    )
    args = parser.parse_args()
    use_wrk = shutil.which("wrk") is not None and not args.no_wrk
    sizes = QUICK if args.quick else DEFAULT
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    for tool in ("ip", "nft", "curl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")

    with tempfile.TemporaryDirectory(prefix="bench-netns-") as work:
        docroot = os.path.join(work, "www")
        os.makedirs(docroot)
        files = {"small-1.0.tar.gz": sizes.small, "large-1.0.tar.gz": sizes.large}
        for name, size in files.items():
            with open(os.path.join(docroot, name), "wb") as f:
                for _ in range(0, size, MiB):
                    f.write(os.urandom(min(MiB, size)))
                f.truncate(size)
        with namespaces() as (client, router, origin):
            load_rules(router, work)
            origin_log = os.path.join(work, "origin.log")
            proxy_log = os.path.join(work, "proxy.log")
            origin_argv = in_ns(
                origin,
                sys.executable,
                "-u",
                "-m",
                "http.server",
                "80",
                "--bind",
                "0.0.0.0",
                "--directory",
                docroot,
            )
            proxy_argv = in_ns(
                router,
                sys.executable,
                "-c",
                TWISTD,
                "-n",
                "--pidfile=",
                "cachingproxy",
                "--listen",
                f"tcp:{PORT}",
                "--cache-dir",
                os.path.join(work, "cache"),
                "--allow-upstream",
                "10.200.2.0/24",
                "--allow-client",
                "10.200.1.0/24",
                "--allow-client",
                "127.0.0.1",
            )
            pythonpath = os.pathsep.join(
                filter(None, [REPO, os.environ.get("PYTHONPATH")])
            )
            with (
                child(origin_argv, origin_log) as origin_proc,
                child(proxy_argv, proxy_log, PYTHONPATH=pythonpath) as proxy_proc,
            ):
                wait_for(origin_log, "Serving HTTP on", origin_proc)
                wait_for(proxy_log, "cachingproxy listening on", proxy_proc)
                ways = [
                    Way("transparent", client, None),
                    Way("explicit", client, f"{ROUTER_LAN_IP}:{PORT}"),
                    Way("loopback", router, f"127.0.0.1:{PORT}"),
                ]
                urls = {name: f"http://{ORIGIN_IP}/{name}" for name in files}
                for url in urls.values():
                    first = fetch(ways[0], url)
                    if first.get("x-cache") != "MISS":
                        raise SystemExit(f"{url}: not intercepted? {first}")
                    for way in ways:
                        cache = fetch(way, url).get("x-cache")
                        if cache != "HIT":
                            raise SystemExit(f"{way.name} {url}: X-Cache {cache}")
                rps = {
                    w.name: requests_per_second(
                        w, urls["small-1.0.tar.gz"], sizes.load_seconds, work, use_wrk
                    )
                    for w in ways
                }
                mbs = {
                    w.name: megabytes_per_second(
                        w, urls["large-1.0.tar.gz"], sizes.throughput_runs
                    )
                    for w in ways
                }
                with open(origin_log) as f:
                    origin_gets = f.read().count('"GET ')

    load = "wrk -t1 -c8" if use_wrk else "Python, 4 threads"
    print(
        f"cachingproxy through network namespaces: HITs, {sizes.small // KiB} KiB "
        f"for requests/s ({load}, {sizes.load_seconds:g} s), "
        f"{sizes.large // MiB} MiB for MB/s (curl, median of "
        f"{sizes.throughput_runs}); origin saw {origin_gets} requests"
    )
    print()
    header = (
        f"{'':<22}{'transparent':>12}{'explicit':>12}{'loopback':>12}"
        f"{'tr/explicit':>13}{'tr/loopback':>13}"
    )
    print(header)
    print("-" * len(header))
    for label, figures in (("HIT requests/s", rps), ("HIT MB/s", mbs)):
        t, e, lo = figures["transparent"], figures["explicit"], figures["loopback"]
        print(
            f"{label:<22}{t:>12.1f}{e:>12.1f}{lo:>12.1f}{t / e:>13.2f}{t / lo:>13.2f}"
        )
    print()
    print(
        "transparent: client namespace, no proxy setting, nftables redirect;"
        " explicit: client namespace, http_proxy over the same link;"
        " loopback: http_proxy on 127.0.0.1 in the router namespace."
    )


if __name__ == "__main__":
    main()
